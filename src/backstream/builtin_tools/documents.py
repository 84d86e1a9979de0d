"""The documents semantic_search_v1 searches: `tool_context` artifacts turned into plain text.

Artifacts: `{"type": "text", "value", "title"?}`, `{"type": "file", "value": <base64>,
"filename"?, "title"?}` (PDF, DOCX, HTML, Markdown or plain text: told by the filename's
extension, else by the bytes) and `{"type": "uri", "value", "title"?}` (fetched through
the egress rules, each redirect checked again). Other artifact types belong to other
tools and are skipped. A document's index counts the documents only, in `tool_context`
order (0 is the first text, file or uri artifact); errors also name the artifact's field.

`check_artifacts` does what is cheap before the run (types, base64, sizes, counts, URL
shape: a 422); `load_documents` fetches and parses when the tool starts, in worker
threads, and names the artifact when one cannot be read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import time
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..egress import EgressDenied, check_url_shape, is_globally_routable
from ..errors import Invalid
from .base import artifacts

if TYPE_CHECKING:
    from ..config import EgressSettings, SemanticSearchSettings, ToolsSettings

DOCUMENT_TYPES = ("text", "file", "uri")
MAX_REDIRECTS = 5
FETCH_CONCURRENCY = 4
MAX_TITLE_CHARS = 512
MAX_PDF_PAGES = 5000
PDF_DEADLINE_S = 60.0
_EXTENSIONS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".csv": "text",
    ".json": "text",
    ".log": "text",
    ".rst": "text",
}
_MEDIA_TYPES = {
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/markdown": "markdown",
    "text/plain": "text",
}


class DocumentError(Exception):
    """A document could not be read; the message names it."""


@dataclass
class Document:
    index: int  # among the documents of tool_context, from 0
    title: str
    text: str


@dataclass
class Artifact:
    index: int  # among the documents, from 0
    where: str  # its field path in the request, e.g. tool_context.2
    type: str
    value: str
    title: str | None
    filename: str | None


def document_artifacts(tool_context: Any) -> list[Artifact]:
    """The text, file and uri artifacts of a tool_context, numbered from 0, with their field paths."""
    out: list[Artifact] = []
    for where, item in artifacts(tool_context):
        if not isinstance(item, dict) or item.get("type") not in DOCUMENT_TYPES:
            continue
        value = item.get("value")
        if not isinstance(value, str) or not value:
            raise Invalid(f"a {item['type']} artifact needs a non-empty string value", f"{where}.value")
        title, filename = item.get("title"), item.get("filename")
        for name, field in (("title", title), ("filename", filename)):
            if field is not None and (not isinstance(field, str) or len(field) > MAX_TITLE_CHARS):
                raise Invalid(f"{name} must be a string of at most {MAX_TITLE_CHARS} characters", f"{where}.{name}")
        out.append(Artifact(len(out), where, item["type"], value, title, filename))
    return out


def check_artifacts(tool_context: Any, settings: SemanticSearchSettings, egress: EgressSettings) -> None:
    """Refuse (Invalid: a 422) what can be judged before the run: counts, sizes, base64, file types, URL shapes."""
    artifacts = document_artifacts(tool_context)
    if len(artifacts) > settings.max_documents:
        raise Invalid(
            f"tool_context holds {len(artifacts)} documents; at most {settings.max_documents} are allowed",
            "tool_context",
        )
    for artifact in artifacts:
        where = f"{artifact.where}.value"
        if artifact.type == "text" and len(artifact.value.encode()) > settings.max_document_bytes:
            raise Invalid(f"the text exceeds {settings.max_document_bytes} bytes", where)
        elif artifact.type == "file":
            data = decode_file(artifact, settings.max_document_bytes)
            if file_kind(data, artifact.filename, None) is None:
                raise Invalid("unsupported file type: give a filename ending in .pdf, .docx, .html, .md or .txt", where)
        elif artifact.type == "uri":
            try:
                _check_uri(artifact.value, egress)
            except EgressDenied as exc:
                raise Invalid(f"the uri cannot be fetched: {exc}", where) from None


def _check_uri(url: str, egress: EgressSettings) -> None:
    """The egress rules that need no lookup: the URL's form, allow_hosts, and a literal address's range."""
    host, port = check_url_shape(url, egress)
    trusted = egress.allow_private or host in egress.allow_hosts or f"{host}:{port}" in egress.allow_hosts
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: resolved, checked and pinned when it is fetched
    if not trusted and not is_globally_routable(address):
        raise EgressDenied(f"{address} is not a globally routable address (set egress.allow_private or allow-list it)")


def decode_file(artifact: Artifact, max_bytes: int) -> bytes:
    where = f"{artifact.where}.value"
    if len(artifact.value) > (max_bytes + 2) // 3 * 4 + 4:  # before decoding: base64 is 4/3 of the bytes
        raise Invalid(f"the file exceeds {max_bytes} bytes", where)
    try:
        data = base64.b64decode(artifact.value, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("the file value is not valid base64", where) from None
    if len(data) > max_bytes:
        raise Invalid(f"the file exceeds {max_bytes} bytes", where)
    return data


def file_kind(data: bytes, filename: str | None, media_type: str | None) -> str | None:
    """pdf, docx, html, markdown or text: by the filename's extension, the media type, then the bytes; None if unknown."""
    if filename:
        match = re.search(r"\.[A-Za-z]+$", filename)
        if match and match.group().lower() in _EXTENSIONS:
            return _EXTENSIONS[match.group().lower()]
    if media_type:
        kind = _MEDIA_TYPES.get(media_type.split(";")[0].strip().lower())
        if kind is not None:
            return kind
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        return "docx" if b"word/" in data[:65536] else None
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "html"
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < 65530:  # not just a character cut at the sample's end
            return None
    return "text"


