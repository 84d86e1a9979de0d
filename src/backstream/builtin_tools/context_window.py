"""context_management: fit a conversation with tool results into the model's context window.

Before every model call the engine asks `fit` for the request to send. When the request
has `context_management`, the model's context window is known (`context_window` in the
model table, else `n_ctx` for the local provider) and the estimated prompt exceeds it,
the oldest tool results are replaced with a short placeholder (their `tool_use_id` stays,
so tool_use/tool_result pairs stay valid for every provider), then the oldest thinking
blocks are removed, until the estimate fits. Never touched: the last user message (in a
tool loop, the results the model just asked for), the `keep` most recent tool results,
the results of `exclude_tools`, and the thinking of the most recent assistant turns.

Two shapes are accepted (`check` tells what is wrong with any other):

- Anthropic context editing: `{"edits": [{"type": "clear_tool_uses_20250919", "keep"?:
  {"type": "tool_uses", "value": N}, "trigger"?: {"type": "input_tokens", "value": N},
  "exclude_tools"?: [...], "clear_at_least"?: ..., "clear_tool_inputs"?: ...},
  {"type": "clear_thinking_20251015", "keep"?: {"type": "thinking_turns", "value": N} | "all"},
  {"type": "compact_20260112", ...}]}`. Only the edits present are applied; `keep`
  defaults to 3 tool uses and 1 thinking turn (Anthropic's defaults); an `input_tokens`
  trigger lowers the limit below the window. `clear_at_least`, `clear_tool_inputs`, a
  `tool_uses` trigger and `compact_20260112` are validated and left to an Anthropic
  upstream (which receives the field unchanged); the gateway's trimming does not use them.
- Simple: `{"strategy": "drop_oldest", "keep_tool_results"?: N}`: tool results, then
  thinking (keeping the last assistant turn's), `keep_tool_results` defaults to 0.

Token counts are estimates: UTF-8 bytes / 3, rounded up (real tokenizers average 3.5-4.5
bytes per token on English and code, so this overestimates: trimming errs on the side of
fitting), plus a few tokens per message and block, a flat 1,600 per image or URL document,
the tool specs as JSON, and the answer's `max_tokens`. No tokenizer is loaded, so this
costs a walk over the request, and nothing at all without `context_management`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..api_models import ChatRequest, Message, TextBlock, ToolResultBlock
from ..config import ModelConfig

TOOL_RESULT_PLACEHOLDER = "[tool result removed to fit the context window]"
THINKING_PLACEHOLDER = "[thinking removed to fit the context window]"
MESSAGE_TOKENS = 4  # role and separators
BLOCK_TOKENS = 4  # a block's framing (type, ids)
IMAGE_TOKENS = 1600  # Anthropic's cost of a ~1.15 megapixel image, its largest unscaled size
MAX_EDITS = 8
MAX_NAMES = 128  # exclude_tools / clear_tool_inputs entries
_THINKING = ("thinking", "redacted_thinking")
_TOOL_EDIT_KEYS = {"type", "trigger", "keep", "clear_at_least", "clear_tool_inputs", "exclude_tools"}
_COMPACT_KEYS = {"type", "trigger", "instructions", "pause_after_compaction"}


@dataclass(frozen=True)
class Policy:
    """What may be dropped, read from the request's `context_management`."""

    tool_results: bool = True
    keep_tool_results: int = 0  # the most recent tool results never dropped
    exclude_tools: frozenset[str] = frozenset()  # tools whose results are never dropped
    thinking: bool = True
    keep_thinking_turns: int | None = 1  # the most recent assistant turns keeping their thinking; None: all
    trigger_tokens: int | None = None  # a limit below the context window


# --- the request field ---------------------------------------------------------------


def check(value: Any) -> str | None:
    """What is wrong with a request's `context_management` (a 422 message naming the field), or None."""
    if value is None:
        return None
    try:
        policy(value)
    except ValueError as exc:
        return str(exc)
    return None


def policy(value: Any) -> Policy:
    """The policy a `context_management` value asks for; ValueError names the field that is wrong."""
    field = "context_management"
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be an object")
    if "edits" in value:
        _only(value, {"edits"}, field)
        return _edits_policy(value["edits"])
    _only(value, {"strategy", "keep_tool_results"}, field)
    if value.get("strategy") != "drop_oldest":
        raise ValueError(
            f'{field} needs "edits" (Anthropic context editing) or "strategy": "drop_oldest"; '
            f"got {sorted(value) or 'an empty object'}"
        )
    keep = value.get("keep_tool_results", 0)
    return Policy(keep_tool_results=_count(keep, f"{field}.keep_tool_results", 0))


