"""web_fetch_v1 and web_search_v1 over real HTTP: a real server process, the fake upstream scripted to
call the tools, local page servers (allow-listed through egress.allow_hosts) and a fake SearxNG."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import orjson
import pytest

from backstream.builtin_tools.web import FetchRefused, _decompress
from tests.support.fake_searxng import FakeSearxng
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.local_http import LocalHttpServer, QuietHandler
from tests.support.server import ServerProcess, fake_models
from tests.support.sse import parse_sse

USER = [{"role": "user", "content": "What do otters do?"}]
TIMEOUT_S = 1.5
MAX_BYTES = 16 * 1024
MAX_TEXT_CHARS = 2000

ARTICLE = b"""<!doctype html><html><head><title>The Otter Report</title>
<script>var tracking = 'SCRIPT-NOISE';</script><style>.nav { color: red }</style></head>
<body><nav><a href="/">Home</a> <a href="/about">NAV-NOISE menu</a></nav>
<article><h1>Otters hold hands</h1>
<p>Sea otters hold hands while sleeping so that they do not drift apart. This behaviour is called
rafting, and it is seen in groups of many otters floating together on the water.</p>
<p>Otters also wrap themselves in kelp to stay anchored while they rest in the kelp forest.</p>
</article></body></html>"""
DATA_JSON = orjson.dumps({"items": [f"item-{i:05d}" for i in range(1000)]})  # within max_bytes, past max_text_chars
BIG_CHUNK = b"y" * 16384
BIG_LIMIT = 64 * 1024 * 1024  # the /big page ends here at the latest; the fetch must stop long before


class PageServer(LocalHttpServer):
    """Pages for the fetch tool; `hits` records every path requested, `released` frees the hanging handlers."""

    def __init__(self, other_port: int = 0) -> None:
        self.hits: list[str] = []
        self.gzip_served = 0  # /article answers gzipped when asked to: the fetcher decodes it within its cap
        self.released = threading.Event()
        self.big_aborted = threading.Event()  # the fetcher closed the connection while /big was still sending
        pages = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                pages.hits.append(self.path)
                pages.route(self, other_port)

        super().__init__(Handler)
        self.start()

    def route(self, h: BaseHTTPRequestHandler, other_port: int) -> None:
        redirects = {
            "/start": "/article",
            "/away": f"http://127.0.0.1:{other_port}/secret",
            "/metadata": "http://169.254.169.254/latest/meta-data/",
            "/loop": "/loop",
        }
        if h.path in redirects:
            h.send_response(302)
            h.send_header("Location", redirects[h.path])
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif h.path == "/article":
            gzipped = "gzip" in h.headers.get("Accept-Encoding", "")
            self.gzip_served += gzipped
            self.send(h, "text/html; charset=utf-8", gzip.compress(ARTICLE) if gzipped else ARTICLE, gzipped)
        elif h.path == "/data.json":
            self.send(h, "application/json", DATA_JSON)
        elif h.path == "/image.png":
            self.send(h, "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        elif h.path in ("/big", "/trickle", "/hang"):
            self.stream(h)
        else:
            h.send_error(404)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, content_type: str, body: bytes, gzipped: bool = False) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if gzipped:
            h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stream(self, h: BaseHTTPRequestHandler) -> None:
        """A body with no length: /big floods, /trickle sends a byte at a time, /hang sends nothing more."""
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.end_headers()
        sent = 0
        try:
            while sent < BIG_LIMIT and not self.released.is_set():
                if h.path == "/big":
                    h.wfile.write(BIG_CHUNK)
                    sent += len(BIG_CHUNK)
                elif h.path == "/trickle":
                    h.wfile.write(b"x")
                    h.wfile.flush()
                    self.released.wait(0.05)  # pacing of the trickle, not synchronisation
                else:
                    h.wfile.flush()
                    self.released.wait(30)
        except (BrokenPipeError, ConnectionResetError):
            if h.path == "/big":
                self.big_aborted.set()

    def stop(self) -> None:
        self.released.set()
        super().stop()


SEARCH_RESULTS = [
    {
        "url": "PAGES/article",
        "title": "Otters hold hands",
        "content": "Sea otters hold hands while sleeping.",
        "engine": "x",
    },
    {"url": "https://example.org/kelp", "title": "Kelp  forests", "content": "Otters rest in kelp.", "engine": "y"},
    {"url": "https://example.org/third", "title": "Third", "content": "Not asked for.", "engine": "z"},
]


@pytest.fixture(scope="module")
def forbidden() -> Iterator[PageServer]:
    """A server on a port that is not allow-listed: it must never be reached."""
    server = PageServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pages(forbidden: PageServer) -> Iterator[PageServer]:
    server = PageServer(other_port=forbidden.port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def searx(pages: PageServer) -> Iterator[FakeSearxng]:
    results = [{**r, "url": r["url"].replace("PAGES", pages.url)} for r in SEARCH_RESULTS]
    server = FakeSearxng(results).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web(
    fake: FakeUpstream, pages: PageServer, searx: FakeSearxng, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "egress": {"allow_hosts": [f"127.0.0.1:{pages.port}"]},  # not searx: the operator's backend needs none
        "runs": {"max_steps": 4},
        "tools": {
            "web": {
                "search_url": searx.url,
                "timeout_s": TIMEOUT_S,
                "max_bytes": MAX_BYTES,
                "max_redirects": 3,
                "max_text_chars": MAX_TEXT_CHARS,
            }
        },
    }
    srv = ServerProcess(tmp_path_factory.mktemp("web"), config, name="web").start()
    yield srv
    srv.stop()


def call(name: str, args: dict[str, Any], call_id: str = "call_1") -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=[orjson.dumps(args).decode()])


def run(srv: ServerProcess, fake: FakeUpstream, steps: list[list[ToolCall]], tools: list[str]) -> list[dict[str, Any]]:
    """One streamed run: the model calls `steps` of tools, then answers; the tool_result events' data."""
    fake.script("gpt-up", [*(Reply(tokens=[], tool_calls=s) for s in steps), Reply(tokens=["done"])])
    body = {"model": "gpt", "max_tokens": 64, "messages": USER, "tools": [{"type": t} for t in tools], "stream": True}
    with srv.client() as c, c.stream("POST", "/v1/messages", json=body) as resp:
        raw = resp.read()
        assert resp.status_code == 200, raw
    frames = parse_sse(raw)
    assert frames[-1]["data"]["finish_reason"] == "Stop", "a tool's failure is the model's to handle, not the run's end"
    return [f["data"] for f in frames if f["event"] == "tool_result"]


