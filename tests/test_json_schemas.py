"""In-process checks of the request-schema safety module and the log formatter (issue 10, points 1, 2, 8, 9)."""

from __future__ import annotations

import http.server
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backstream.errors import Invalid as ApiError
from backstream.json_schemas import check_json_depth, check_request_schema, json_too_deep, output_problem
from backstream.logs import TRACE_INDENT, SafeFormatter, escape_controls

CATASTROPHIC = "^(a+)+$"
EVIL = "a" * 40 + "b"


def rejected_field(schema: dict[str, Any]) -> str:
    with pytest.raises(ApiError) as caught:
        check_request_schema(schema, "s")
    assert caught.value.type == "invalid_request_error"  # answered 422 by the HTTP edge
    return caught.value.details[0]["field"]  # type: ignore[index]


@pytest.fixture()
def fetch_log() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "integer"}')

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", hits
    srv.shutdown()
    srv.server_close()


# --- point 1 ---------------------------------------------------------------------------


def test_only_local_references_pass() -> None:
    assert rejected_field({"$ref": "https://example.com/s.json"}) == "s.$ref"
    assert rejected_field({"items": [{"$ref": "file:///etc/passwd"}]}) == "s.items.0.$ref"
    assert rejected_field({"$defs": {"x": {"$recursiveRef": "other.json"}}}) == "s.$defs.x.$recursiveRef"
    assert rejected_field({"$ref": "#/$defs/absent"}) == "s.$ref"
    assert rejected_field({"$schema": "https://example.com/meta", "type": "object"}) == "s.$schema"
    # data keywords hold values, not schemas: a "$ref" or "pattern" inside them is just data
    check_request_schema({"const": {"$ref": "https://example.com/"}, "examples": [{"pattern": "(a)\\1"}]}, "s")
    check_request_schema({"$defs": {"a/b": {"type": "string"}}, "$ref": "#/$defs/a~1b"}, "s")
    check_request_schema({"$defs": {"n": {"$anchor": "num", "type": "integer"}}, "$ref": "#num"}, "s")


def test_the_validator_itself_never_fetches(fetch_log: tuple[str, list[str]]) -> None:
    base, hits = fetch_log
    # schemas that slipped past the request checks (defence in depth): resolution fails, nothing is fetched
    for schema in (
        {"$ref": f"{base}/a.json"},
        {"$id": f"{base}/dir/", "$ref": "b.json"},
        {"$ref": "file:///etc/hostname"},
    ):
        problem = output_problem(schema, 5)
        assert problem is not None and "cannot be resolved" in problem
    assert hits == []


# --- point 2 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, value",
    [
        ({"type": "string", "pattern": CATASTROPHIC}, EVIL),
        ({"propertyNames": {"pattern": CATASTROPHIC}}, {EVIL: 1}),
        (
            {"patternProperties": {CATASTROPHIC: {"type": "string"}}},
            {EVIL: 1, "aaa": 2},
        ),  # "aaa" matches: 2 is no string
        ({"patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False}, {EVIL: 1}),
        ({"patternProperties": {CATASTROPHIC: {}}, "unevaluatedProperties": False}, {EVIL: 1}),
        (
            {
                "$schema": "https://json-schema.org/draft/2019-09/schema",
                "patternProperties": {CATASTROPHIC: {}},
                "unevaluatedProperties": False,
            },
            {EVIL: 1},
        ),
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "patternProperties": {CATASTROPHIC: {}},
                "additionalProperties": False,
            },
            {EVIL: 1},
        ),
    ],
)
def test_every_pattern_path_is_linear(schema: dict[str, Any], value: Any) -> None:
    started = time.perf_counter()
    problem = output_problem(schema, value)
    assert time.perf_counter() - started < 0.05  # Python's re needs minutes on EVIL
    assert problem is not None


