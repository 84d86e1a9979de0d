"""code_execution_v1 and `container` over real HTTP: the fake upstream asks for code, a real bubblewrap sandbox
runs it. Retention and the workspace walk are checked in-process at the end (pure functions of the module)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from backstream.api_models import ChatRequest
from backstream.builtin_tools import containers, sandbox
from backstream.config import CodeExecutionSettings, Settings
from backstream.errors import Invalid
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.server import SECRETS, ServerProcess, fake_models
from tests.support.sse import parse_sse

KEY = "bsk_test_sandbox_any_tenant_0123456"
ENV_SECRET = "sandbox-env-secret-never-visible-4711"
SECRETS.update({KEY, ENV_SECRET})
USER = [{"role": "user", "content": "Compute it."}]
TIMEOUT_S = 2.0
CODE_EXECUTION = {
    "timeout_s": TIMEOUT_S,
    "cpu_s": 5,  # above the wall time, so the wall-time test sees the wall-time kill
    "memory_mb": 128,
    "max_output_bytes": 2048,
    "max_dir_bytes": 1024 * 1024,
}


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "store": "sqlite",
        "models": fake_models(fake),
        "auth": {
            "api_keys": [
                {
                    "name": "sbx",
                    "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "tenants": ["*"],
                    "default_tenant": "acme",
                }
            ]
        },
        "tools": {"code_execution": CODE_EXECUTION},
    }
    server = ServerProcess(
        tmp_path_factory.mktemp("sandbox"), config, env={"SANDBOX_TEST_SECRET": ENV_SECRET}, name="sandbox"
    ).start()
    yield server
    server.stop()


def data_dir(server: ServerProcess) -> Path:
    return server.tmp / f"{server.name}-data"


def headers(tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **({"X-Tenant": tenant} if tenant else {})}


def code_call(code: str, language: str = "python", call_id: str = "call_1") -> ToolCall:
    raw = orjson.dumps({"language": language, "code": code}).decode()
    return ToolCall(id=call_id, name="code_execution_v1", arguments=[raw[: len(raw) // 2], raw[len(raw) // 2 :]])


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt", "max_tokens": 64, "messages": USER, "tools": [{"type": "code_execution_v1"}], **extra}


def run_code(
    server: ServerProcess, fake: FakeUpstream, *calls: ToolCall, tenant: str | None = None, **extra: Any
) -> list[dict[str, Any]]:
    """One streamed request whose model calls the tool with `calls`, then answers; the tool_result events."""
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=list(calls)), Reply(tokens=["done"])])
    with (
        server.client() as c,
        c.stream("POST", "/v1/messages", json=body(stream=True, **extra), headers=headers(tenant)) as resp,
    ):
        raw = resp.read()
        assert resp.status_code == 200, raw
    frames = parse_sse(raw)
    assert frames[-1]["data"]["finish_reason"] == "Stop", frames[-1]
    return [f["data"] for f in frames if f["event"] == "tool_result"]


def stdout_of(result: dict[str, Any]) -> str:
    content = result["content"]
    assert "stdout:\n" in content, content
    return content.split("stdout:\n", 1)[1].split("\n\nstderr:", 1)[0]


def test_code_runs_and_its_output_reaches_the_model(srv: ServerProcess, fake: FakeUpstream) -> None:
    py = "import os\nprint(6 * 7, os.getuid(), os.getcwd())"
    results = run_code(srv, fake, code_call(py, "python", "c1"), code_call("echo from-bash; hostname", "bash", "c2"))
    assert [r["is_error"] for r in results] == [False, False]
    assert results[0]["content"].startswith("exit code: 0")
    assert stdout_of(results[0]) == "42 65534 /workspace\n", "uid nobody, working directory /workspace"
    assert stdout_of(results[1]) == "from-bash\nsandbox\n"
    assert results[0]["code_execution"] == {"exit_code": 0, "timed_out": False, "container": None}
    tool_messages = [m for m in fake.requests[-1].body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c1", "c2"]
    assert "42 65534 /workspace" in tool_messages[0]["content"], "the output reaches the model's next request"
    first_tools = fake.requests[-2].body["tools"]
    assert [t["function"]["name"] for t in first_tools] == ["code_execution_v1"]
    assert os.listdir(data_dir(srv) / "containers" / "scratch") == [], "a run without container leaves nothing"


def test_container_keeps_files_per_id_and_per_tenant(srv: ServerProcess, fake: FakeUpstream) -> None:
    write = "open('notes.txt', 'w').write('kept between requests')"
    [written] = run_code(srv, fake, code_call(write), container="proj-1")
    assert "+ notes.txt (21 bytes)" in written["content"]
    host_file = data_dir(srv) / "containers" / "tenants" / "acme" / "proj-1" / "workspace" / "notes.txt"
    assert host_file.read_text() == "kept between requests"
    read = "import os\nprint(open('notes.txt').read() if os.path.exists('notes.txt') else 'missing')"

    # a background run of the same tenant and container (object form) sees the file
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[code_call(read)]), Reply(tokens=["done"])])
    with srv.client() as c:
        resp = c.post("/v1/messages/async", json=body(container={"id": "proj-1"}), headers=headers())
        assert resp.status_code == 200, resp.text
        with c.stream("GET", f"/v1/messages/async/{resp.json()['message_id']}/stream", headers=headers()) as s:
            frames = parse_sse(s.read())
    [again] = [f["data"] for f in frames if f["event"] == "tool_result"]
    assert stdout_of(again) == "kept between requests\n"
    assert again["code_execution"]["container"] == "proj-1"

    [other_id] = run_code(srv, fake, code_call(read), container="proj-2")
    assert stdout_of(other_id) == "missing\n"
    [other_tenant] = run_code(srv, fake, code_call(read), tenant="globex", container="proj-1")
    assert stdout_of(other_tenant) == "missing\n", "another tenant's container of the same id is another folder"


def test_network_is_denied(srv: ServerProcess, fake: FakeUpstream) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "print(socket.if_nameindex())\n"
        f"for host, port in [('127.0.0.1', {port}), ('127.0.0.1', {srv.port}), ('1.1.1.1', 53)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=1)\n"
        "        print('connected', host)\n"
        "    except OSError as exc:\n"
        "        print('denied', host, type(exc).__name__, exc.errno)\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 443)\n"
        "    print('resolved')\n"
        "except OSError as exc:\n"
        "    print('no dns', type(exc).__name__)\n"
    )
    try:
        [result] = run_code(srv, fake, code_call(code))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the listening server
    finally:
        listener.close()
    lines = stdout_of(result).splitlines()
    assert lines[0] == "[(1, 'lo')]", "only a loopback of its own"
    assert lines[1] == "denied 127.0.0.1 ConnectionRefusedError 111"
    assert lines[2] == "denied 127.0.0.1 ConnectionRefusedError 111", "not even Backstream itself"
    assert lines[3] == "denied 1.1.1.1 OSError 101", "network unreachable: no route out"
    assert lines[4] == "no dns gaierror"


def _host_processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def test_wall_time_limit_kills_the_whole_sandbox(srv: ServerProcess, fake: FakeUpstream) -> None:
    started = time.monotonic()
    results = run_code(
        srv,
        fake,
        code_call("sleep 100.4242 & sleep 100.4243; echo never", "bash", "c1"),
        code_call("while True:\n    pass", "python", "c2"),
    )
    elapsed = time.monotonic() - started
    assert elapsed < 2 * TIMEOUT_S + 3, elapsed
    for result in results:
        assert result["is_error"] is True and result["code_execution"]["timed_out"] is True
        assert result["content"].startswith(f"stopped: the wall-time limit of {TIMEOUT_S:g} s was reached")
    assert "never" not in results[0]["content"]
    deadline = time.monotonic() + 5
    while _host_processes_with("100.424") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_processes_with("100.424") == [], "the background sleep died with the sandbox"


def test_memory_and_output_limits(srv: ServerProcess, fake: FakeUpstream) -> None:
    memory = (
        "small = bytearray(32 * 1024 * 1024)\n"
        "print('32 MB ok')\n"
        "try:\n"
        "    big = bytearray(256 * 1024 * 1024)\n"
        "    print('256 MB ok')\n"
        "except MemoryError:\n"
        "    print('256 MB refused')\n"
    )
    flood = "import sys\nprint('x' * 100000)\nsys.stderr.write('e' * 50000)"
    mem, out = run_code(srv, fake, code_call(memory, "python", "c1"), code_call(flood, "python", "c2"))
    assert stdout_of(mem) == "32 MB ok\n256 MB refused\n", "memory_mb is 128"
    assert stdout_of(out).startswith("x" * 2048 + "\n[")
    assert "[97953 more bytes of stdout dropped: output is capped at 2048 bytes]" in out["content"]
    assert "[47952 more bytes of stderr dropped: output is capped at 2048 bytes]" in out["content"]
    assert len(out["content"]) < 2 * 2048 + 500
    sent = [m for m in fake.requests[-1].body["messages"] if m["role"] == "tool"][1]["content"]
    assert len(sent) < 2 * 2048 + 500, "the model gets the capped text too"


def test_host_files_and_environment_are_hidden(srv: ServerProcess, fake: FakeUpstream) -> None:
    paths = [str(data_dir(srv)), str(srv.tmp), "/work", "/root", "/home", "/etc/passwd", "/etc/shadow", "/opt"]
    code = (
        "import json, os\n"
        f"paths = {paths!r}\n"
        "print(json.dumps({\n"
        "    'visible': [p for p in paths if os.path.exists(p)],\n"
        "    'python': os.path.exists('/usr/bin/python3'),\n"
        "    'env': sorted(os.environ),\n"
        "    'secret': any('sandbox-env-secret' in v for v in os.environ.values()),\n"
        "    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
        "    'etc': sorted(os.listdir('/etc')),\n"
        "    'usr_writable': os.access('/usr/bin', os.W_OK),\n"
        "}))\n"
    )
    [result] = run_code(srv, fake, code_call(code))
    seen = orjson.loads(stdout_of(result))
    assert seen["python"] is True, "the read-only system is there"
    assert seen["visible"] == [], "the data dir, /work, /root, /home and /etc secrets are not"
    assert seen["secret"] is False and not any(k.startswith(("SANDBOX_", "BACKSTREAM_")) for k in seen["env"])
    assert set(seen["env"]) <= {"PATH", "HOME", "LANG", "TMPDIR", "PWD", "SHLVL", "_", "LC_CTYPE"}
    assert seen["etc"] == ["alternatives", "ld.so.cache", "localtime"]
    assert seen["pids"][0] == 1 and len(seen["pids"]) <= 3, "a pid namespace of its own"
    assert seen["usr_writable"] is False


def test_workspace_size_limit(srv: ServerProcess, fake: FakeUpstream) -> None:
    keep = "open('keep.txt', 'w').write('small')"
    grow = "for name in ('big1', 'big2'):\n    open(name, 'wb').write(b'x' * 700_000)\nprint('written')"
    kept, grown = run_code(
        srv, fake, code_call(keep, "python", "c1"), code_call(grow, "python", "c2"), container="sizes"
    )
    assert kept["is_error"] is False and grown["is_error"] is True
    assert "went over its limit (1048576 bytes" in grown["content"]
    assert "the files and folders this run added were removed" in grown["content"]
    workspace = data_dir(srv) / "containers" / "tenants" / "acme" / "sizes" / "workspace"
    assert sorted(os.listdir(workspace)) == ["keep.txt"]


@pytest.mark.parametrize(
    "container", ["../etc", "a b", "x" * 65, "", {"id": "no/slash"}, {"name": "no id"}, 42], ids=repr
)
def test_bad_container_id_is_422(srv: ServerProcess, fake: FakeUpstream, container: Any) -> None:
    with srv.client() as c:
        resp = c.post("/v1/messages", json=body(container=container), headers=headers())
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert "container" in error["message"] or "container" in orjson.dumps(error.get("details")).decode()
    assert fake.requests == []


def test_without_bwrap_the_tool_is_refused(fake: FakeUpstream, tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path,
        {"store": "memory", "models": fake_models(fake), "tools": {"code_execution": CODE_EXECUTION}},
        env={"PATH": str(tmp_path)},  # no bwrap on it
        name="no-bwrap",
    ).start()
    try:
        with server.client() as c:
            resp = c.post("/v1/messages", json=body())
            plain = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 8, "messages": USER})
    finally:
        server.stop()
    assert resp.status_code == 422, resp.text
    assert "code_execution_v1 is not available: bubblewrap (bwrap) is not on the server's PATH" in resp.text
    assert plain.status_code == 200, "requests without the tool are unaffected"
    assert len(fake.requests) == 1


# --- in-process: the module's pure parts --------------------------------------------------------------


def test_disabled_and_failing_sandboxes_are_refused() -> None:
    chat = ChatRequest.model_validate(body())
    disabled = Settings.model_validate({"tools": {"code_execution": {"enabled": False}}})
    with pytest.raises(Invalid, match=r"disabled on this server \(tools.code_execution.enabled\)"):
        sandbox.check_request(chat, disabled)
    assert sandbox.probe_failure("/bin/false") == "bwrap cannot create a sandbox here: it failed"
    assert sandbox.probe_failure("/usr/bin/bwrap") is None, "bubblewrap works on this machine"


def test_sweep_removes_expired_containers_only(tmp_path: Path) -> None:
    settings = CodeExecutionSettings(retention_s=100, dir=str(tmp_path))
    now = time.time()
    old = containers.open_workspace(tmp_path, "acme", "old", "s1")
    fresh = containers.open_workspace(tmp_path, "acme", "fresh", "s2")
    busy = containers.open_workspace(tmp_path, "we/ird", "busy", "s3")
    crashed = containers.open_workspace(tmp_path, "acme", None, "left-by-a-crash")
    (old.path / "file").write_text("x")
    for workspace in (old, busy, crashed):
        os.utime(workspace.home, (now - 500, now - 500))

    async def sweep_while_busy() -> list[Path]:
        async with containers.hold(busy):
            return await containers.sweep(settings, "unused", now=now)

    removed = asyncio.run(sweep_while_busy())
    assert sorted(removed) == sorted([old.home, crashed.home])
    assert not old.home.exists() and not crashed.home.exists()
    assert fresh.path.is_dir() and busy.path.is_dir(), "recently used and in-use containers stay"
    assert busy.home.parent.name.startswith("~"), "a tenant that is not a plain id becomes a hashed folder name"
    assert list((tmp_path / "trash").iterdir()) == []


def test_scan_never_follows_links_and_enforce_limit(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("old")
    (tmp_path / "kept-dir").mkdir()
    before = containers.scan(tmp_path)
    (tmp_path / "etc-link").symlink_to("/etc")
    (tmp_path / "new-dir").mkdir()
    (tmp_path / "new-dir" / "big").write_bytes(b"x" * 5000)
    (tmp_path / "kept-dir" / "grew").write_bytes(b"y" * 100)
    after = containers.scan(tmp_path)
    assert set(after.files) == {"old.txt", "etc-link", "new-dir/big", "kept-dir/grew"}, "nothing under /etc"
    assert after.total_bytes == 3 + len("/etc") + 5000 + 100
    assert containers.enforce_limit(tmp_path, before, 1000) is False
    assert sorted(os.listdir(tmp_path)) == ["kept-dir", "old.txt"] and Path("/etc/ld.so.cache").exists()
    assert containers.enforce_limit(tmp_path, before, 50) is True, "still over: emptied"
    assert os.listdir(tmp_path) == []
    assert containers.scan(tmp_path, max_entries=0).truncated is False
    (tmp_path / "a").write_text("a")
    assert containers.scan(tmp_path, max_entries=0).truncated is True
