"""Skills over real HTTP: skill_list_v1, skill_load_v1, skill_unload_v1 and maximum_loaded_skills.

The fake upstream is scripted to call the skill tools; what reached the model (its system
prompt on the next request) is read from the fake's recorded request bodies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from backstream.builtin_tools.skills import Skill, parse_skill_md
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.fake_upstream.script import Recorded
from tests.support.server import LOG_DIR, ServerProcess, fake_models
from tests.support.sse import parse_sse

USER = [{"role": "user", "content": "Help me write a report."}]
# Each skill's instructions carry a marker that can be looked for in the model's system prompt.
SKILLS = {
    name: f"{name.upper()}-MARKER: follow the {name} house rules." for name in ("alpha", "beta", "gamma", "delta")
}
LOAD_ALL = [{"type": "skill_list_v1"}, {"type": "skill_load_v1"}, {"type": "skill_unload_v1"}]


def write_skill(folder: Path, name: str, instructions: str) -> None:
    folder.mkdir()
    (folder / "SKILL.md").write_text(f"---\nname: {name}\ndescription: The {name} skill.\n---\n\n{instructions}\n")


@pytest.fixture(scope="module")
def skills_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("skills")
    for name, instructions in SKILLS.items():
        write_skill(root / f"{name}-folder", name, instructions)
    (root / "broken").mkdir()
    (root / "broken" / "SKILL.md").write_text("---\nname: [not closed\n---\nBROKEN-MARKER\n")
    (root / "no-front-matter").mkdir()
    (root / "no-front-matter" / "SKILL.md").write_text("# Just a heading\n\nNo front matter here.\n")
    (root / "huge").mkdir()
    (root / "huge" / "SKILL.md").write_text("---\nname: huge\ndescription: too big\n---\n" + "x" * 300_000)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "SKILL.md")  # reading it would block forever
    outside = tmp_path_factory.mktemp("outside")
    write_skill(outside / "secret", "secret", "SECRET-MARKER")
    (root / "linked-folder").symlink_to(outside / "secret")
    (root / "linked-file").mkdir()
    (root / "linked-file" / "SKILL.md").symlink_to(outside / "secret" / "SKILL.md")
    return root


@pytest.fixture(scope="module")
def skilled(fake: FakeUpstream, skills_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "tools": {"skills_dir": str(skills_dir)},
        "runs": {"max_steps": 8},
    }
    srv = ServerProcess(tmp_path_factory.mktemp("skilled"), config, name="skills").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bare(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server without tools.skills_dir: skills come only from tool_context."""
    config = {"store": "memory", "models": fake_models(fake), "runs": {"max_steps": 8}}
    srv = ServerProcess(tmp_path_factory.mktemp("bare"), config, name="skills-bare").start()
    yield srv
    srv.stop()


def call(name: str, args: dict[str, Any], call_id: str) -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=[orjson.dumps(args).decode()])


def load(skill: str, call_id: str, tool: str = "skill_load_v1") -> ToolCall:
    return call(tool, {"name": skill}, call_id)


def run_stream(srv: ServerProcess, model: str = "gpt", **payload: Any) -> list[dict[str, Any]]:
    body = {"model": model, "max_tokens": 64, "messages": USER, "tools": LOAD_ALL, **payload, "stream": True}
    with srv.client() as c, c.stream("POST", "/v1/messages", json=body) as resp:
        raw = resp.read()
        assert resp.status_code == 200, raw
    frames = parse_sse(raw)
    assert frames[-1]["data"]["finish_reason"] == "Stop", frames[-1]
    return frames


def results(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["data"] for f in frames if f["event"] == "tool_result"]


def system_prompt(rec: Recorded) -> str:
    """The system prompt a recorded upstream request carried (OpenAI: the system message; Anthropic: `system`)."""
    if rec.provider == "anthropic":
        return "\n\n".join(block["text"] for block in rec.body.get("system", ()))
    return "\n\n".join(m["content"] for m in rec.body["messages"] if m["role"] == "system")


def markers(rec: Recorded) -> list[str]:
    """Which skills' instructions a request's system prompt holds, in the order they appear."""
    text = system_prompt(rec)
    found = [(text.index(marker), name) for name, marker in SKILLS.items() if marker in text]
    return [name for _, name in sorted(found)]


