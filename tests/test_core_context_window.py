"""context_management in-process: `fit` (what is dropped, in which order, what is never touched), the token
estimate, and `check` (which shapes are accepted). Over real HTTP: tests/test_context_management.py."""

from __future__ import annotations

from typing import Any

import pytest

from backstream.api_models import ChatRequest
from backstream.builtin_tools.context_window import (
    THINKING_PLACEHOLDER,
    TOOL_RESULT_PLACEHOLDER,
    check,
    estimate,
    fit,
    text_tokens,
    window_of,
)
from backstream.config import ModelConfig

BIG = "x" * 3000  # 1,000 estimated tokens
SIMPLE = {"strategy": "drop_oldest"}


def model(window: int | None = 2000, provider: str = "openai", **extra: Any) -> ModelConfig:
    return ModelConfig(name="m", provider=provider, context_window=window, max_tokens=100, **extra)


def tool_round(n: int, result: str = BIG, thinking: str | None = None) -> list[dict[str, Any]]:
    """One assistant tool call (optionally after thinking) and its result."""
    call: list[dict[str, Any]] = [{"type": "thinking", "thinking": thinking, "signature": "s"}] if thinking else []
    call.append({"type": "tool_use", "id": f"t{n}", "name": "fetch" if n != 9 else "keepme", "input": {"n": n}})
    return [
        {"role": "assistant", "content": call},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{n}", "content": result}]},
    ]


def conversation(rounds: int, cm: Any = SIMPLE, thinking: str | None = None, **extra: Any) -> ChatRequest:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Look things up."}]
    for n in range(1, rounds + 1):
        messages += tool_round(n, thinking=thinking)
    return ChatRequest.model_validate({"messages": messages, "context_management": cm, "max_tokens": 50, **extra})


def results(request: ChatRequest) -> list[Any]:
    return [b for m in request.messages if isinstance(m.content, list) for b in m.content if b.type == "tool_result"]


def test_without_the_field_or_a_known_window_nothing_is_done() -> None:
    request = conversation(5, cm=None)
    assert fit(request, model(1000)) == (request, None)
    trimmed = conversation(5)
    assert fit(trimmed, model(None)) == (trimmed, None)  # a remote model whose window nobody configured
    assert window_of(model(None, provider="local", n_ctx=512)) == 512
    assert window_of(model(300, provider="local", n_ctx=512)) == 300


def test_a_request_that_fits_is_returned_unchanged() -> None:
    request = conversation(2)
    assert estimate(request, model()) < 100_000
    assert fit(request, model(100_000)) == (request, None)


def test_oldest_tool_results_go_first_and_pairs_stay_intact() -> None:
    request = conversation(4)  # four results of ~1,000 tokens each
    sent, report = fit(request, model(2500))
    assert report is not None
    contents = [b.content for b in results(sent)]
    # The newest result (in the last user message) is never dropped; the oldest are dropped until it fits.
    assert contents == [TOOL_RESULT_PLACEHOLDER, TOOL_RESULT_PLACEHOLDER, BIG, BIG]  # two were enough
    assert report["dropped_tool_results"] == 2 and report["dropped_thinking_blocks"] == 0
    assert report["fits"] is True and report["estimated_tokens_after"] <= 2500 < report["estimated_tokens_before"]
    assert report["estimated_tokens_after"] == estimate(sent, model(2500))  # the report's arithmetic is right
    # Every tool_use still has its tool_result, with the same id, in the same place.
    uses = [b.id for m in sent.messages if isinstance(m.content, list) for b in m.content if b.type == "tool_use"]
    assert uses == [b.tool_use_id for b in results(sent)] == ["t1", "t2", "t3", "t4"]
    assert [m.role for m in sent.messages] == [m.role for m in request.messages]
    assert results(request)[0].content == BIG  # the caller's request is not changed in place


