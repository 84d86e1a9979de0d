"""`web_fetch_v1` (a page through the egress rules, as readable text) and `web_search_v1` (SearxNG).

A fetched URL comes from the model, so it is untrusted: every hop of a redirect chain is
checked against the egress rules and connected through `PinnedTransport`, and the
whole fetch has one deadline and one byte cap. The search backend is the operator's
(`tools.web.search_url`, like a configured MCP server), so it is not egress-checked;
the URLs it returns are, when the model fetches them.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2

from ..egress import EgressDenied, PinnedTransport, check_url
from ..errors import Invalid
from .base import Source, ToolEnv, ToolOutcome

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import Settings, WebToolSettings

_MAX_URL_CHARS = 8192
_MAX_QUERY_CHARS = 1000
_MAX_SNIPPET_CHARS = 600
_DEFAULT_RESULTS = 5
_MOST_RESULTS = 20
_HEADERS = {
    "User-Agent": "Backstream-web_fetch_v1",
    "Accept": "text/html, application/xhtml+xml, text/plain, application/json;q=0.9, */*;q=0.1",
    "Accept-Encoding": "gzip, deflate",  # decoded here, within the byte cap (no decompression bombs)
}

_SEARCH_HEADERS = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate"}


class FetchRefused(Exception):
    """The fetch cannot give the model a page; the message says why (it becomes an error result)."""


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """web_search_v1 needs a configured search backend: say which setting, before anything runs."""
    if settings.tools.web.search_url:
        return
    for spec in chat.builtin_tools or ():
        if spec.type == "web_search_v1":
            raise Invalid(
                "web_search_v1 needs a search backend: the server has no tools.web.search_url "
                "(a SearxNG URL) configured",
                "tools",
            )


@dataclass
class Body:
    """A response body read within the caps, not yet decoded."""

    url: str
    media_type: str
    charset: str | None
    content_encoding: str
    raw: bytes


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _kind(media_type: str) -> str | None:
    """html, text (passed through) or None (refused)."""
    if media_type in ("text/html", "application/xhtml+xml"):
        return "html"
    if media_type in ("text/plain", "text/markdown", "application/json") or media_type.endswith("+json"):
        return "text"
    return None


async def _read_capped(response: httpx2.Response, max_bytes: int) -> bytes:
    """The raw (still content-encoded) body; FetchRefused as soon as it passes `max_bytes`, without reading on."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchRefused(f"the body is {declared} bytes, more than tools.web.max_bytes ({max_bytes})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise FetchRefused(f"the body is larger than tools.web.max_bytes ({max_bytes} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _decompress(raw: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """The body without its content encoding, never more than `max_bytes` decoded (a small gzip may expand hugely)."""
    codings = [c.strip() for c in content_encoding.lower().split(",") if c.strip() not in ("", "identity")]
    if not codings:
        return raw
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise FetchRefused(f"unsupported content encoding {content_encoding!r}")
    # gzip: a gzip header; deflate: a zlib header, or (some servers) none at all.
    attempts = [16 + zlib.MAX_WBITS] if codings[0] != "deflate" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for wbits in attempts:
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(raw, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes or decoder.unconsumed_tail:
            raise FetchRefused(f"the decoded body is larger than tools.web.max_bytes ({max_bytes} bytes)")
        return out
    raise FetchRefused(f"the body is not valid {codings[0]} data")


def _html_text(html: bytes | str) -> tuple[str | None, str]:
    """(title, readable text) of an HTML page: the article, not the navigation or scripts."""
    import trafilatura  # heavy (lxml, charset detection): only when a page is fetched

    document = trafilatura.bare_extraction(html, with_metadata=True, include_comments=False, include_tables=True)
    title = getattr(document, "title", None) or None
    text = getattr(document, "text", None)
    if text:
        return title, str(text)
    # Nothing looked like an article (a short page, a list): all the visible text rather than none.
    return title, trafilatura.html2txt(html) or ""


def readable(body: Body, max_bytes: int) -> tuple[str | None, str]:
    """(title, text) of a fetched body. Blocking (decompression, HTML parsing): run it in a thread."""
    data = _decompress(body.raw, body.content_encoding, max_bytes)
    if _kind(body.media_type) == "html":
        # A declared charset wins; without one, trafilatura detects it from the bytes (meta tags included).
        return _html_text(data.decode(body.charset, errors="replace") if body.charset else data)
    return None, data.decode(body.charset or "utf-8", errors="replace")


def _charset(response: httpx2.Response) -> str | None:
    import codecs

    name = response.charset_encoding
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None  # an unknown charset: let the decoder guess


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n\n[cut: the first {max_chars} of {len(text)} characters (tools.web.max_text_chars)]"


def _add_source(env: ToolEnv, title: str, text: str) -> int:
    """Record a passage the model was shown, so a citation can point at it; its number (from 1) for the model."""
    number = len(env.sources) + 1
    env.sources.append(Source(document_index=number, title=title, text=text, start=0, end=len(text)))
    return number


class WebFetch:
    """web_fetch_v1: one URL, through the egress rules, as readable text."""

    description = (
        "Fetch a web page (http or https) and return its readable text (the article, without navigation), "
        "its final URL after redirects, and its title. HTML, plain text and JSON only."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {"url": {"type": "string", "description": "The absolute http(s) URL to fetch."}},
        "required": ["url"],
    }

    def __init__(self) -> None:
        self._client: httpx2.AsyncClient | None = None

    async def start(self, env: ToolEnv) -> None:
        return None  # the client is made on the first call: most runs never fetch

    def _http(self, env: ToolEnv) -> httpx2.AsyncClient:
        if self._client is None:
            # Redirects are followed here, hop by hop, so that each Location is checked first.
            self._client = httpx2.AsyncClient(
                transport=PinnedTransport(env.egress),
                timeout=env.settings.web.timeout_s,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        url = arguments.get("url")
        if not isinstance(url, str) or not url.strip() or len(url) > _MAX_URL_CHARS:
            return ToolOutcome(
                f'web_fetch_v1 needs {{"url": "<an http(s) URL of at most {_MAX_URL_CHARS} characters>"}}', True
            )
        web = env.settings.web
        try:
            async with asyncio.timeout(web.timeout_s):
                body = await self._fetch(url.strip(), env)
            title, text = await asyncio.to_thread(readable, body, web.max_bytes)
        except TimeoutError:
            return ToolOutcome(f"fetching {url} took longer than tools.web.timeout_s ({web.timeout_s:g} s)", True)
        except FetchRefused as exc:
            return ToolOutcome(f"cannot fetch {url}: {exc}", True)
        except EgressDenied as exc:  # raised at connect time by the pinned transport
            return ToolOutcome(f"cannot fetch {url}: {exc}", True)
        except (httpx2.HTTPError, httpx2.InvalidURL) as exc:
            return ToolOutcome(f"cannot fetch {url}: {type(exc).__name__}: {str(exc) or 'no detail'}", True)
        return self._outcome(body.url, title, text.strip(), env)

    async def _fetch(self, url: str, env: ToolEnv) -> Body:
        """GET `url`, following at most tools.web.max_redirects redirects, each target checked before it is reached."""
        client = self._http(env)
        web = env.settings.web
        for hop in range(web.max_redirects + 1):
            try:
                await check_url(url, env.egress)
            except EgressDenied as exc:
                raise FetchRefused(f"the redirect to {url} is refused: {exc}" if hop else str(exc)) from None
            async with client.stream("GET", url, headers=_HEADERS) as response:
                if response.has_redirect_location:
                    url = str(response.url.join(response.headers["location"]))
                    continue
                return await self._body(response, web)
        raise FetchRefused(f"more than tools.web.max_redirects ({web.max_redirects}) redirects")

    @staticmethod
    async def _body(response: httpx2.Response, web: WebToolSettings) -> Body:
        if not response.is_success:
            raise FetchRefused(f"the server answered {response.status_code} {response.reason_phrase}".rstrip())
        media_type = _media_type(response.headers.get("content-type", ""))
        if _kind(media_type) is None:
            stated = media_type or "no content type"
            raise FetchRefused(f"{stated} is not a page web_fetch_v1 reads (HTML, plain text or JSON)")
        raw = await _read_capped(response, web.max_bytes)
        encoding = response.headers.get("content-encoding", "identity")
        return Body(str(response.url), media_type, _charset(response), encoding, raw)

    @staticmethod
    def _outcome(url: str, title: str | None, text: str, env: ToolEnv) -> ToolOutcome:
        shown = _cut(text, env.settings.web.max_text_chars) if text else "(the page has no readable text)"
        number = _add_source(env, title or url, shown)
        head = f"Source [{number}]\nURL: {url}\nTitle: {title or '(none)'}\n\n"
        return ToolOutcome(head + shown, extra={"web": {"url": url, "title": title, "source": number}})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebSearch:
    """web_search_v1: a query to the configured SearxNG instance, answered as numbered results."""

    description = (
        "Search the web. Returns numbered results (title, URL, snippet); "
        "fetch a result's URL with the web fetch tool to read the page."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to search for."},
            "max_results": {"type": "integer", "minimum": 1, "maximum": _MOST_RESULTS, "default": _DEFAULT_RESULTS},
        },
        "required": ["query"],
    }

    def __init__(self) -> None:
        self._client: httpx2.AsyncClient | None = None

    async def start(self, env: ToolEnv) -> None:
        return None

    def _http(self, env: ToolEnv) -> httpx2.AsyncClient:
        if self._client is None:  # the operator's backend: not egress-checked, like a configured MCP server
            self._client = httpx2.AsyncClient(
                timeout=env.settings.web.timeout_s, follow_redirects=False, trust_env=False
            )
        return self._client

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        query = arguments.get("query")
        limit = arguments.get("max_results", _DEFAULT_RESULTS)
        if not isinstance(query, str) or not query.strip() or len(query) > _MAX_QUERY_CHARS:
            return ToolOutcome(f'web_search_v1 needs {{"query": "<at most {_MAX_QUERY_CHARS} characters>"}}', True)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= _MOST_RESULTS:
            return ToolOutcome(f"max_results must be an integer from 1 to {_MOST_RESULTS}", True)
        web = env.settings.web
        try:
            async with asyncio.timeout(web.timeout_s):
                raw = await self._search(query.strip(), env)
            results = await asyncio.to_thread(_parse_results, raw, limit)
        except TimeoutError:
            return ToolOutcome(f"the search took longer than tools.web.timeout_s ({web.timeout_s:g} s)", True)
        except FetchRefused as exc:
            return ToolOutcome(f"the search failed: {exc}", True)
        except httpx2.HTTPError as exc:
            return ToolOutcome(f"the search backend cannot be reached: {type(exc).__name__}", True)
        return _search_outcome(query.strip(), results, env)

    async def _search(self, query: str, env: ToolEnv) -> bytes:
        web = env.settings.web
        assert web.search_url is not None  # check_request refused the request otherwise
        url = web.search_url.rstrip("/") + "/search"
        params = {"q": query, "format": "json"}
        async with self._http(env).stream("GET", url, params=params, headers=_SEARCH_HEADERS) as response:
            if response.status_code == 403:
                raise FetchRefused("the search backend refused JSON output (SearxNG: enable json in search.formats)")
            if not response.is_success:
                raise FetchRefused(f"the search backend answered {response.status_code}")
            raw = await _read_capped(response, web.max_bytes)
            return _decompress(raw, response.headers.get("content-encoding", "identity"), web.max_bytes)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _parse_results(raw: bytes, limit: int) -> list[tuple[str, str, str]]:
    """(title, url, snippet) of the first `limit` SearxNG results that have a URL."""
    import orjson

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FetchRefused("the search backend's answer is not JSON") from None
    found = data.get("results") if isinstance(data, dict) else None
    if not isinstance(found, list):
        raise FetchRefused("the search backend's answer has no results list")
    results: list[tuple[str, str, str]] = []
    for item in found:
        if len(results) >= limit:
            break
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        title, snippet = item.get("title"), item.get("content")
        title = " ".join(title.split()) if isinstance(title, str) else ""
        snippet = " ".join(snippet.split())[:_MAX_SNIPPET_CHARS] if isinstance(snippet, str) else ""
        results.append((title, item["url"], snippet))
    return results


def _search_outcome(query: str, results: list[tuple[str, str, str]], env: ToolEnv) -> ToolOutcome:
    if not results:
        return ToolOutcome(f"no results for {query!r}", extra={"web": {"query": query, "sources": []}})
    entries: list[str] = []
    numbers: list[int] = []
    for title, url, snippet in results:
        number = _add_source(env, title or url, snippet or title or url)
        numbers.append(number)
        entries.append(f"[{number}] {title or '(no title)'}\nURL: {url}\n{snippet}".rstrip())
    text = _cut(f"Results for {query!r}:\n\n" + "\n\n".join(entries), env.settings.web.max_text_chars)
    return ToolOutcome(text, extra={"web": {"query": query, "sources": numbers}})


TOOLS = {"web_fetch_v1": WebFetch, "web_search_v1": WebSearch}