def test_list_offers_the_folder_skills_and_skips_broken_and_linked_ones(
    skilled: ServerProcess, fake: FakeUpstream
) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("skill_list_v1", {}, "c1")]), Reply(tokens=["ok"])])
    frames = run_stream(skilled)
    [result] = results(frames)
    assert result["is_error"] is False
    listed = orjson.loads(result["content"])["skills"]
    assert listed == [
        {"name": name, "description": f"The {name} skill.", "loaded": False}
        for name in ("alpha", "beta", "delta", "gamma")
    ]
    assert "secret" not in result["content"], "links out of the skills folder are never followed"
    assert fake.requests[-1].body["messages"][-1]["content"] == result["content"], "the list reached the model"
    load_tool = next(t for t in fake.requests[0].body["tools"] if t["function"]["name"] == "skill_load_v1")
    assert "alpha, beta, delta, gamma" in load_tool["function"]["description"]
    skipped = [line for line in (LOG_DIR / f"skills-{skilled.port}.log").read_text().splitlines() if "skipped" in line]
    for folder in ("broken", "no-front-matter", "huge", "fifo", "linked-folder", "linked-file"):
        assert any(folder in line for line in skipped), f"{folder}: skipped with a warning"


def test_load_joins_the_system_prompt_from_the_next_step_on(skilled: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("claude-up", [Reply(tokens=[], tool_calls=[load("beta", "c1")]), Reply(tokens=["done"])])
    frames = run_stream(skilled, model="claude", system="You are helpful.")
    [result] = results(frames)
    assert result["is_error"] is False and "beta" in result["content"]
    assert result["skills"] == {"loaded": ["beta"], "added": "beta", "evicted": []}
    first, second = fake.requests
    assert system_prompt(first) == "You are helpful.", "nothing is loaded before the call"
    assert markers(second) == ["beta"]
    assert system_prompt(second).startswith("You are helpful."), "the request's own system prompt comes first"


def test_maximum_loaded_skills_evicts_the_oldest(skilled: ServerProcess, fake: FakeUpstream) -> None:
    steps = [
        Reply(tokens=[], tool_calls=[load("alpha", "c1"), load("beta", "c2")]),
        Reply(tokens=[], tool_calls=[load("gamma", "c3")]),
        Reply(tokens=["done"]),
    ]
    fake.script("gpt-up", steps)
    frames = run_stream(skilled, maximum_loaded_skills=2)
    assert [r["skills"] for r in results(frames)] == [
        {"loaded": ["alpha"], "added": "alpha", "evicted": []},
        {"loaded": ["alpha", "beta"], "added": "beta", "evicted": []},
        {"loaded": ["beta", "gamma"], "added": "gamma", "evicted": ["alpha"]},
    ]
    assert "Unloaded alpha" in results(frames)[2]["content"]
    assert [markers(r) for r in fake.requests] == [[], ["alpha", "beta"], ["beta", "gamma"]]


def test_reloading_keeps_the_eviction_order_and_unload_removes(skilled: ServerProcess, fake: FakeUpstream) -> None:
    steps = [
        Reply(tokens=[], tool_calls=[load("alpha", "c1"), load("beta", "c2")]),
        Reply(tokens=[], tool_calls=[load("alpha", "c3")]),  # already loaded: stays the oldest
        Reply(tokens=[], tool_calls=[load("gamma", "c4")]),
        Reply(tokens=[], tool_calls=[call("skill_unload_v1", {"name": "beta"}, "c5")]),
        Reply(tokens=[], tool_calls=[call("skill_unload_v1", {"name": "beta"}, "c6")]),
        Reply(tokens=["done"]),
    ]
    fake.script("gpt-up", steps)
    frames = run_stream(skilled, maximum_loaded_skills=2)
    outcomes = results(frames)
    assert "already loaded" in outcomes[2]["content"]
    assert outcomes[2]["skills"] == {"loaded": ["alpha", "beta"], "added": None, "evicted": []}
    assert outcomes[3]["skills"]["evicted"] == ["alpha"]
    assert outcomes[4]["skills"] == {"loaded": ["gamma"], "removed": "beta"}
    assert outcomes[5]["skills"] == {"loaded": ["gamma"], "removed": None} and not outcomes[5]["is_error"]
    assert [markers(r) for r in fake.requests] == [
        [],
        ["alpha", "beta"],
        ["alpha", "beta"],
        ["beta", "gamma"],
        ["gamma"],
        ["gamma"],
    ]


def test_unknown_skill_is_an_error_listing_the_available_ones(skilled: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[load("secret", "c1")]), Reply(tokens=["sorry"])])
    [result] = results(run_stream(skilled))
    assert result["is_error"] is True
    assert "unknown skill 'secret'" in result["content"] and "alpha, beta, delta, gamma" in result["content"]
    assert "skills" not in result
    assert markers(fake.requests[-1]) == [] and "SECRET-MARKER" not in system_prompt(fake.requests[-1])


