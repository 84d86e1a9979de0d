"""Checks for a built wheel, with the standard library only.

wheel_check.py contents WHEEL SRC_PACKAGE_DIR   every run-time file of the package is in the wheel
wheel_check.py serve BACKSTREAM_EXE WORKDIR     `backstream serve` answers a streamed local-model request
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path


def contents(wheel: str, src: str) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    root = Path(src)
    want = {
        f"{root.name}/{p.relative_to(root).as_posix()}"
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }
    missing = sorted(want - names)
    if missing:
        sys.exit(f"wheel lacks {len(missing)} package file(s), declare them as package data: {missing}")
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    if "backstream = backstream.cli:main" not in zipfile.ZipFile(wheel).read(entry).decode():
        sys.exit("wheel has no `backstream` console script")
    print(f"wheel holds all {len(want)} files of {root.name}/ and the console script")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def stream_events(port: int) -> list[str]:
    body = {"max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"POST /v1/messages: {resp.status} {resp.read()[:500]!r}")
    events = []
    for line in resp:
        if line.startswith(b"event:"):
            events.append(line.split(b":", 1)[1].strip().decode())
            if events[-1] == "stream_end":
                break
    return events


def docs_assets(port: int) -> None:
    """/docs and /redoc load their scripts from the server (the fastapi-offline package): installed with the wheel."""
    for path in ("/docs", "/redoc", "/docs/static/swagger-ui-bundle.js", "/docs/static/redoc.standalone.js"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200 or not resp.read():
            raise RuntimeError(f"GET {path}: {resp.status}")


def serve(exe: str, workdir: str) -> None:
    port = free_port()
    log = open(Path(workdir) / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}  # defaults only
    proc = subprocess.Popen(
        [exe, "serve", "--port", str(port)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(port, proc)
        docs_assets(port)
        events = stream_events(port)
        if not events or events[0] != "stream_start" or events[-1] != "stream_end" or "text_delta" not in events:
            raise RuntimeError(f"unexpected events: {events}")
        print(f"backstream serve (pid {proc.pid}) streamed {len(events)} events, ending with stream_end")
    except Exception as exc:
        sys.stderr.write((Path(workdir) / "server.log").read_text(errors="replace")[-3000:])
        sys.exit(f"wheel smoke test failed: {exc}")
    finally:
        proc.terminate()  # by PID: SIGTERM, the graceful stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    {"contents": contents, "serve": serve}[sys.argv[1]](*sys.argv[2:])