# --- parsing (blocking: called in a worker thread) --------------------------------------------------


def parse(data: bytes, kind: str, max_bytes: int) -> str:
    """The document's plain text (paragraphs separated by blank lines)."""
    if kind == "pdf":
        text = _pdf_text(data)
    elif kind == "docx":
        text = _docx_text(data, max_bytes)
    elif kind == "html":
        text = _html_text(data)
    else:
        text = data.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text[:max_bytes]  # extracted text may outgrow a compressed file: keep within the document cap


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        raise DocumentError("the PDF is encrypted")
    if len(reader.pages) > MAX_PDF_PAGES:
        raise DocumentError(f"the PDF has more than {MAX_PDF_PAGES} pages")
    # A crafted page can make text extraction slow: the whole file gets a time budget, checked page by page.
    deadline = time.monotonic() + PDF_DEADLINE_S
    pages = []
    for page in reader.pages:
        if time.monotonic() > deadline:
            raise DocumentError(f"reading the PDF took more than {PDF_DEADLINE_S:g} s")
        pages.append((page.extract_text() or "").strip())
    return "\n\n".join(pages)


def _docx_text(data: bytes, max_bytes: int) -> str:
    import docx

    # A DOCX is a zip: refuse one that would inflate far beyond the document cap (a zip bomb).
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if sum(info.file_size for info in archive.infolist()) > 8 * max_bytes:
            raise DocumentError("the DOCX inflates to too much data")
    document = docx.Document(io.BytesIO(data))
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text for cell in row.cells))
    return "\n\n".join(p for p in parts if p.strip())


def _html_text(data: bytes) -> str:
    import trafilatura

    text = trafilatura.extract(data, include_comments=False, include_tables=True, favor_recall=True)
    return text or trafilatura.html2txt(data)


