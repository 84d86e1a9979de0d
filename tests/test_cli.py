"""The client commands as a user runs them: `python -m backstream chat|runs …` subprocesses against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

from backstream import __version__
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.replicas import sqlite_server
from tests.support.runs import check_run, slow, wait_events
from tests.support.server import ServerProcess


def bs(
    *args: str, url: str | None = None, check: bool = True, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m backstream ARGS`, with BACKSTREAM_URL set to `url` (no other BACKSTREAM_ variable leaks in)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
    if url:
        environ["BACKSTREAM_URL"] = url
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "backstream", *args], capture_output=True, text=True, env=environ, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def ndjson(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def test_version() -> None:
    assert bs("--version").stdout.strip() == f"backstream {__version__}"


def test_chat_prints_the_tokens(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["Hello", ",", " world", "!"]))
    proc = bs("chat", "hi there", "--model", "gpt", "--max-tokens", "16", "--system", "be brief", url=server.url)
    assert proc.stdout == "Hello, world!\n"
    assert "Stop" in proc.stderr, "the status line"
    body = fake.requests[-1].body
    assert body["max_tokens"] == 16 and body["messages"][0] == {"role": "system", "content": "be brief"}
    events = ndjson(bs("chat", "hi", "--model", "gpt", "--json", "--url", server.url).stdout)
    assert [e["type"] for e in events][0] == "stream_start" and events[-1]["type"] == "stream_end"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_runs_start_watch_result_status_cancel_delete(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["one", " two", " three"]))
    started = ndjson(bs("runs", "start", "count", "--model", "gpt", "--json", url=server.url).stdout)[0]
    mid = started["message_id"]
    assert started["status"] == "pending"
    watched = ndjson(bs("runs", "watch", mid, "--json", url=server.url).stdout)
    assert watched[-1]["type"] == "stream_end" and [e["seq"] for e in watched] == list(range(1, len(watched) + 1))
    with server.client() as c:
        stored = check_run(c, mid)
    assert [(e["seq"], e["type"], e["data"]) for e in watched] == [(f["id"], f["event"], f["data"]) for f in stored]
    assert bs("runs", "watch", mid, url=server.url).stdout == "one two three\n"
    after = ndjson(bs("runs", "watch", mid, "--after", "3", "--json", url=server.url).stdout)
    assert after[0]["seq"] == 4
    result = orjson.loads(bs("runs", "result", mid, "--json", url=server.url).stdout)
    assert result["status"] == "completed" and result["content"] == [{"type": "text", "text": "one two three"}]
    assert "one two three" in bs("runs", "result", mid, url=server.url).stdout
    assert orjson.loads(bs("runs", "status", mid, "--json", url=server.url).stdout)["status"] == "completed"
    conflict = bs("runs", "cancel", mid, url=server.url, check=False)
    assert conflict.returncode == 1 and "409" in conflict.stderr and "request" in conflict.stderr
    bs("runs", "delete", mid, url=server.url)
    gone = bs("runs", "status", mid, "--json", url=server.url, check=False)
    assert gone.returncode == 1 and "404" in gone.stderr


def test_runs_cancel_and_bad_requests(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(300, 0.02))
    mid = bs("runs", "start", "go", "--model", "gpt", url=server.url).stdout.strip()
    with server.client() as c:
        wait_events(c, mid, 5)
        assert orjson.loads(bs("runs", "cancel", mid, "--json", url=server.url).stdout)["message_id"] == mid
        check_run(c, mid)
    assert orjson.loads(bs("runs", "result", mid, "--json", url=server.url).stdout)["finish_reason"] == "Cancelled"
    bad = bs("runs", "start", "x", "--model", "no-such-model", url=server.url, check=False)
    assert bad.returncode == 2 and "422" in bad.stderr
    down = bs("runs", "status", "msg_x", "--url", "http://127.0.0.1:9", check=False, timeout=30)
    assert down.returncode != 0 and "Traceback" not in down.stderr


def test_runs_watch_resumes_across_a_restart(fake: FakeUpstream, tmp_path: Path) -> None:
    """`runs watch` keeps going when the server is stopped and started again mid-run: no gap, no repeat."""
    fake.script("gpt-one-up", slow(300, 0.02))
    srv = sqlite_server(fake, tmp_path, name="cli-resume").start()
    try:
        mid = bs("runs", "start", "go", "--model", "gpt-one", url=srv.url).stdout.strip()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
        watch = subprocess.Popen(
            [sys.executable, "-m", "backstream", "runs", "watch", mid, "--json", "--url", srv.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        with srv.client() as c:
            wait_events(c, mid, 10)
        srv.kill()
        srv.start()
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        with srv.client() as c:
            stored = check_run(c, mid)
        events = ndjson(out)
        assert [(e["seq"], e["type"]) for e in events] == [(f["id"], f["event"]) for f in stored]
    finally:
        srv.stop()


def test_runs_list_follows_the_server(server: ServerProcess, fake: FakeUpstream) -> None:
    """Lists every page when the server has the listing endpoint; otherwise says so in one line."""
    listing = httpx.get(server.url + "/v1/messages/async", params={"limit": 1})
    proc = bs("runs", "list", "--json", "--limit", "2", url=server.url, check=False)
    if listing.status_code == 200:
        assert proc.returncode == 0 and isinstance(orjson.loads(proc.stdout), list), proc.stderr
    else:
        assert proc.returncode == 1 and "cannot list runs" in proc.stderr and "Traceback" not in proc.stderr
