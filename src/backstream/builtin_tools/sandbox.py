"""`code_execution_v1`: model-written Python or bash, run in a bubblewrap sandbox.

The sandbox (see `bwrap_args`): every namespace unshared (the network one holds only a loopback
with nothing listening: no route out), uid 65534 with no capabilities and no further user
namespaces, /usr (and the /bin, /lib* links) read-only, from /etc only the loader cache and the
alternatives links, a fresh /dev, /proc of its own pid namespace, a size-capped tmpfs at /tmp, an
empty environment but for PATH, HOME, LANG, and the workspace bound at /workspace. The host's data
dir, /root, /work and the server's environment are not there. Limits (setrlimit before exec):
CPU seconds, address space, file size, processes, open files; wall time kills the whole sandbox.

Model-written code never runs without the sandbox: if bwrap is missing or cannot create its
namespaces (probed once per process), the tool is refused with a 422 saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Invalid
from . import containers
from .base import ToolEnv, ToolOutcome

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import CodeExecutionSettings, Settings

TOOL_TYPE = "code_execution_v1"
INTERPRETERS = {
    "python": ["/usr/bin/python3", "-B", "-c"],  # the system Python (not the server's venv): stdlib and Debian packages
    "bash": ["/bin/bash", "--noprofile", "--norc", "-c"],
}
MAX_CODE_BYTES = 100_000  # passed as one argument: Linux allows 128 KiB
MAX_PROCESSES = 256  # RLIMIT_NPROC (counts the server user's processes; the kernel does not apply it to root)
MAX_OPEN_FILES = 256
MAX_PARALLEL = 4  # executions at once per process; more wait their turn
MAX_LISTED_FILES = 30
DIR_CHECK_EVERY_S = 0.5
SANDBOX_UID = "65534"  # nobody
ETC_FILES = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}

_probed: dict[str, str | None] = {}  # bwrap path -> why it cannot sandbox (None: it can)
_slots: asyncio.Semaphore | None = None


def bwrap_args(workspace: str, tmp_bytes: int) -> list[str]:
    """bwrap's options, up to the command: what the sandbox sees and what it is denied."""
    args = ["--unshare-all", "--unshare-user", "--uid", SANDBOX_UID, "--gid", SANDBOX_UID, "--cap-drop", "ALL"]
    args += ["--disable-userns", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for key, value in SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: a link into /usr
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ETC_FILES:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    args += ["--bind", workspace, "/workspace", "--chdir", "/workspace"]
    return args


def probe_failure(bwrap: str | None) -> str | None:
    """Why no sandbox can run here (None: it can). Runs `bwrap … /bin/true` once per bwrap path, then cached.

    Blocking (about 10 ms, once per process): the first request that asks for the tool pays it.
    """
    if bwrap is None:
        return "bubblewrap (bwrap) is not on the server's PATH"
    if bwrap not in _probed:
        with tempfile.TemporaryDirectory(prefix="backstream-probe-") as workspace:
            try:
                done = subprocess.run(
                    [bwrap, *bwrap_args(workspace, 1024 * 1024), "/bin/true"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                    env={"PATH": SANDBOX_ENV["PATH"]},
                )
                why = None if done.returncode == 0 else done.stderr.decode(errors="replace").strip()[:300]
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = str(exc)[:300]
        _probed[bwrap] = None if why is None else f"bwrap cannot create a sandbox here: {why or 'it failed'}"
    return _probed[bwrap]


def unavailable(settings: CodeExecutionSettings) -> str | None:
    if not settings.enabled:
        return "code execution is disabled on this server (tools.code_execution.enabled)"
    return probe_failure(shutil.which("bwrap"))


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """422 when the sandbox cannot run here or the container id is not valid; before anything runs."""
    if not any(t.type == TOOL_TYPE for t in chat.builtin_tools or ()):
        return
    why = unavailable(settings.tools.code_execution)
    if why is not None:
        raise Invalid(f"{TOOL_TYPE} is not available: {why}", "tools")
    containers.container_id(chat)


# --- one execution ----------------------------------------------------------------------------------


@dataclass
class CappedOutput:
    """A stream read to its end, keeping its first `cap` bytes and counting the rest."""

    cap: int
    kept: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = max(self.cap - len(self.kept), 0)
            self.kept += chunk[:room]
            self.dropped += max(len(chunk) - room, 0)

    def text(self) -> str:
        return self.kept.decode(errors="replace")


@dataclass
class Execution:
    stdout: CappedOutput
    stderr: CappedOutput
    exit_code: int | None = None
    timed_out: bool = False
    over_dir_limit: bool = False


def _limits(settings: CodeExecutionSettings) -> Callable[[], None]:
    """The child's limits, set between fork and exec (setrlimit only: nothing that can take a lock)."""
    memory = settings.memory_mb * 1024 * 1024
    pairs = [
        (resource.RLIMIT_CPU, (settings.cpu_s, settings.cpu_s + 1)),  # SIGXCPU, then SIGKILL a second later
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (settings.max_dir_bytes, settings.max_dir_bytes)),
        (resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES)),
        (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]

    def apply() -> None:
        for which, value in pairs:
            resource.setrlimit(which, value)

    return apply


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill bwrap's process group; the sandbox's pid namespace dies with it (--die-with-parent, pid 1 gone)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _watch_dir(workspace: containers.Workspace, limit: int, proc: asyncio.subprocess.Process) -> bool:
    """Kill the run as soon as its workspace grows past `limit` bytes or MAX_ENTRIES entries."""
    while proc.returncode is None:
        await asyncio.sleep(DIR_CHECK_EVERY_S)
        usage = await asyncio.to_thread(containers.scan, workspace.path)
        if usage.truncated or usage.total_bytes > limit:
            _kill(proc)
            return True
    return False


async def run_sandboxed(
    argv: list[str], workspace: containers.Workspace, settings: CodeExecutionSettings, dir_limit: int
) -> Execution:
    """Run `argv` in the sandbox: output read as it comes (capped), wall time enforced, always reaped."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None  # unavailable() was checked
    tmp_bytes = min(settings.max_dir_bytes, settings.memory_mb * 1024 * 1024)
    run = Execution(CappedOutput(settings.max_output_bytes), CappedOutput(settings.max_output_bytes))
    proc = await asyncio.create_subprocess_exec(
        bwrap,
        *bwrap_args(str(workspace.path), tmp_bytes),
        "--",
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": SANDBOX_ENV["PATH"]},
        start_new_session=True,  # its own process group, killed as one
        preexec_fn=_limits(settings),
    )
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(run.stdout.drain(proc.stdout), run.stderr.drain(proc.stderr))
    watcher = asyncio.create_task(_watch_dir(workspace, dir_limit, proc))
    try:
        async with asyncio.timeout(settings.timeout_s):
            await asyncio.shield(readers)
            run.exit_code = await proc.wait()
    except TimeoutError:
        run.timed_out = True
    finally:  # also when the run is cancelled: nothing outlives the call
        _kill(proc)
        watcher.cancel()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):  # the pipes close once the namespace is gone
                    await asyncio.shield(readers)
        finally:
            readers.cancel()
            await proc.wait()
    run.over_dir_limit = watcher.done() and not watcher.cancelled() and watcher.exception() is None and watcher.result()
    return run


# --- the tool ---------------------------------------------------------------------------------------

DESCRIPTION = (
    "Run Python 3 or bash code in an isolated sandbox; you get the exit code, stdout, stderr and the files it "
    "changed. The working directory is /workspace: files written there are kept for later calls (and for later "
    "requests that name the same container). There is no network access; wall time, CPU, memory and output are "
    "limited. Print what you want to see."
)
INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "language": {"type": "string", "enum": ["python", "bash"], "description": "python (3) or bash"},
        "code": {"type": "string", "description": "the program; it runs in /workspace"},
    },
    "required": ["language", "code"],
    "additionalProperties": False,
}
_ALIASES = {"python": "python", "python3": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


def _command(arguments: dict[str, Any]) -> list[str] | str:
    """The sandboxed command for the model's arguments, or why they are not acceptable."""
    language = _ALIASES.get(str(arguments.get("language", "python")).lower())
    code = arguments.get("code")
    if language is None:
        return "language must be python or bash"
    if not isinstance(code, str) or not code.strip():
        return "code must be a non-empty string"
    if "\x00" in code:
        return "code must not contain NUL characters"
    if len(code.encode()) > MAX_CODE_BYTES:
        return f"code is limited to {MAX_CODE_BYTES} bytes; write longer programs to files in /workspace in parts"
    return [*INTERPRETERS[language], code]


def _exit_note(code: int | None, settings: CodeExecutionSettings) -> str:
    if code is None or code <= 128:
        return ""
    try:
        name = signal.Signals(code - 128).name
    except ValueError:
        return ""
    why = {
        "SIGXCPU": f"the CPU limit of {settings.cpu_s} s",
        "SIGXFSZ": f"the file size limit of {settings.max_dir_bytes} bytes",
        "SIGKILL": f"the CPU limit of {settings.cpu_s} s or the memory limit of {settings.memory_mb} MB",
    }.get(name)
    return f" (killed by {name}" + (f": probably {why})" if why else ")")


def _stream_text(name: str, output: CappedOutput) -> str:
    text = output.text()
    body = f"{name}:\n{text}" if text else f"{name}: (empty)"
    if output.dropped:
        body += f"\n[{output.dropped} more bytes of {name} dropped: output is capped at {output.cap} bytes]"
    return body


def _files_text(before: containers.Scan, after: containers.Scan) -> str:
    """The files a run added (+), changed (~) or removed (-), at most MAX_LISTED_FILES of them."""
    changes = [f"+ {n} ({after.files[n][0]} bytes)" for n in sorted(after.files.keys() - before.files.keys())]
    changes += [f"~ {n} ({s[0]} bytes)" for n, s in sorted(after.files.items()) if before.files.get(n, s) != s]
    changes += [f"- {n}" for n in sorted(before.files.keys() - after.files.keys())]
    if not changes:
        return "files changed in /workspace: none"
    listed = "\n".join(changes[:MAX_LISTED_FILES])
    more = f"\n(and {len(changes) - MAX_LISTED_FILES} more)" if len(changes) > MAX_LISTED_FILES else ""
    partial = "\n(the workspace holds too many entries to list them all)" if after.truncated else ""
    return f"files changed in /workspace:\n{listed}{more}{partial}"


def _report(run: Execution, before: containers.Scan, after: containers.Scan, settings: CodeExecutionSettings) -> str:
    if run.timed_out:
        head = f"stopped: the wall-time limit of {settings.timeout_s:g} s was reached"
    elif run.over_dir_limit:
        head = f"stopped: the workspace grew past its limit of {settings.max_dir_bytes} bytes"
    else:
        head = f"exit code: {run.exit_code}{_exit_note(run.exit_code, settings)}"
    return "\n\n".join(
        [head, _stream_text("stdout", run.stdout), _stream_text("stderr", run.stderr), _files_text(before, after)]
    )


class CodeExecution:
    """One run's code_execution_v1: its workspace (the container's, or a scratch folder removed at the end)."""

    description = DESCRIPTION
    input_schema = INPUT_SCHEMA

    def __init__(self) -> None:
        self.scratch_id = os.urandom(16).hex()
        self.scratch: containers.Workspace | None = None

    async def start(self, env: ToolEnv) -> None:
        settings = env.settings.code_execution
        why = await asyncio.to_thread(unavailable, settings)  # cached: check_request probed already
        if why is not None:
            raise RuntimeError(why)  # never run model-written code without the sandbox
        await containers.sweep(settings, env.data_dir)

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        global _slots
        argv = _command(arguments)
        if isinstance(argv, str):
            return ToolOutcome(argv, True)
        settings = env.settings.code_execution
        root = containers.root_dir(settings, env.data_dir)
        workspace = containers.open_workspace(root, env.tenant, containers.container_id(env.request), self.scratch_id)
        if workspace.container is None:
            self.scratch = workspace
        _slots = _slots or asyncio.Semaphore(MAX_PARALLEL)
        async with containers.hold(workspace), _slots:
            return await self._execute(argv, workspace, settings)

    async def _execute(
        self, argv: list[str], workspace: containers.Workspace, settings: CodeExecutionSettings
    ) -> ToolOutcome:
        before = await asyncio.to_thread(containers.scan, workspace.path)
        dir_limit = max(settings.max_dir_bytes, before.total_bytes)  # a workspace already over may shrink, not grow
        run = await run_sandboxed(argv, workspace, settings, dir_limit)
        after = await asyncio.to_thread(containers.scan, workspace.path)
        text = _report(run, before, after, settings)
        over = run.over_dir_limit or after.truncated or after.total_bytes > dir_limit
        if over:
            emptied = await asyncio.to_thread(containers.enforce_limit, workspace.path, before, dir_limit)
            removed = "everything in it was removed" if emptied else "the files and folders this run added were removed"
            text += (
                f"\n\nThe workspace went over its limit ({settings.max_dir_bytes} bytes or "
                f"{containers.MAX_ENTRIES} entries): {removed}."
            )
        containers.touch(workspace)
        extra = {"exit_code": run.exit_code, "timed_out": run.timed_out, "container": workspace.container}
        return ToolOutcome(text, run.timed_out or over, {"code_execution": extra})

    async def aclose(self) -> None:
        if self.scratch is not None:
            await asyncio.to_thread(containers.remove_tree, self.scratch.home)


TOOLS = {TOOL_TYPE: CodeExecution}
