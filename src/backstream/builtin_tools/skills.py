"""Skills: `skill_list_v1`, `skill_load_v1`, `skill_unload_v1` and `maximum_loaded_skills`.

A skill is a name, a description and instructions. Skills come from the operator's
folder (`tools.skills_dir`: one sub-folder per skill with a `SKILL.md` whose YAML front
matter has `name` and `description` and whose body is the instructions) and from
`{"type": "skill", "name", "description", "instructions"}` artifacts in the request's
`tool_context` (an artifact replaces a folder skill of the same name).

A loaded skill's instructions join the system prompt of the following model calls
(`env.system_additions["skill:<name>"]`, in load order). `maximum_loaded_skills` caps
how many stay loaded: loading one more evicts the one loaded longest ago. Loading a
skill that is already loaded changes nothing, not even its place in the eviction order.
In a conversation the loaded set is rebuilt from the history's successful load and
unload calls, so a follow-up request continues with the same skills.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat as stat_kind
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Invalid
from .base import ToolEnv, ToolOutcome, artifacts

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import Settings

log = logging.getLogger("backstream.tools")

MAX_SKILL_BYTES = 256 * 1024  # one SKILL.md or one artifact's instructions
MAX_SKILLS = 256  # skills taken from the folder, and skill artifacts in one request
MAX_DIR_ENTRIES = 4 * MAX_SKILLS  # folder entries looked at, so a huge folder cannot stall a run
MAX_DESCRIPTION = 1024
MAX_NAMES_IN_DESCRIPTION = 2048  # characters of skill names listed in skill_load_v1's description
SKILL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ARTIFACT_KEYS = {"type", "name", "description", "instructions"}
STATE_KEY = "skills"
LOAD, UNLOAD = "skill_load_v1", "skill_unload_v1"


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    instructions: str


@dataclass
class SkillState:
    """The run's skills: what is available, and what is loaded (oldest first)."""

    catalogue: dict[str, Skill]
    cap: int | None
    loaded: list[str] = field(default_factory=list)

    def load(self, name: str, env: ToolEnv) -> tuple[bool, list[str]]:
        """Load a skill: (whether it was newly loaded, the skills evicted to stay within the cap)."""
        if name in self.loaded:
            return False, []
        self.loaded.append(name)
        skill = self.catalogue[name]
        env.system_additions[f"skill:{name}"] = f"# Skill: {name}\n\n{skill.instructions}"
        evicted: list[str] = []
        while self.cap is not None and len(self.loaded) > self.cap:
            evicted.append(self.loaded[0])
            self.unload(self.loaded[0], env)
        return True, evicted

    def unload(self, name: str, env: ToolEnv) -> bool:
        if name not in self.loaded:
            return False
        self.loaded.remove(name)
        env.system_additions.pop(f"skill:{name}", None)
        return True

    def unknown(self, name: Any) -> ToolOutcome:
        available = ", ".join(self.catalogue) or "none"
        return ToolOutcome(f"unknown skill {name!r}; available skills: {available}", is_error=True)


# --- skill artifacts in tool_context ---------------------------------------------------


def _check_text(value: Any, where: str, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"a skill artifact needs {what} as a non-empty string", where)
    if len(value.encode()) > limit:
        raise Invalid(f"a skill artifact's {what} is longer than {limit} bytes", where)
    return value.strip()


def _artifact_skill(item: dict[str, Any], where: str) -> Skill:
    extra = sorted(set(item) - ARTIFACT_KEYS)
    if extra:
        raise Invalid(f"a skill artifact has unknown field {extra[0]!r}", f"{where}.{extra[0]}")
    name = item.get("name")
    if not isinstance(name, str) or not SKILL_NAME.fullmatch(name):
        raise Invalid(
            "a skill name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit", f"{where}.name"
        )
    description = _check_text(item.get("description"), f"{where}.description", "description", MAX_DESCRIPTION)
    instructions = _check_text(item.get("instructions"), f"{where}.instructions", "instructions", MAX_SKILL_BYTES)
    return Skill(name, description, instructions)


def artifact_skills(tool_context: Any) -> list[Skill]:
    """The skill artifacts of a request's tool_context; errors.Invalid naming the field of a malformed one."""
    skills: dict[str, Skill] = {}
    for where, item in artifacts(tool_context):
        if not isinstance(item, dict) or item.get("type") != "skill":
            continue  # other tools' artifacts
        skill = _artifact_skill(item, where)
        if skill.name in skills:
            raise Invalid(f"skill {skill.name!r} is given more than once in tool_context", f"{where}.name")
        if len(skills) >= MAX_SKILLS:
            raise Invalid(f"at most {MAX_SKILLS} skill artifacts are allowed", where)
        skills[skill.name] = skill
    return list(skills.values())


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """422 for a malformed skill artifact, or for skill tools with no skill to offer at all."""
    skills = artifact_skills(chat.tool_context)
    if not skills and not settings.tools.skills_dir:
        raise Invalid(
            "the skill tools need skills: configure tools.skills_dir or give "
            '{"type": "skill", "name", "description", "instructions"} artifacts in tool_context',
            "tool_context",
        )


