"""`/docs` (Swagger UI) and `/redoc` work offline: their assets come from the server (the `fastapi-offline`
package), and in a real browser (Debian's chromium through Playwright, as in tests/test_playground.py) with every
request to anything but the server aborted, both render the operations. The OpenAPI document gives every
operation a summary and a request example."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.support.server import ServerProcess
from tests.test_playground import SCREENSHOTS, shoot
from tests.test_playground import browser as browser  # noqa: F401  (the module's chromium)

SUMMARY = "Create a message"  # a known operation's summary (POST /v1/messages, http/openapi.py)


def test_docs_pages_reference_only_local_assets(http: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        page = http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "cdn." not in page.text and "fonts.googleapis" not in page.text, page.text
        assert "/docs/static/" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing else is even tried
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        resp = http.get(f"/docs/static/{asset}")
        assert resp.status_code == 200 and len(resp.content) > 100_000, asset


@pytest.fixture()
def offline_page(browser: Browser, server: ServerProcess) -> Iterator[tuple[Page, list[str]]]:  # noqa: F811
    """A page that may reach only the server: every other request is aborted and noted."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []
    origin = urlsplit(server.url).netloc

    def only_the_server(route: Route) -> None:
        url = route.request.url
        if url.startswith("data:") or urlsplit(url).netloc == origin:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    yield page, blocked
    context.close()


def test_swagger_ui_renders_offline(
    offline_page: tuple[Page, list[str]], server: ServerProcess, tmp_path: Path
) -> None:
    page, blocked = offline_page
    page.goto(f"{server.url}/docs")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=15_000)
    expect(page.get_by_text(SUMMARY, exact=True).first).to_be_visible()
    assert page.locator(".opblock").count() >= 10
    shoot(page, tmp_path, "docs-swagger")
    assert blocked == [], blocked


def test_redoc_renders_offline(offline_page: tuple[Page, list[str]], server: ServerProcess, tmp_path: Path) -> None:
    page, blocked = offline_page
    page.goto(f"{server.url}/redoc")
    expect(page.locator("h1", has_text="Backstream").first).to_be_visible(timeout=15_000)
    expect(page.locator("h2", has_text=SUMMARY).first).to_be_visible()
    assert page.locator("h2").count() >= 10  # one per operation
    shoot(page, tmp_path, "docs-redoc")
    page.screenshot(path=str(SCREENSHOTS / "docs-redoc-top.png"))  # the first screen: the whole page is tall
    assert blocked == [], blocked


def test_every_operation_has_a_summary_and_examples(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    missing = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            if not op.get("summary") or not op.get("description"):
                missing.append(f"{where}: summary/description")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                if "example" not in content and "examples" not in content:
                    missing.append(f"{where}: request example ({media})")
    assert missing == [], "\n".join(missing)
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        assert path in doc["paths"], path
