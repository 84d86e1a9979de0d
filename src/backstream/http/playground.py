"""`/playground`: one page to try the gateway in a browser (package data, no build step, no external assets).

`/` redirects there. The page needs no credentials; what it calls under `/v1/` does, with
the API key the user types in (kept in the tab's sessionStorage only).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Only this origin's own files; fetches only to this origin; not framed by other sites.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    return files("backstream.playground").joinpath(name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=ASSETS[name], headers={"content-security-policy": CSP})


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/playground", status_code=307)


@router.get("/playground")
async def page() -> Response:
    return _serve("index.html")


@router.get("/playground/app.js")
async def script() -> Response:
    return _serve("app.js")


@router.get("/playground/app.css")
async def style() -> Response:
    return _serve("app.css")