def parse_artifact_bytes(artifact: Artifact, title: str, data: bytes, kind: str | None, max_bytes: int) -> Document:
    label = f"document {artifact.index} ({title}, {artifact.where})"
    if kind is None:
        raise DocumentError(f"{label}: unsupported file type")
    try:
        text = parse(data, kind, max_bytes)
    except Exception as exc:
        raise DocumentError(f"{label}: cannot read it as {kind}: {type(exc).__name__}: {exc}") from None
    if not text.strip():
        raise DocumentError(f"{label}: no text could be extracted from the {kind}")
    return Document(artifact.index, title, text)


# --- loading ---------------------------------------------------------------------------------------


async def load_documents(tool_context: Any, tools: ToolsSettings, egress: EgressSettings) -> list[Document]:
    """Every document artifact as text, in tool_context order. DocumentError (naming it) when one cannot be read."""
    settings = tools.semantic_search
    check_artifacts(tool_context, settings, egress)  # again: a background run may start long after its request
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def load(artifact: Artifact) -> Document:
        title = artifact.title or artifact.filename or (artifact.value if artifact.type == "uri" else None)
        title = title or f"document {artifact.index}"
        if artifact.type == "text":
            return Document(artifact.index, title, artifact.value)
        if artifact.type == "file":
            data = decode_file(artifact, settings.max_document_bytes)
            kind = file_kind(data, artifact.filename, None)
        else:
            async with limit:
                data, media_type = await fetch(artifact, tools, egress)
            kind = file_kind(data, _url_filename(artifact.value), media_type)
        return await asyncio.to_thread(parse_artifact_bytes, artifact, title, data, kind, settings.max_document_bytes)

    tasks = [asyncio.create_task(load(a)) for a in document_artifacts(tool_context)]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        # The first failure in tool_context order, among the loads that ended.
        failure = next((t.exception() for t in tasks if t.done() and t.exception() is not None), None)
        if failure is not None:
            raise failure
        return [task.result() for task in tasks]
    finally:
        for task in tasks:  # one document failed (or the run was cancelled): stop fetching the others
            task.cancel()


def _url_filename(url: str) -> str | None:
    from urllib.parse import urlsplit

    path = urlsplit(url).path
    return path.rsplit("/", 1)[-1] or None


async def fetch(artifact: Artifact, tools: ToolsSettings, egress: EgressSettings) -> tuple[bytes, str | None]:
    """GET a uri artifact through the egress rules (pinned addresses, each redirect re-checked), size and time capped."""
    import httpx2

    from ..egress import PinnedTransport

    url, cap = artifact.value, tools.semantic_search.max_document_bytes
    what = f"document {artifact.index} ({url}, {artifact.where})"
    try:
        async with (
            asyncio.timeout(tools.web.timeout_s),
            httpx2.AsyncClient(transport=PinnedTransport(egress), follow_redirects=False) as client,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                check_url_shape(url, egress)
                async with client.stream("GET", url, headers={"accept": "*/*"}) as resp:
                    if resp.is_redirect and resp.headers.get("location"):
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if resp.status_code != 200:
                        raise DocumentError(f"{what}: the server answered {resp.status_code}")
                    return await _read_capped(resp, cap, what), resp.headers.get("content-type")
            raise DocumentError(f"{what}: more than {MAX_REDIRECTS} redirects")
    except EgressDenied as exc:
        hop = "" if url == artifact.value else f"redirected to {url}, "
        raise DocumentError(f"{what}: {hop}refused by the egress rules: {exc}") from None
    except TimeoutError:
        raise DocumentError(f"{what}: not fetched within {tools.web.timeout_s:g} s") from None
    except httpx2.HTTPError as exc:
        raise DocumentError(f"{what}: {type(exc).__name__}: {exc}") from None


async def _read_capped(resp: Any, cap: int, what: str) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise DocumentError(f"{what}: larger than {cap} bytes")
    body = bytearray()
    async for chunk in resp.aiter_bytes():  # decoded bytes: a compressed body is counted as it inflates
        body += chunk
        if len(body) > cap:
            raise DocumentError(f"{what}: larger than {cap} bytes")
    return bytes(body)