# --- the skills folder -----------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: dict[str, tuple[int, int, Skill | None]] = {}  # SKILL.md path -> (mtime_ns, size, parsed or None if broken)
_warned: set[str] = set()  # links out of the folder: warned about once, not on every run


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _cache_lock:
        if key in _warned:
            return
        if len(_warned) >= MAX_DIR_ENTRIES:
            _warned.clear()
        _warned.add(key)
    log.warning(message, *args)


def parse_skill_md(text: str) -> Skill:
    """A SKILL.md: YAML front matter between `---` lines (name, description), then the instructions."""
    import yaml

    lines = text.lstrip("\ufeff").splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise ValueError("it does not start with a '---' front matter line")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
    if end is None:
        raise ValueError("its front matter has no closing '---' line")
    try:
        meta = yaml.safe_load("".join(lines[1:end]))
    except yaml.YAMLError as exc:
        raise ValueError(f"its front matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError("its front matter is not a mapping")
    name, description = meta.get("name"), meta.get("description")
    if not isinstance(name, str) or not SKILL_NAME.fullmatch(name):
        raise ValueError("its name is missing or not 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(description, str) or not description.strip() or len(description) > MAX_DESCRIPTION:
        raise ValueError(f"its description is missing, empty or longer than {MAX_DESCRIPTION} characters")
    instructions = "".join(lines[end + 1 :]).strip()
    if not instructions:
        raise ValueError("it has no instructions after the front matter")
    return Skill(name, description.strip(), instructions)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _read_skill(path: str, root: str) -> Skill | None:
    """One skill folder's SKILL.md, or None (with a warning) when it is missing, outside the folder or broken."""
    skill_md = os.path.realpath(os.path.join(path, "SKILL.md"))
    if not _inside(skill_md, root):
        _warn_once(path, "skill %s skipped: its SKILL.md is a link out of tools.skills_dir", path)
        return None
    try:
        stat = os.stat(skill_md)
    except OSError:
        return None  # a folder without SKILL.md is not a skill
    if not stat_kind.S_ISREG(stat.st_mode):  # a FIFO or device would block the read
        _warn_once(skill_md, "skill %s skipped: its SKILL.md is not a regular file", path)
        return None
    with _cache_lock:
        cached = _cache.get(skill_md)
    if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
        return cached[2]
    skill: Skill | None = None
    try:
        if stat.st_size > MAX_SKILL_BYTES:
            raise ValueError(f"it is larger than {MAX_SKILL_BYTES} bytes")
        with open(skill_md, "rb") as f:
            skill = parse_skill_md(f.read(MAX_SKILL_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("skill %s skipped: %s", skill_md, exc)
    with _cache_lock:
        if len(_cache) >= 4 * MAX_SKILLS:
            _cache.clear()
        _cache[skill_md] = (stat.st_mtime_ns, stat.st_size, skill)
    return skill


def folder_skills(skills_dir: str) -> list[Skill]:
    """The skills of the folder, by sub-folder name; links that lead out of it are never followed (blocking)."""
    root = os.path.realpath(skills_dir)
    try:
        with os.scandir(root) as entries:
            names = [e.name for _, e in zip(range(MAX_DIR_ENTRIES), entries, strict=False)]
    except OSError as exc:
        log.warning("tools.skills_dir %s cannot be read: %s", skills_dir, exc)
        return []
    skills: dict[str, Skill] = {}
    for name in sorted(n for n in names if not n.startswith(".")):
        path = os.path.realpath(os.path.join(root, name))
        if not _inside(path, root) or path == root:
            _warn_once(path, "skill folder %s skipped: it links out of tools.skills_dir", name)
            continue
        if not os.path.isdir(path):
            continue
        skill = _read_skill(path, root)
        if skill is None:
            continue
        if skill.name in skills:
            log.warning("skill folder %s skipped: skill %r is already defined by another folder", name, skill.name)
            continue
        if len(skills) >= MAX_SKILLS:
            log.warning("tools.skills_dir holds more than %d skills; the rest are ignored", MAX_SKILLS)
            break
        skills[skill.name] = skill
    return list(skills.values())


# --- the run's state -------------------------------------------------------------------


def _history_calls(env: ToolEnv) -> Iterator[tuple[str, Any]]:
    """(LOAD or UNLOAD, skill name) of the history's skill calls whose result was not an error, in order."""
    kinds = {t.tool_name: t.type for t in env.request.builtin_tools or () if t.type in (LOAD, UNLOAD)}
    calls: list[tuple[str, str, Any]] = []  # (tool_use id, kind, name)
    succeeded: set[str] = set()
    for message in env.request.messages:
        if isinstance(message.content, str):
            continue
        for block in message.content:
            if block.type == "tool_use" and message.role == "assistant" and block.name in kinds:
                calls.append((block.id, kinds[block.name], block.input.get("name")))
            elif block.type == "tool_result" and not block.is_error:
                succeeded.add(block.tool_use_id)
    for call_id, kind, name in calls:
        if call_id in succeeded:
            yield kind, name


async def _state(env: ToolEnv) -> SkillState:
    """The run's skill state, built by the first skill tool that starts: catalogue, then the history replayed."""
    state = env.state.get(STATE_KEY)
    if isinstance(state, SkillState):
        return state
    skills_dir = env.settings.skills_dir
    catalogue = {s.name: s for s in await asyncio.to_thread(folder_skills, skills_dir)} if skills_dir else {}
    catalogue.update((s.name, s) for s in artifact_skills(env.request.tool_context))
    state = SkillState(catalogue, env.request.maximum_loaded_skills)
    for kind, name in _history_calls(env):
        if not isinstance(name, str) or name not in catalogue:
            continue  # a skill that is gone since: nothing to restore
        if kind == LOAD:
            state.load(name, env)
        else:
            state.unload(name, env)
    env.state[STATE_KEY] = state
    return state


def _skill_name(arguments: dict[str, Any]) -> str | None:
    name = arguments.get("name")
    return name if isinstance(name, str) else None


NAME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "description": "The skill's name, as skill_list_v1 gives it."}},
    "required": ["name"],
}


class SkillList:
    description = "List the skills you can load: each one's name and description, and whether it is loaded."
    input_schema: dict[str, Any] = {"type": "object", "properties": {}}

    async def start(self, env: ToolEnv) -> None:
        await _state(env)

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        state = await _state(env)
        skills = [
            {"name": s.name, "description": s.description, "loaded": s.name in state.loaded}
            for s in state.catalogue.values()
        ]
        return ToolOutcome(json.dumps({"skills": skills}, ensure_ascii=False))

    async def aclose(self) -> None:
        return None


class SkillLoad:
    description = (
        "Load a skill by name: its instructions join your system prompt from your next step on. "
        "Follow them once loaded."
    )
    input_schema = NAME_SCHEMA

    async def start(self, env: ToolEnv) -> None:
        state = await _state(env)
        if self.description == SkillLoad.description and state.catalogue:  # not replaced by the request
            names = ", ".join(state.catalogue)
            if len(names) > MAX_NAMES_IN_DESCRIPTION:
                names = names[:MAX_NAMES_IN_DESCRIPTION].rsplit(",", 1)[0] + ", … (skill_list_v1 lists them all)"
            self.description = f"{self.description} Available skills: {names}."

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        state = await _state(env)
        name = _skill_name(arguments)
        if name is None or name not in state.catalogue:
            return state.unknown(arguments.get("name"))
        added, evicted = state.load(name, env)
        if not added:
            text = f"Skill {name} is already loaded; its instructions are in your system prompt. Nothing changed."
        else:
            text = f"Loaded skill {name}: its instructions are now in your system prompt."
        if evicted:
            text += f" Unloaded {', '.join(evicted)} to stay within {state.cap} loaded skills."
        extra = {"skills": {"loaded": list(state.loaded), "added": name if added else None, "evicted": evicted}}
        return ToolOutcome(text, extra=extra)

    async def aclose(self) -> None:
        return None


class SkillUnload:
    description = "Unload a loaded skill by name: its instructions leave your system prompt from your next step on."
    input_schema = NAME_SCHEMA

    async def start(self, env: ToolEnv) -> None:
        await _state(env)

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome:
        state = await _state(env)
        name = _skill_name(arguments)
        if name is None or name not in state.catalogue:
            return state.unknown(arguments.get("name"))
        removed = state.unload(name, env)
        text = f"Unloaded skill {name}." if removed else f"Skill {name} was not loaded. Nothing changed."
        return ToolOutcome(text, extra={"skills": {"loaded": list(state.loaded), "removed": name if removed else None}})

    async def aclose(self) -> None:
        return None


TOOLS = {"skill_list_v1": SkillList, LOAD: SkillLoad, UNLOAD: SkillUnload}