def _edits_policy(edits: Any) -> Policy:
    field = "context_management.edits"
    if not isinstance(edits, list) or len(edits) > MAX_EDITS:
        raise ValueError(f"{field} must be a list of at most {MAX_EDITS} edits")
    fields: dict[str, Any] = {"tool_results": False, "thinking": False}
    seen: set[str] = set()
    for i, edit in enumerate(edits):
        path = f"{field}.{i}"
        kind = edit.get("type") if isinstance(edit, dict) else None
        if kind in seen:
            raise ValueError(f"{path}: {kind} appears twice")
        if kind == "clear_tool_uses_20250919":
            fields.update(tool_results=True, **_tool_edit(edit, path))
        elif kind == "clear_thinking_20251015":
            fields.update(thinking=True, keep_thinking_turns=_thinking_keep(edit, path))
        elif kind == "compact_20260112":
            _compact_edit(edit, path)  # summarising is the upstream's job: Anthropic receives the field as sent
        else:
            raise ValueError(
                f"{path}.type must be clear_tool_uses_20250919, clear_thinking_20251015 or compact_20260112"
            )
        seen.add(str(kind))
    return Policy(**fields)


def _tool_edit(edit: dict[str, Any], path: str) -> dict[str, Any]:
    _only(edit, _TOOL_EDIT_KEYS, path)
    fields: dict[str, Any] = {"keep_tool_results": 3}  # Anthropic's default
    if edit.get("keep") is not None:
        fields["keep_tool_results"] = _counted(edit["keep"], f"{path}.keep", ("tool_uses",), 0)[1]
    trigger = edit.get("trigger")
    if trigger is not None:
        kind, value = _counted(trigger, f"{path}.trigger", ("input_tokens", "tool_uses"), 1)
        if kind == "input_tokens":
            fields["trigger_tokens"] = value
    if edit.get("clear_at_least") is not None:
        _counted(edit["clear_at_least"], f"{path}.clear_at_least", ("input_tokens",), 0)
    inputs = edit.get("clear_tool_inputs")
    if inputs is not None and not isinstance(inputs, bool):
        _names(inputs, f"{path}.clear_tool_inputs")
    if edit.get("exclude_tools") is not None:
        fields["exclude_tools"] = frozenset(_names(edit["exclude_tools"], f"{path}.exclude_tools"))
    return fields


def _thinking_keep(edit: dict[str, Any], path: str) -> int | None:
    _only(edit, {"type", "keep"}, path)
    keep = edit.get("keep")
    if keep is None:
        return 1
    if keep == "all" or keep == {"type": "all"}:
        return None
    return _counted(keep, f"{path}.keep", ("thinking_turns",), 0)[1]


def _compact_edit(edit: dict[str, Any], path: str) -> None:
    _only(edit, _COMPACT_KEYS, path)
    if edit.get("trigger") is not None:
        _counted(edit["trigger"], f"{path}.trigger", ("input_tokens",), 1)
    instructions = edit.get("instructions")
    if instructions is not None and not (isinstance(instructions, str) and len(instructions) <= 16_384):
        raise ValueError(f"{path}.instructions must be a string of at most 16384 characters")
    if edit.get("pause_after_compaction") not in (None, True, False):
        raise ValueError(f"{path}.pause_after_compaction must be a boolean")