def test_patterns_match_like_ecmascript_where_python_differs() -> None:
    assert (
        output_problem({"type": "string", "pattern": "^ab$"}, "ab\n") is not None
    )  # Python's `$` would accept the newline
    assert output_problem({"type": "string", "pattern": "^\\p{L}+$"}, "Zoë") is None  # Python's re has no \p{…}
    assert output_problem({"type": "string", "pattern": "^\\d+$"}, "12") is None


def test_patterns_re2_cannot_run_are_refused_with_their_path() -> None:
    assert rejected_field({"properties": {"x": {"pattern": "(a)\\1"}}}) == "s.properties.x.pattern"
    assert rejected_field({"patternProperties": {"(?<=a)b": {}}}) == "s.patternProperties.(?<=a)b"
    assert rejected_field({"pattern": "a{2000}"}) == "s.pattern"


def test_format_is_not_asserted() -> None:
    # no format checker: a format keyword does no work (and can do no I/O) during output validation
    assert output_problem({"type": "string", "format": "email"}, "not an email") is None


# --- point 9 ---------------------------------------------------------------------------


def test_depth_limit_names_the_path() -> None:
    value: Any = 1
    for _ in range(10):
        value = {"k": [value]}
    check_json_depth({"v": value}, 21)
    with pytest.raises(ApiError) as caught:
        check_json_depth({"v": value}, 20)
    assert caught.value.details[0]["field"] == "v" + ".k.0" * 9 + ".k"  # type: ignore[index]
    deep: Any = []
    for _ in range(5000):  # far past Python's recursion limit: the check itself must not recurse
        deep = [deep]
    with pytest.raises(ApiError):
        check_json_depth({"x": deep}, 64)
    with pytest.raises(ApiError) as caught:  # the raw text only decides; the path still comes from the value
        check_json_depth({"v": value}, 20, orjson.dumps({"v": value}))
    assert caught.value.details[0]["field"] == "v" + ".k.0" * 9 + ".k"  # type: ignore[index]
    check_json_depth({"v": value}, 21, orjson.dumps({"v": value}))


def _depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None:
        return 0
    return 1 + max((_depth(c) for c in children), default=0)


json_values = st.recursive(
    st.none() | st.integers(-(2**53), 2**53) | st.text(alphabet='[]{}"\\ab\n'),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@given(value=json_values, limit=st.integers(1, 12))
@settings(max_examples=300, deadline=None)
def test_raw_depth_check_agrees_with_the_parsed_value(value: Any, limit: int) -> None:
    # brackets and escaped quotes inside strings must not count
    assert json_too_deep(orjson.dumps(value), limit) == (_depth(value) > limit)


def test_recursive_schema_on_deep_output_is_a_problem_not_a_crash() -> None:
    schema = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}
    value: Any = []
    for _ in range(900):
        value = [value]
    assert "nested too deeply" in (output_problem(schema, value) or "")


# --- point 8 ---------------------------------------------------------------------------


def test_formatter_keeps_every_record_on_its_own_line() -> None:
    formatter = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    forged = "INFO backstream.auth: forged"
    record = logging.LogRecord(
        "backstream.t", logging.INFO, __file__, 1, "run %s corr=%s", (f"id\n{forged}", "a\r\x1b[2K\u2028\x85"), None
    )
    line = formatter.format(record)
    assert line == f"INFO backstream.t: run id\\n{forged} corr=a\\r\\x1b[2K\\u2028\\x85"
    try:
        raise ValueError(f"bad\n{forged}")
    except ValueError:
        import sys

        record = logging.LogRecord("backstream.t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0] == "ERROR backstream.t: failed"
    assert all(line.startswith(TRACE_INDENT) for line in lines[1:]) and lines[-1] == TRACE_INDENT + forged


def test_escape_controls_leaves_ordinary_text_alone() -> None:
    text = "plain ascii, ünïcödé, emoji 🎈, quotes \" ' and backslash \\"
    assert escape_controls(text) == text
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", escape_controls("".join(map(chr, range(0x200)))))
