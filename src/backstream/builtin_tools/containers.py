"""Working directories of code_execution_v1: one per tenant and `container` id, kept until its retention ends.

Layout under `tools.code_execution.dir` (default `<data_dir>/containers`):

    tenants/<tenant>/<container id>/workspace   bound at /workspace; the id folder's mtime is the last use
    scratch/<random>/workspace                  a run without `container`, removed when the run ends
    trash/<random>                              an expired folder, renamed here first and then removed

Nothing here follows a symbolic link: sandboxed code may leave links to anywhere in a workspace.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Invalid

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import CodeExecutionSettings

CONTAINER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ENTRIES = 10_000  # files and folders a workspace may hold; walks stop just past it, so every walk is bounded
SWEEP_EVERY_S = 60.0  # at most one sweep per process this often (sooner when retention is shorter)
SWEEP_MAX_SCANNED = 20_000  # folder entries one sweep looks at
SWEEP_MAX_REMOVED = 20  # expired folders one sweep removes; the rest wait for the next

_holders: dict[Path, int] = {}  # container folder -> runs using it now (a sweep never removes those)
_locks: dict[Path, asyncio.Lock] = {}  # one execution at a time per container
_last_sweep = -float("inf")


def container_id(chat: ChatRequest) -> str | None:
    """The request's container id (`"id"` or `{"id": "id"}`); errors.Invalid (422) when it is not a valid id."""
    value = chat.container
    if value is None:
        return None
    where = "container"
    if isinstance(value, dict):
        value, where = value.get("id"), "container.id"
    if not isinstance(value, str) or not CONTAINER_ID.fullmatch(value):
        raise Invalid("a container id is 1-64 characters of letters, digits, '_' and '-'", where)
    return value


def root_dir(settings: CodeExecutionSettings, data_dir: str) -> Path:
    return Path(os.path.abspath(settings.dir or os.path.join(data_dir, "containers")))


def tenant_dir_name(tenant: str) -> str:
    """A tenant as one safe folder name: itself when it is a plain id, else `~` and a hash (`~` is never in an id)."""
    if CONTAINER_ID.fullmatch(tenant):
        return tenant
    return "~" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


@dataclass
class Workspace:
    """The folder bound at /workspace, and the folder that owns it (removed on expiry or after a scratch run)."""

    path: Path
    home: Path
    container: str | None


def open_workspace(root: Path, tenant: str, container: str | None, scratch_id: str) -> Workspace:
    """Create (or reuse) the workspace folder: the container's, else this run's scratch folder `scratch_id`.

    Quick syscalls only, on the event loop, so a sweep (which renames on the loop too) cannot interleave.
    """
    if container is None:
        home = root / "scratch" / scratch_id
    else:
        home = root / "tenants" / tenant_dir_name(tenant) / container
    path = home / "workspace"
    path.mkdir(parents=True, exist_ok=True)
    os.utime(home)  # the last use: a sweep keeps the folder until retention_s after this
    return Workspace(path, home, container)


def touch(workspace: Workspace) -> None:
    try:
        os.utime(workspace.home)
    except FileNotFoundError:
        pass


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove a folder and what it holds; links are removed, never followed (shutil.rmtree on Linux uses fds)."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


@asynccontextmanager
async def hold(workspace: Workspace) -> AsyncIterator[None]:
    """Use a workspace: one execution at a time per container; a sweep skips it meanwhile."""
    home = workspace.home
    _holders[home] = _holders.get(home, 0) + 1
    lock = _locks.setdefault(home, asyncio.Lock())
    try:
        async with lock:
            yield
    finally:
        _holders[home] -= 1
        if _holders[home] == 0:
            del _holders[home]
            _locks.pop(home, None)


# --- walking a workspace ----------------------------------------------------------------------------


@dataclass
class Scan:
    """What a workspace holds: path -> (size, mtime_ns), for at most MAX_ENTRIES entries."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    top: set[str] = field(default_factory=set)  # names at the top of the workspace, folders included
    total_bytes: int = 0
    entries: int = 0
    truncated: bool = False  # more than MAX_ENTRIES: `files` is incomplete


def scan(path: Path, max_entries: int = MAX_ENTRIES) -> Scan:
    """Walk a workspace without following links. Blocking: call it in a thread."""
    result = Scan()
    stack = [(str(path), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                result.entries += 1
                if result.entries > max_entries:
                    result.truncated = True
                    return result
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                rel = prefix + entry.name
                if not prefix:
                    result.top.add(entry.name)
                if stat.S_ISDIR(info.st_mode):
                    stack.append((entry.path, rel + "/"))
                    continue
                result.files[rel] = (info.st_size, info.st_mtime_ns)
                result.total_bytes += info.st_size
    return result


def enforce_limit(path: Path, before: Scan, limit: int) -> bool:
    """Bring a workspace a run left too big back under its limits. Blocking: call it in a thread.

    First what the run added at the top goes (the folders it created, whole). If that is not enough
    (it grew what was there before), the workspace is emptied. Returns whether it was emptied.
    """
    _remove_top_entries(path, keep=before.top)
    now = scan(path)
    if not now.truncated and now.total_bytes <= limit:
        return False
    _remove_top_entries(path, keep=set())
    return True


def _remove_top_entries(path: Path, keep: set[str]) -> None:
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if name not in keep:
            remove_tree(path / name)


# --- retention --------------------------------------------------------------------------------------


def _expired(root: Path, cutoff: float) -> list[Path]:
    """Container and scratch folders last used before `cutoff`, and leftovers in trash. Bounded. Blocking."""
    found: list[Path] = []
    scanned = 0
    folders = [root / "scratch", root / "trash"]
    try:
        folders += [p for p in (root / "tenants").iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        pass
    for folder in folders:
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                scanned += 1
                if scanned > SWEEP_MAX_SCANNED or len(found) >= SWEEP_MAX_REMOVED:
                    return found
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if folder.name == "trash" or mtime < cutoff:
                    found.append(Path(entry.path))
    return found


async def sweep(settings: CodeExecutionSettings, data_dir: str, now: float | None = None) -> list[Path]:
    """Remove folders unused for `retention_s` (at most one sweep a minute per process, bounded work each).

    The folders in use are skipped. An expired folder is renamed into trash on the event loop (one quick
    syscall, so it never races `open_workspace`) and deleted in a thread. Returns the folders removed.
    """
    global _last_sweep
    clock = time.monotonic()
    if now is None and clock - _last_sweep < min(SWEEP_EVERY_S, settings.retention_s):
        return []
    _last_sweep = clock
    root = root_dir(settings, data_dir)
    cutoff = (time.time() if now is None else now) - settings.retention_s
    candidates = await asyncio.to_thread(_expired, root, cutoff)
    trash = root / "trash"
    moved: list[Path] = []
    removed: list[Path] = []
    for path in candidates:
        if path.parent == trash:
            moved.append(path)
            continue
        try:
            if path in _holders or path.lstat().st_mtime >= cutoff:
                continue  # in use, or used since it was found
            trash.mkdir(parents=True, exist_ok=True)
            target = trash / uuid.uuid4().hex
            path.rename(target)
        except OSError:
            continue
        moved.append(target)
        removed.append(path)
    await asyncio.to_thread(_remove_all, moved)
    return removed
