"""Start-up checks and banner, and uvicorn's server with a shutdown in the order durable streams need.

Start-up: everything that commonly stops a server from starting (an unwritable data
directory, an unreachable Redis, a port in use) is checked before uvicorn starts, so
that each is one line naming what and where (`StartupError`; the CLI exits with 2),
never a traceback. Then the banner says what is being served: version, URL, store and
where its data lives, the model table (with warnings such as a missing key variable),
the auth and egress modes.

Shutdown:
uvicorn on SIGTERM stops accepting, waits for connections to finish, cuts the rest
after a timeout, and only then runs the application's shutdown. Watchers of
background runs never finish by themselves, so they were cut without a final
event. Here the application drains first: stop accepting, end or hand back the
runs (their watchers receive stream_end, or a clean close they can resume from),
then let uvicorn close what is left, all within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from . import __version__, tracing
from .config import ModelConfig, Settings, is_loopback

log = logging.getLogger("backstream.serve")


class StartupError(Exception):
    """The server cannot start; the message names what and where, on one line."""


def preflight(settings: Settings) -> None:
    """The store's dependencies, checked before anything starts: a data directory we can write, a Redis that answers."""
    if settings.workers > 1 and settings.store != "redis":
        raise StartupError(
            f"workers: {settings.workers} needs store: redis (the {settings.store} store lives in one process, "
            "so a run started on one worker could not be watched from another); use one worker, or Redis"
        )
    if settings.store == "sqlite":
        _check_data_dir(settings.data_path)
    elif settings.store == "redis":
        _check_redis(settings.redis.url)
    tracing.check(settings.tracing)  # tracing wanted without the otel extra: one line, not a traceback


def _check_data_dir(path: Path) -> None:
    where = path.resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        db = path / "backstream.db"
        if db.is_dir():
            raise IsADirectoryError(21, f"{db.name} is a directory")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PermissionError(13, f"{db.name} is not readable and writable")
    except OSError as exc:
        raise StartupError(
            f"cannot use the data directory {where}: {exc.strerror or exc} (store: sqlite; choose another with "
            "--data-dir or BACKSTREAM_DATA_DIR)"
        ) from None


def redis_address(url: str) -> str:
    """The URL without credentials: fit for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StartupError(f"cannot reach Redis at {redis_address(url)} (store: redis): {reason}") from None
    finally:
        client.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now so that a port in use is a clear error (and port 0 a known port)."""
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another with --port)"
        ) from None
    return sock


def banner(settings: Settings, sock: socket.socket) -> None:
    """What is being served, one log line per item; a model that cannot be called is a warning."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    workers = f" ({settings.workers} worker processes)" if settings.workers > 1 else ""
    log.info("Backstream %s serving on http://%s:%d%s", __version__, shown, port, workers)
    log.info("store: %s", _store_line(settings))
    for config in settings.models:
        line, warning = _model_line(settings, config)
        if warning:
            log.warning("%s; %s", line, warning)
        else:
            log.info("%s", line)
    log.info("auth: %s", _auth_line(settings))
    egress = settings.egress
    allowed = f"; allow_hosts: {', '.join(egress.allow_hosts)}" if egress.allow_hosts else ""
    reach = "any address (egress.allow_private)" if egress.allow_private else "public addresses only"
    log.info("egress: request-supplied URLs (MCP servers) may reach %s%s", reach, allowed)
    log.info(
        "log: level %s, format %s, access lines %s",
        settings.log.level,
        settings.log.format,
        "on" if settings.log.access else "off",
    )


def _store_line(settings: Settings) -> str:
    if settings.store == "sqlite":
        return f"sqlite, data in {(settings.data_path / 'backstream.db').resolve()}"
    if settings.store == "redis":
        return f"redis at {redis_address(settings.redis.url)} (key prefix {settings.redis.key_prefix})"
    return "memory (nothing survives a restart)"


def _model_line(settings: Settings, config: ModelConfig) -> tuple[str, str | None]:
    aliases = f" (aliases: {', '.join(config.aliases)})" if config.aliases else ""
    default = " [default]" if config.name == settings.default_model else ""
    fallbacks = f", fallbacks: {', '.join(config.fallbacks)}" if config.fallbacks else ""
    if config.provider == "local":
        from .providers.local import default_model_path

        path = Path(config.path) if config.path else default_model_path()
        line = f"model {config.name}{aliases}{default} -> local {path or '(built-in model not installed)'}{fallbacks}"
        missing = path is None or not path.is_file()
        return line, "warning: the model file is missing (`backstream install-local-model`)" if missing else None
    target = f"{config.upstream_model} at {config.base_url or 'the provider default URL'}"
    line = f"model {config.name}{aliases}{default} -> {config.provider} {target}{fallbacks}"
    var = config.api_key_env
    if var and not os.environ.get(var):
        return line, f"warning: its key variable {var} is not set: requests answer 503 model_unavailable"
    return line, None


def _auth_line(settings: Settings) -> str:
    auth = settings.auth
    if auth.enabled:
        kinds = [f"{len(auth.api_keys)} API key(s)"] if auth.api_keys else []
        if auth.jwt is not None:
            kinds.append(f"JWT (issuer {auth.jwt.issuer})")
        return "required: " + ", ".join(kinds)
    if is_loopback(settings.host):
        return "none (loopback only)"
    return "none (--insecure-no-auth: something in front must authenticate)"


class _StartupErrorsOnOneLine(logging.Filter):
    """While the application starts, a failure is one line (what failed and why), not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg, record.args = "start-up failed: %s: %s", (type(exc).__name__, exc)
            record.exc_info, record.exc_text = None, None
        elif isinstance(record.msg, str) and record.msg.startswith("Traceback (most recent call last)"):
            record.msg, record.args = "start-up failed: %s", (record.msg.strip().splitlines()[-1],)
        return True


