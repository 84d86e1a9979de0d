"""Small documents made in the test (PDF written by hand, DOCX by python-docx), and an HTTP server for uri artifacts."""

from __future__ import annotations

import base64
import io

from tests.support.local_http import LocalHttpServer, QuietHandler


def pdf(lines: list[str]) -> bytes:
    """A minimal valid one-page PDF showing `lines` in Helvetica (objects, xref table and trailer by hand)."""
    escaped = [ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for ln in lines]
    stream = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({ln}) Tj T*" for ln in escaped) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        " /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def docx(paragraphs: list[str]) -> bytes:
    import docx as python_docx

    document = python_docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def html(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    page = (
        f"<!DOCTYPE html><html><head><title>{title}</title></head><body>"
        f"<nav>Home | About | Contact</nav><article><h1>{title}</h1>{body}</article>"
        "<footer>Copyright example</footer></body></html>"
    )
    return page.encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class DocServer(LocalHttpServer):
    """Serves fixed answers by path on 127.0.0.1: `routes[path] = (status, headers, body)`; records the paths asked."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.hits.append(self.path)
                status, headers, body = owner.routes.get(self.path, (404, {}, b"not found"))
                self.reply(status, body, headers)

        super().__init__(Handler)