def sent_tool_messages(fake: FakeUpstream) -> list[str]:
    """The tool results the model received in its last request."""
    return [m["content"] for m in fake.requests[-1].body["messages"] if m["role"] == "tool"]


def test_fetch_gives_the_model_the_article_not_the_page_furniture(
    web: ServerProcess, fake: FakeUpstream, pages: PageServer
) -> None:
    (result,) = run(web, fake, [[call("web_fetch_v1", {"url": pages.url + "/start"})]], ["web_fetch_v1"])
    assert result["is_error"] is False, result
    offered = fake.requests[0].body["tools"][0]["function"]
    assert offered["name"] == "web_fetch_v1" and offered["parameters"]["required"] == ["url"]
    (seen,) = sent_tool_messages(fake)
    assert seen == result["content"]
    assert "Sea otters hold hands while sleeping" in seen and "wrap themselves in kelp" in seen
    for noise in ("SCRIPT-NOISE", "NAV-NOISE", ".nav {"):
        assert noise not in seen
    assert f"URL: {pages.url}/article" in seen, "the final URL, after the redirect"
    assert "Title: Otters hold hands" in seen and "Source [1]" in seen
    assert result["web"] == {"url": f"{pages.url}/article", "title": "Otters hold hands", "source": 1}
    assert pages.hits[-2:] == ["/start", "/article"] and pages.gzip_served == 1


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/away", "is not in egress.allow_hosts"),
        ("/metadata", "'169.254.169.254' is not in egress.allow_hosts"),
    ],
)
def test_a_redirect_to_a_disallowed_host_is_refused_at_the_redirect(
    web: ServerProcess, fake: FakeUpstream, pages: PageServer, forbidden: PageServer, path: str, why: str
) -> None:
    (result,) = run(web, fake, [[call("web_fetch_v1", {"url": pages.url + path})]], ["web_fetch_v1"])
    assert result["is_error"] is True
    assert "the redirect to http://" in result["content"] and why in result["content"], result["content"]
    assert pages.hits[-1] == path and forbidden.hits == [], "the redirect target was never contacted"
    assert sent_tool_messages(fake)[0].startswith("Error:") and why in sent_tool_messages(fake)[0]


def test_a_disallowed_url_a_loop_and_a_wrong_type_are_error_results(
    web: ServerProcess, fake: FakeUpstream, pages: PageServer, forbidden: PageServer
) -> None:
    calls = [
        call("web_fetch_v1", {"url": f"http://127.0.0.1:{forbidden.port}/secret"}, "c1"),
        call("web_fetch_v1", {"url": "file:///etc/passwd"}, "c2"),
        call("web_fetch_v1", {"url": pages.url + "/loop"}, "c3"),
        call("web_fetch_v1", {"url": pages.url + "/image.png"}, "c4"),
        call("web_fetch_v1", {"link": pages.url}, "c5"),
        call("web_fetch_v1", {"url": pages.url + "/missing"}, "c6"),
    ]
    results = run(web, fake, [calls], ["web_fetch_v1"])
    assert [r["is_error"] for r in results] == [True] * 6
    assert "is not in egress.allow_hosts" in results[0]["content"] and forbidden.hits == []
    assert "only http and https" in results[1]["content"]
    assert "max_redirects (3)" in results[2]["content"] and pages.hits.count("/loop") == 4
    assert "image/png is not a page" in results[3]["content"]
    assert '{"url"' in results[4]["content"]
    assert "the server answered 404 Not Found" in results[5]["content"]