def test_the_last_user_turn_is_never_touched() -> None:
    request = conversation(3)
    sent, report = fit(request, model(300))  # cannot fit: everything droppable goes
    assert report is not None and report["fits"] is False
    assert [b.content for b in results(sent)] == [TOOL_RESULT_PLACEHOLDER, TOOL_RESULT_PLACEHOLDER, BIG]
    assert report["dropped_tool_results"] == 2 and report["context_window"] == 300

    text_last = ChatRequest.model_validate(
        {"messages": [*conversation(2).model_dump()["messages"], {"role": "user", "content": BIG}]}
        | {"context_management": SIMPLE}
    )
    sent, report = fit(text_last, model(300))
    assert sent.messages[-1].content == BIG and report is not None and report["fits"] is False


def test_thinking_goes_after_tool_results_oldest_first_keeping_the_last_turn() -> None:
    request = conversation(3, thinking="t" * 1500)  # 500 tokens of thinking per assistant turn
    needed_without_thinking = estimate(request, model()) - 2 * 1000 - 600  # two results dropped, one thinking
    sent, report = fit(request, model(needed_without_thinking))
    assert report is not None and report["fits"] is True
    assert report["dropped_tool_results"] == 2 and report["dropped_thinking_blocks"] == 2
    turns = [m for m in sent.messages if m.role == "assistant"]
    kinds = [[b.type for b in m.content] for m in turns]
    assert kinds[0] == ["tool_use"]  # the oldest turn lost its thinking first
    assert kinds[-1] == ["thinking", "tool_use"]  # the last turn keeps it (Anthropic needs it in a tool loop)


def test_a_turn_of_only_thinking_keeps_a_placeholder() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": BIG, "signature": "s"}]},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "short", "signature": "s"}]},
        {"role": "user", "content": "and?"},
    ]
    request = ChatRequest.model_validate({"messages": messages, "context_management": SIMPLE})
    sent, report = fit(request, model(600))
    assert report is not None and report["dropped_thinking_blocks"] == 1 and report["fits"]
    assert sent.messages[1].content[0].text == THINKING_PLACEHOLDER
    assert sent.messages[3].content[0].type == "thinking"


def test_anthropic_edits_keep_exclude_and_which_edits_apply() -> None:
    edits = {
        "edits": [
            {
                "type": "clear_tool_uses_20250919",
                "keep": {"type": "tool_uses", "value": 2},
                "exclude_tools": ["keepme"],
                "clear_at_least": {"type": "input_tokens", "value": 100},
            }
        ]
    }
    request = conversation(10, cm=edits, thinking="t" * 300)  # tool 9 is "keepme"
    sent, report = fit(request, model(1000))
    contents = [b.content for b in results(sent)]
    assert contents[:8] == [TOOL_RESULT_PLACEHOLDER] * 8
    assert contents[8:] == [BIG, BIG]  # keep 2 most recent
    assert report is not None and report["dropped_thinking_blocks"] == 0  # no clear_thinking edit: none dropped

    edits["edits"][0]["keep"]["value"] = 0  # type: ignore[index]
    sent, _ = fit(conversation(10, cm=edits), model(1000))
    assert [b.content for b in results(sent)][8] == BIG  # exclude_tools: "keepme" is never dropped


def test_anthropic_default_keep_is_three_tool_uses_and_thinking_only_edit() -> None:
    request = conversation(5, cm={"edits": [{"type": "clear_tool_uses_20250919"}]})
    sent, _ = fit(request, model(1000))
    assert [b.content for b in results(sent)] == [TOOL_RESULT_PLACEHOLDER] * 2 + [BIG] * 3

    only_thinking = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]}
    sent, report = fit(conversation(3, cm=only_thinking, thinking="t" * 900), model(1000))
    assert report is not None and report["dropped_tool_results"] == 0 and report["dropped_thinking_blocks"] == 2
    keep_all = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    sent, report = fit(conversation(3, cm=keep_all, thinking="t" * 900), model(1000))
    assert report is not None and report["dropped_thinking_blocks"] == 0 and report["fits"] is False


