"""`/playground` in a real browser: Playwright drives Debian's chromium (nothing is downloaded) against a real
server with the built-in local model. A run's tokens arrive, the page is reloaded mid-run, and the text goes on
from the last event it showed (`?after=`), without repeating anything."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.server import ROOT, SECRETS, ServerProcess, fake_models

SCREENSHOTS = ROOT / ".pytest_cache" / "playground"
KEY = "bsk_test_playground_0123456789abcdef0"
SECRETS.add(KEY)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed (.ci/run installs it: apt-get install chromium)"
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    yield p
    context.close()


def shoot(page: Page, tmp_path: Path, name: str) -> Path:
    """A screenshot in the test's tmp dir, copied under .pytest_cache/playground/ to look at."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    return path


def test_page_and_assets_are_served(http: httpx.Client) -> None:
    root = http.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    page = http.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "/playground/app.js" in page.text and "http" not in page.text.replace("http-equiv", ""), "no external assets"
    assert http.get("/playground/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/playground/app.css").headers["content-type"].startswith("text/css")


def test_background_run_resumes_after_reload(
    page: Page, server: ServerProcess, http: httpx.Client, tmp_path: Path
) -> None:
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/stream" in r.url else None)
    page.goto(server.url + "/")
    assert page.url.endswith("/playground")
    page.wait_for_selector("#model option[value=local]", state="attached")
    page.select_option("#model", "local")
    page.fill("#max-tokens", "48")
    page.fill("#prompt", "Tell me a long story about a fox who lives by a river.")
    page.click("#start-btn")
    watcher = page.locator(".watcher").first
    # The watcher appears once the start request has answered: until then there is nothing to read.
    page.wait_for_function(
        "() => { const s = document.querySelector('.watcher .status'); return s && Number(s.dataset.seq) >= 5; }",
        timeout=60_000,
    )
    before_text = watcher.locator("pre.text").text_content() or ""
    before_seq = int(watcher.locator(".status").get_attribute("data-seq") or 0)
    run_id = watcher.get_attribute("data-run")
    assert run_id and before_text, "tokens arrived before the reload"

    page.reload()
    watcher = page.locator(".watcher").first
    assert watcher.get_attribute("data-run") == run_id, "the watcher came back after the reload"
    page.wait_for_selector(".watcher .status[data-done=true]", timeout=60_000)
    after_text = watcher.locator("pre.text").text_content() or ""
    final_seq = int(watcher.locator(".status").get_attribute("data-seq") or 0)
    shoot(page, tmp_path, "playground-resumed")

    result = http.get(f"/v1/messages/async/{run_id}/result").json()
    assert result["status"] == "completed" and result["content"][0]["text"] == after_text, "no duplicate, no gap"
    assert after_text.startswith(before_text)
    assert final_seq == http.get(f"/v1/messages/async/{run_id}/status").json()["metadata"]["event_count"]
    resumed = [u for u in stream_urls if "after=" in u and not u.endswith("after=0")]
    # After the reload the watcher asked only for what came after the last event it had shown.
    assert resumed, stream_urls
    assert resumed_from(resumed[0]) >= before_seq > 0
    status_line = watcher.locator(".status").text_content() or ""
    assert "Stop" in status_line or "Length" in status_line, status_line
    assert f"resumed after seq {resumed_from(resumed[0])}" in status_line, "the page shows where it resumed"


def resumed_from(url: str) -> int:
    return int(url.rsplit("after=", 1)[1])


def test_several_watchers_chat_and_runs_panel(
    page: Page, server: ServerProcess, http: httpx.Client, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.script("gpt-up", Reply(tokens=["Hello", ",", " world", "!"], delay=0.05))
    page.goto(server.url + "/playground")
    page.wait_for_selector("#model option[value=gpt]", state="attached")
    page.select_option("#model", "gpt")
    page.click("#chat-btn")
    page.wait_for_function("() => document.querySelector('#chat-status').textContent.includes('Stop')")
    assert page.locator("#chat-out").text_content() == "Hello, world!"
    page.click("#start-btn")
    page.locator(".watcher .more").first.wait_for()
    page.locator(".watcher .more").first.click()
    page.locator(".watcher .more").first.click()
    page.wait_for_function("() => document.querySelectorAll('.watcher .status[data-done=true]').length === 3")
    texts = page.locator(".watcher pre.text").all_text_contents()
    assert texts == ["Hello, world!"] * 3, "three watchers of one run, side by side, the same text"
    assert http.get("/v1/messages/async", params={"limit": 1}).status_code == 200
    page.click("#runs-refresh")
    mid = page.locator(".watcher .run-id").first.text_content() or ""
    page.locator("#runs tbody tr", has_text=mid).first.wait_for()  # the runs panel lists the run
    assert page.locator("#runs-panel").is_visible() and mid.startswith("msg_")
    shoot(page, tmp_path, "playground-watchers")


@pytest.fixture(scope="module")
def keyed(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = [{"name": "pg", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenants": ["acme"]}]
    config = {"store": "memory", "models": fake_models(fake), "auth": {"api_keys": keys}}
    srv = ServerProcess(tmp_path_factory.mktemp("playground-keyed"), config, name="playground-keyed").start()
    yield srv
    srv.stop()


def test_api_key_is_used_and_kept_in_session_storage_only(page: Page, keyed: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["k", "e", "y"]))
    page.goto(keyed.url + "/playground")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in (page.locator("#error").text_content() or ""), "asks for a key"
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model option[value=gpt]", state="attached")
    page.select_option("#model", "gpt")
    page.click("#start-btn")
    page.wait_for_selector(".watcher .status[data-done=true]")
    assert page.locator(".watcher pre.text").text_content() == "key"
    assert KEY in page.evaluate("() => sessionStorage.getItem('backstream.playground')")
    assert page.evaluate("() => localStorage.length") == 0 and page.context.cookies() == []