def test_json_passes_through_and_long_text_is_cut_with_a_note(
    web: ServerProcess, fake: FakeUpstream, pages: PageServer
) -> None:
    (result,) = run(web, fake, [[call("web_fetch_v1", {"url": pages.url + "/data.json"})]], ["web_fetch_v1"])
    assert result["is_error"] is False
    text = result["content"].split("\n\n", 1)[1]
    assert text.startswith('{"items":["item-00000","item-00001"')
    assert text.endswith(f"[cut: the first {MAX_TEXT_CHARS} of {len(DATA_JSON)} characters (tools.web.max_text_chars)]")
    assert len(text) < MAX_TEXT_CHARS + 100


def test_body_cap_stops_reading(web: ServerProcess, fake: FakeUpstream, pages: PageServer) -> None:
    started = time.monotonic()
    (result,) = run(web, fake, [[call("web_fetch_v1", {"url": pages.url + "/big"})]], ["web_fetch_v1"])
    assert time.monotonic() - started < TIMEOUT_S + 3
    assert result["is_error"] is True and f"tools.web.max_bytes ({MAX_BYTES} bytes)" in result["content"]
    assert pages.big_aborted.wait(10), "the fetcher closed the connection instead of reading the 64 MB"


@pytest.mark.parametrize("path", ["/trickle", "/hang"])
def test_a_slow_page_ends_at_the_time_cap(web: ServerProcess, fake: FakeUpstream, pages: PageServer, path: str) -> None:
    started = time.monotonic()
    (result,) = run(web, fake, [[call("web_fetch_v1", {"url": pages.url + path})]], ["web_fetch_v1"])
    elapsed = time.monotonic() - started
    assert result["is_error"] is True
    assert f"took longer than tools.web.timeout_s ({TIMEOUT_S:g} s)" in result["content"]
    # A trickle never trips a per-read timeout: only a deadline for the whole fetch ends it this soon.
    assert TIMEOUT_S - 0.2 < elapsed < TIMEOUT_S + 3


def test_search_then_fetch_numbers_the_sources(
    web: ServerProcess, fake: FakeUpstream, pages: PageServer, searx: FakeSearxng
) -> None:
    steps = [
        [call("web_search_v1", {"query": "sea otters & kelp", "max_results": 2}, "s1")],
        [call("web_fetch_v1", {"url": pages.url + "/article"}, "f1")],
    ]
    searched, fetched = run(web, fake, steps, ["web_search_v1", "web_fetch_v1"])
    assert searx.queries[-1] == {"q": ["sea otters & kelp"], "format": ["json"]}
    assert searched["is_error"] is False
    assert searched["content"] == (
        "Results for 'sea otters & kelp':\n\n"
        f"[1] Otters hold hands\nURL: {pages.url}/article\nSea otters hold hands while sleeping.\n\n"
        "[2] Kelp forests\nURL: https://example.org/kelp\nOtters rest in kelp."
    )
    assert searched["web"] == {"query": "sea otters & kelp", "sources": [1, 2]}
    assert fetched["is_error"] is False and fetched["web"]["source"] == 3
    assert sent_tool_messages(fake) == [searched["content"], fetched["content"]]


def test_search_arguments_are_checked(web: ServerProcess, fake: FakeUpstream, searx: FakeSearxng) -> None:
    before = len(searx.queries)
    calls = [
        call("web_search_v1", {"query": " "}, "c1"),
        call("web_search_v1", {"query": "x", "max_results": 500}, "c2"),
    ]
    results = run(web, fake, [calls], ["web_search_v1"])
    assert [r["is_error"] for r in results] == [True, True]
    assert (
        '{"query"' in results[0]["content"] and "max_results must be an integer from 1 to 20" in results[1]["content"]
    )
    assert len(searx.queries) == before, "nothing was searched"


def test_search_without_search_url_is_422(http: httpx.Client, fake: FakeUpstream) -> None:
    body = {"model": "gpt", "max_tokens": 64, "messages": USER, "tools": [{"type": "web_search_v1", "name": "search"}]}
    resp = http.post("/v1/messages", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "tools.web.search_url" in error["message"]
    assert fake.requests == [], "refused before the model was called"


def test_decoding_is_capped_against_compression_bombs() -> None:
    bomb = gzip.compress(b"\0" * (10 * MAX_BYTES))
    assert len(bomb) < MAX_BYTES
    with pytest.raises(FetchRefused, match="decoded body is larger"):
        _decompress(bomb, "gzip", MAX_BYTES)
    assert _decompress(gzip.compress(b"hello"), "gzip", MAX_BYTES) == b"hello"
    with pytest.raises(FetchRefused, match="unsupported content encoding"):
        _decompress(b"x", "br", MAX_BYTES)