def _only(value: dict[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _count(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 100_000_000:
        raise ValueError(f"{path} must be an integer of at least {minimum}")
    return value


def _counted(value: Any, path: str, kinds: tuple[str, ...], minimum: int) -> tuple[str, int]:
    """An Anthropic `{"type": kind, "value": n}` object: (kind, n)."""
    if not isinstance(value, dict) or value.get("type") not in kinds:
        raise ValueError(f'{path} must be {{"type": {" or ".join(kinds)}, "value": <integer>}}')
    _only(value, {"type", "value"}, path)
    return value["type"], _count(value.get("value"), f"{path}.value", minimum)


def _names(value: Any, path: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise ValueError(f"{path} must be a list of at most {MAX_NAMES} tool names")
    if not all(isinstance(n, str) and 1 <= len(n) <= 64 for n in value):
        raise ValueError(f"{path} must hold tool names (1 to 64 characters)")
    return value


# --- estimating ------------------------------------------------------------------------


def window_of(config: ModelConfig) -> int | None:
    """The model's context window in tokens, or None when nobody said."""
    if config.context_window is not None:
        return config.context_window
    return config.n_ctx if config.provider == "local" else None


def text_tokens(text: str) -> int:
    """UTF-8 bytes / 3, rounded up (isascii is O(1), so ASCII text is not encoded)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return -(-size // 3)


def _json_tokens(value: Any) -> int:
    return -(-len(orjson.dumps(value)) // 3)


def _result_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    return sum(BLOCK_TOKENS + (text_tokens(b.text) if b.type == "text" else IMAGE_TOKENS) for b in content)


def block_tokens(block: Any) -> int:
    kind = block.type
    if kind == "text":
        cost = text_tokens(block.text)
    elif kind == "tool_result":
        cost = _result_tokens(block.content)
    elif kind == "tool_use":
        cost = text_tokens(block.name) + _json_tokens(block.input)
    elif kind == "thinking":
        cost = text_tokens(block.thinking)
    elif kind == "redacted_thinking":
        cost = text_tokens(block.data)
    elif kind == "document" and block.source.type == "text":
        cost = text_tokens(block.source.data)
    elif kind == "document" and block.source.type == "base64":
        cost = -(-len(block.source.data) // 4)  # decoded bytes / 3
    else:  # images, documents by URL: their size is unknown here
        cost = IMAGE_TOKENS
    return BLOCK_TOKENS + cost


def message_tokens(message: Message) -> int:
    if isinstance(message.content, str):
        return MESSAGE_TOKENS + text_tokens(message.content)
    return MESSAGE_TOKENS + sum(block_tokens(b) for b in message.content)


def estimate(request: ChatRequest, config: ModelConfig) -> int:
    """Estimated tokens of the prompt plus the tokens reserved for the answer."""
    total = request.max_tokens or config.max_tokens
    total += sum(MESSAGE_TOKENS + text_tokens(s.text) for s in request.system or ())
    total += sum(_json_tokens(t.model_dump(exclude_none=True)) for t in request.tools or ())
    return total + sum(message_tokens(m) for m in request.messages)


# --- trimming --------------------------------------------------------------------------


def fit(request: ChatRequest, config: ModelConfig) -> tuple[ChatRequest, dict[str, Any] | None]:
    """The request to send and a report of what was dropped (None when the request was left alone)."""
    if request.context_management is None:
        return request, None
    window = window_of(config)
    if window is None:
        return request, None
    try:
        rules = policy(request.context_management)
    except ValueError:
        return request, None  # refused at the edge (check); never fail a run over it here
    limit = min(window, rules.trigger_tokens) if rules.trigger_tokens else window
    before = estimate(request, config)
    if before <= limit:
        return request, None
    trimmer = _Trimmer(request.messages, rules)
    after = trimmer.drop_tool_results(before, limit) if rules.tool_results else before
    if after > limit and rules.thinking:
        after = trimmer.drop_thinking(after, limit)
    if trimmer.edited:
        request = request.model_copy(update={"messages": trimmer.messages()})
    report = {
        "dropped_tool_results": trimmer.dropped_tool_results,
        "dropped_thinking_blocks": trimmer.dropped_thinking,
        "estimated_tokens_before": before,
        "estimated_tokens_after": after,
        "context_window": window,
        "fits": after <= limit,
    }
    return request, report


class _Trimmer:
    """Edits copies of the messages' block lists; the request's own messages are never changed."""

    def __init__(self, messages: list[Message], rules: Policy) -> None:
        self.source = messages
        self.rules = rules
        self.edited: dict[int, list[Any]] = {}  # message index -> its new blocks
        self.dropped_tool_results = 0
        self.dropped_thinking = 0
        self.last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)

    def _blocks(self, i: int) -> list[Any]:
        if i not in self.edited:
            self.edited[i] = list(self.source[i].blocks())
        return self.edited[i]

    def messages(self) -> list[Message]:
        return [
            m.model_copy(update={"content": self.edited[i]}) if i in self.edited else m
            for i, m in enumerate(self.source)
        ]

    def _tool_results(self) -> list[tuple[int, int, ToolResultBlock]]:
        """The droppable tool results, oldest first."""
        names: dict[str, str] = {}  # tool_use id -> tool name
        found: list[tuple[int, int, ToolResultBlock]] = []
        for i, message in enumerate(self.source):
            for j, block in enumerate(message.content if isinstance(message.content, list) else ()):
                if block.type == "tool_use":
                    names[block.id] = block.name
                elif block.type == "tool_result":
                    found.append((i, j, block))
        found = found[: max(0, len(found) - self.rules.keep_tool_results)]
        return [
            (i, j, b)
            for i, j, b in found
            if i != self.last_user
            and names.get(b.tool_use_id) not in self.rules.exclude_tools
            and b.content != TOOL_RESULT_PLACEHOLDER
        ]

    def drop_tool_results(self, tokens: int, limit: int) -> int:
        placeholder = text_tokens(TOOL_RESULT_PLACEHOLDER)
        for i, j, block in self._tool_results():
            if tokens <= limit:
                break
            saved = _result_tokens(block.content) - placeholder
            if saved <= 0:
                continue
            self._blocks(i)[j] = block.model_copy(update={"content": TOOL_RESULT_PLACEHOLDER})
            self.dropped_tool_results += 1
            tokens -= saved
        return tokens

    def _thinking(self) -> list[tuple[int, Any]]:
        """The droppable thinking blocks, oldest first: those of all but the most recent turns with thinking."""
        keep = self.rules.keep_thinking_turns
        if keep is None:
            return []
        turns = [
            i
            for i, m in enumerate(self.source)
            if m.role == "assistant" and isinstance(m.content, list) and any(b.type in _THINKING for b in m.content)
        ]
        turns = turns[: max(0, len(turns) - keep)]
        return [(i, b) for i in turns for b in self.source[i].blocks() if b.type in _THINKING]

    def drop_thinking(self, tokens: int, limit: int) -> int:
        for i, block in self._thinking():
            if tokens <= limit:
                break
            blocks = self._blocks(i)
            blocks[:] = [b for b in blocks if b is not block]
            self.dropped_thinking += 1
            tokens -= block_tokens(block)
            if not blocks:  # a message needs content: a short note keeps it valid
                blocks.append(TextBlock(type="text", text=THINKING_PLACEHOLDER))
                tokens += block_tokens(blocks[0])
        return tokens