def test_skill_artifacts_from_tool_context(bare: ServerProcess, fake: FakeUpstream) -> None:
    artifact = {"type": "skill", "name": "poet", "description": "Rhymes.", "instructions": "POET-MARKER: rhyme."}
    steps = [
        Reply(tokens=[], tool_calls=[call("skill_list_v1", {}, "c1"), load("poet", "c2")]),
        Reply(tokens=["done"]),
    ]
    fake.script("gpt-up", steps)
    context = {"documents": [{"type": "text", "value": "not a skill"}], "skills": [artifact]}
    listed, loaded = results(run_stream(bare, tool_context=context))
    assert orjson.loads(listed["content"]) == {"skills": [{"name": "poet", "description": "Rhymes.", "loaded": False}]}
    assert loaded["skills"] == {"loaded": ["poet"], "added": "poet", "evicted": []}
    assert "POET-MARKER" not in system_prompt(fake.requests[0])
    assert "POET-MARKER: rhyme." in system_prompt(fake.requests[1])


def history_turn(call_id: str, tool: str, skill: str, is_error: bool = False) -> list[dict[str, Any]]:
    use = {"type": "tool_use", "id": call_id, "name": tool, "input": {"name": skill}}
    result = {"type": "tool_result", "tool_use_id": call_id, "content": "ok", "is_error": is_error}
    return [{"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}]


def test_a_conversation_continues_with_the_skills_its_history_loaded(
    skilled: ServerProcess, fake: FakeUpstream
) -> None:
    tools = [{"type": "skill_load_v1", "name": "load_skill"}, {"type": "skill_unload_v1", "name": "drop_skill"}]
    history = [
        *USER,
        *history_turn("h1", "load_skill", "alpha"),
        *history_turn("h2", "load_skill", "beta", is_error=True),  # failed: not loaded
        *history_turn("h3", "load_skill", "gamma"),
        *history_turn("h4", "skill_load_v1", "beta"),  # not a tool of this request
        *history_turn("h5", "drop_skill", "alpha"),
        *history_turn("h6", "load_skill", "delta"),
        *history_turn("h7", "load_skill", "beta"),  # the cap of 2 evicts gamma
        {"role": "user", "content": "Go on."},
    ]
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[load("alpha", "c1", "load_skill")]), Reply(tokens=["ok"])])
    frames = run_stream(skilled, messages=history, tools=tools, maximum_loaded_skills=2)
    assert markers(fake.requests[0]) == ["delta", "beta"], "restored from the history before the first call"
    assert results(frames)[0]["skills"] == {"loaded": ["beta", "alpha"], "added": "alpha", "evicted": ["delta"]}
    assert markers(fake.requests[1]) == ["beta", "alpha"]


@pytest.mark.parametrize(
    ("tool_context", "field"),
    [
        ([{"type": "skill", "name": "x", "description": "d"}], "tool_context.0.instructions"),
        (
            [
                {"type": "text", "value": "v"},
                {"type": "skill", "name": "no spaces", "description": "d", "instructions": "i"},
            ],
            "tool_context.1.name",
        ),
        (
            {"skills": [{"type": "skill", "name": "x", "description": "", "instructions": "i"}]},
            "tool_context.skills.0.description",
        ),
        ([{"type": "skill", "name": "x", "description": "d", "instructions": "i", "extra": 1}], "tool_context.0.extra"),
        ([{"type": "skill", "name": "x", "description": "d", "instructions": "i"}] * 2, "tool_context.1.name"),
        (
            [{"type": "skill", "name": "x", "description": "d", "instructions": "i" * 300_000}],
            "tool_context.0.instructions",
        ),
        (None, "tool_context"),  # skill tools with no skills_dir and no skill artifact
        ([{"type": "text", "value": "only a document"}], "tool_context"),
    ],
)
def test_bad_skill_requests_are_422(bare: ServerProcess, fake: FakeUpstream, tool_context: Any, field: str) -> None:
    body = {"model": "gpt", "max_tokens": 16, "messages": USER, "tools": LOAD_ALL, "tool_context": tool_context}
    with bare.client() as c:
        resp = c.post("/v1/messages", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["details"][0]["field"] == field
    assert fake.requests == [], "refused before any model call"


def test_skill_md_parsing() -> None:
    text = "\ufeff---\r\nname: pdf\r\ndescription: 'Forms: fill them'\r\nlicense: MIT\r\n---\r\n\r\nStep 1.\r\n"
    assert parse_skill_md(text) == Skill("pdf", "Forms: fill them", "Step 1.")
    for broken in ("no front matter", "---\nname: a\n", "---\n- a list\n---\nx", "---\nname: a\n---\nbody"):
        with pytest.raises(ValueError):
            parse_skill_md(broken)
    with pytest.raises(ValueError, match="instructions"):
        parse_skill_md("---\nname: a\ndescription: d\n---\n   \n")


def test_a_request_without_skills_is_not_affected(skilled: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["plain"]))
    with skilled.client() as c:
        resp = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 16, "messages": USER, "system": "S"})
    assert resp.status_code == 200, resp.text
    assert system_prompt(fake.requests[0]) == "S" and "tools" not in fake.requests[0].body