def test_an_input_tokens_trigger_lowers_the_limit() -> None:
    edits = {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 2500}}]}
    sent, report = fit(conversation(5, cm=edits), model(100_000))  # far under the window, over the trigger
    assert report is not None and report["dropped_tool_results"] == 2  # all but the default 3 kept
    assert report["context_window"] == 100_000 and report["fits"] is False  # fits: under the trigger
    assert fit(conversation(5), model(100_000))[1] is None


def test_estimate_is_bytes_over_three_and_counts_everything_sent() -> None:
    assert text_tokens("abc") == 1 and text_tokens("abcd") == 2 and text_tokens("") == 0
    assert text_tokens("é" * 3) == 2  # 6 UTF-8 bytes
    bare = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
    base = estimate(bare, model())
    assert base == 10 + 4 + 1  # max_tokens reserved, message framing, "hi"
    assert estimate(bare.model_copy(update={"max_tokens": None}), model()) == base - 10 + 100  # the model's default
    tool = {"name": "t", "input_schema": {"type": "object", "properties": {"q": {"description": "d" * 300}}}}
    with_tool = ChatRequest.model_validate({**bare.model_dump(exclude_none=True), "tools": [tool]})
    assert estimate(with_tool, model()) > base + 100
    with_system = ChatRequest.model_validate({**bare.model_dump(exclude_none=True), "system": "s" * 300})
    assert estimate(with_system, model()) == base + 4 + 100


@pytest.mark.parametrize(
    "value",
    [
        {"strategy": "drop_oldest"},
        {"strategy": "drop_oldest", "keep_tool_results": 2},
        {"edits": [{"type": "clear_tool_uses_20250919"}]},
        {
            "edits": [
                {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 2}},
                {
                    "type": "clear_tool_uses_20250919",
                    "trigger": {"type": "tool_uses", "value": 5},
                    "keep": {"type": "tool_uses", "value": 3},
                    "clear_at_least": {"type": "input_tokens", "value": 5000},
                    "clear_tool_inputs": ["fetch"],
                    "exclude_tools": ["memory"],
                },
            ]
        },
        {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "all"}}]},
        {"edits": [{"type": "compact_20260112", "trigger": {"type": "input_tokens", "value": 150000}}]},
    ],
)
def test_check_accepts(value: dict[str, Any]) -> None:
    assert check(value) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({}, 'needs "edits"'),
        ({"strategy": "summarise"}, 'needs "edits"'),
        ({"enabled": True}, "unknown field 'enabled'"),
        ({"strategy": "drop_oldest", "keep_tool_results": -1}, "keep_tool_results must be an integer"),
        ({"strategy": "drop_oldest", "keep_tool_results": True}, "keep_tool_results must be an integer"),
        ({"edits": [{"type": "clear_thinking_20251015"}] * 9}, "edits must be a list of at most 8"),
        ({"edits": [{"type": "clear_everything"}]}, "edits.0.type must be"),
        ({"edits": [{"type": "clear_tool_uses_20250919", "keep": 3}]}, "edits.0.keep must be"),
        ({"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses", "value": "3"}}]}, "value"),
        ({"edits": [{"type": "clear_tool_uses_20250919", "typo": 1}]}, "unknown field 'typo'"),
        ({"edits": [{"type": "clear_tool_uses_20250919", "exclude_tools": "x"}]}, "exclude_tools must be a list"),
        ({"edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_thinking_20251015"}]}, "appears twice"),
        ({"edits": [{"type": "clear_thinking_20251015", "keep": "some"}]}, "edits.0.keep must be"),
        ({"edits": [{"type": "clear_tool_uses_20250919"}], "strategy": "drop_oldest"}, "unknown field 'strategy'"),
        ("drop_oldest", "must be an object"),
    ],
)
def test_check_refuses_naming_the_field(value: Any, says: str) -> None:
    problem = check(value)
    assert problem is not None and says in problem and problem.startswith("context_management")


def test_an_unchecked_bad_shape_does_not_fail_the_run() -> None:
    request = conversation(3, cm={"edits": "nonsense"})
    assert fit(request, model(300)) == (request, None)