DRAIN_SHARE = 0.8  # of the grace period for runs and watchers; the rest for other connections


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains runs and watchers before connections are closed."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], grace_s: float) -> None:
        config.timeout_graceful_shutdown = max(1, int(grace_s * (1 - DRAIN_SHARE)))
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        uvicorn_log = logging.getLogger("uvicorn.error")
        one_line = _StartupErrorsOnOneLine()
        uvicorn_log.addFilter(one_line)
        try:
            await super().startup(sockets)
        finally:
            uvicorn_log.removeFilter(one_line)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while runs are ended; uvicorn closes again, harmlessly
        budget = self.grace_s * DRAIN_SHARE
        try:
            await asyncio.wait_for(self.drain(budget), budget + 1)
        except Exception as exc:  # shutdown goes on: recovery or a peer's takeover ends what is left
            log.warning("draining runs did not finish (%s: %s)", type(exc).__name__, exc)
        await super().shutdown(sockets)


# --- several worker processes behind one socket ---------------------------------------------
RESTART_WINDOW_S = 10.0  # more than RESTART_LIMIT unexpected exits within this: give up
RESTART_LIMIT = 5


def run_workers(count: int, serve_one: Callable[[], None]) -> int:
    """Fork `count` workers that share the bound socket (the kernel spreads connections); returns the exit status.

    Each worker is a full server (with the Redis store they are simply replicas). The parent
    only supervises: SIGTERM or SIGINT is passed on as SIGTERM (each worker drains its runs),
    and a worker that dies unexpectedly is replaced, unless they keep dying.
    """
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for number in range(count):
        children[_fork_worker(serve_one)] = number
    exits: deque[float] = deque(maxlen=RESTART_LIMIT + 1)
    status = 0
    while children:
        try:
            pid, raw = os.wait()  # PEP 475: resumed after a signal handler runs
        except ChildProcessError:
            break
        worker = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(raw)
        if worker < 0 or stopping:
            status = max(status, code if code > 0 else 0)
            continue
        exits.append(time.monotonic())
        if len(exits) > RESTART_LIMIT and exits[-1] - exits[0] < RESTART_WINDOW_S:
            log.error("workers keep exiting (%d in %.0f s); stopping", len(exits), RESTART_WINDOW_S)
            stop(signal.SIGTERM, None)
            status = 2
            continue
        log.warning("worker %d (pid %d) exited with status %d; starting another", worker, pid, code)
        children[_fork_worker(serve_one)] = worker
    return status


def _fork_worker(serve_one: Callable[[], None]) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The worker: default signal handling (uvicorn installs its own), serve, and never return into the parent's code.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 1
    try:
        serve_one()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)
