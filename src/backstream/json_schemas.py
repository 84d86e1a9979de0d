"""JSON Schemas and JSON bodies from requests, made safe to check and to validate against.

A schema in a request is a stranger's program: checking it or validating output
against it must never fetch a URL, read a file, or run for unbounded time on the
event loop. Hence:

- only same-document references (`#…`) are accepted, and the validator's registry
  refuses any retrieval anyway (defence in depth);
- `pattern` / `patternProperties` run on RE2, whose matching is linear in the input;
  patterns RE2 cannot compile (backreferences, lookaround) are refused up front;
- `format` is an annotation only: output validation has no format checker, so a
  format keyword does no work at all;
- bodies nested deeper than a limit are refused before anything recurses over them.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import re2
import referencing
import referencing.exceptions

from .errors import Invalid

REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
# Keywords whose values are data, not schemas: a "$ref" or "pattern" inside them means nothing.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
MAX_FIELD_CHARS = 200  # a field path in an error is cut here: a deep path is long


class SchemaRejected(Exception):
    """A request schema the server will not use; `path` is dotted, relative to the schema."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# --- regular expressions --------------------------------------------------------------


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is the client's problem, not a line on our stderr
    options.max_mem = 2 << 20  # per program: a huge pattern fails to compile (422) instead of eating memory
    return options


_RE2_OPTIONS = _re2_options()


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """An RE2 program for a schema pattern; raises re2.error for what RE2 cannot run."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _pattern_error(pattern: str) -> str | None:
    try:
        compile_pattern(pattern)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"pattern {pattern!r} is not supported: {why} (patterns run on RE2: no backreferences or lookaround)"
    return None


class _Re2Search:
    """Stands in for the `re` module inside jsonschema's keyword code, which only calls `re.search`.

    `pattern`, `patternProperties`, and the `additionalProperties` /
    `unevaluatedProperties` bookkeeping all match there; replacing the module they
    see covers every one of them, where overriding single keywords would miss some.
    Anything but `search` fails loudly (AttributeError) if a new jsonschema needs more.
    """

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        return compile_pattern(pattern).search(string)


def _route_jsonschema_regexes_to_re2() -> None:
    for module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
        if getattr(module, "re", None) not in (re, _Re2Search):
            raise RuntimeError(f"{module.__name__} no longer matches with `re`; review json_schemas.py")
        module.re = _Re2Search


_route_jsonschema_regexes_to_re2()


# --- request-time checks ---------------------------------------------------------------


def _walk_schema(schema: Any) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, keyword, value) for every keyword of every (sub)schema, skipping data keywords."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            child = f"{path}.{key}" if path else str(key)
            if isinstance(node, dict):
                yield child, str(key), value
                if key in DATA_KEYWORDS:
                    continue
            if isinstance(value, (dict, list)):
                stack.append((child, value))


def _keyword_problem(key: str, value: Any) -> tuple[str, str] | None:
    """(relative field, message) when one keyword makes the schema unusable."""
    if key in REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
        return "", f"{key} {value!r} is not allowed: only references within the schema (#/…, #/$defs/…) are"
    if key == "pattern" and isinstance(value, str):
        message = _pattern_error(value)
        return ("", message) if message else None
    if key == "patternProperties" and isinstance(value, dict):
        for pattern in value:
            message = _pattern_error(pattern)
            if message:
                return f".{pattern}", message
    return None


def _dangling_pointer(schema: dict[str, Any], ref: str) -> bool:
    """Whether `#/a/b` points at nothing in `schema` (anchors like `#name` are not checked here)."""
    if not ref.startswith("#/"):
        return False
    node: Any = schema
    for token in ref[2:].split("/"):
        token = unquote(token).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdecimal() and int(token) < len(node):
            node = node[int(token)]
        else:
            return True
    return False


def _dangling_refs(schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    found = list(_walk_schema(schema))
    if any(key == "$id" and "." in path for path, key, _ in found):
        return  # a nested $id moves the base of the refs below it; those are checked when used
    for path, key, value in found:
        if key == "$ref" and isinstance(value, str) and _dangling_pointer(schema, value):
            yield path, f"$ref {value!r} points at nothing in the schema"


def _metaschema_problem(schema: dict[str, Any]) -> SchemaRejected | None:
    if "$schema" in schema and (
        not isinstance(schema["$schema"], str) or jsonschema.validators.validator_for(schema, default=None) is None
    ):
        return SchemaRejected(
            "$schema", f"unknown $schema {schema['$schema']!r}; leave it out or name a JSON Schema draft"
        )
    cls = jsonschema.validators.validator_for(schema)
    # Patterns were already checked with RE2 (the engine that will run them), so the
    # metaschema's `format: regex` (Python's re) is left out.
    formats = [name for name in cls.FORMAT_CHECKER.checkers if name != "regex"]
    try:
        cls.check_schema(schema, format_checker=jsonschema.FormatChecker(formats))
    except jsonschema.SchemaError as exc:
        # The field stays the schema itself (the metaschema's idea of "where" can mislead); the message says where.
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return SchemaRejected("", f"not a valid JSON Schema at {where}: {exc.message}")
    except RecursionError:  # only past limits.max_json_depth's range; refused rather than a 500
        return SchemaRejected("", "the schema is nested too deeply to check")
    return None


def check_request_schema(schema: dict[str, Any], field: str) -> None:
    """Refuse (422 naming the field) a schema with a non-local reference, an RE2-incompatible pattern, or invalid structure."""
    for path, key, value in _walk_schema(schema):
        problem = _keyword_problem(key, value)
        if problem is not None:
            raise _rejected(field, SchemaRejected(path + problem[0], problem[1]))
    rejected = _metaschema_problem(schema)
    if rejected is not None:
        raise _rejected(field, rejected)
    for path, message in _dangling_refs(schema):
        raise _rejected(field, SchemaRejected(path, message))


def _rejected(field: str, exc: SchemaRejected) -> Invalid:
    where = _cut(f"{field}.{exc.path}" if exc.path else field)
    return Invalid(exc.message, where)


def _cut(path: str) -> str:
    return path if len(path) <= MAX_FIELD_CHARS else path[:MAX_FIELD_CHARS] + "…"


_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")  # as signed bytes: +1 and -1


def json_too_deep(raw: bytes, limit: int) -> bool:
    """Whether valid JSON `raw` nests containers deeper than `limit`, at C speed.

    Strings are cut out and only brackets kept. A few passes drop the innermost pairs
    (one level each: wide, shallow bodies vanish here); what is left is measured by a
    running sum of +1/-1. A walk over the parsed value in Python costs several times more.
    """
    brackets = _outside_strings(raw).translate(_SQUARE, _NOT_BRACKET)
    passes = min(limit, 4)
    for _ in range(passes):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    signed = memoryview(brackets.translate(_STEPS)).cast("b")
    return max(itertools.accumulate(signed), default=0) > limit - passes


def _outside_strings(raw: bytes) -> bytes:
    """Valid JSON text without its strings. Escaped backslashes go first, then escaped quotes:
    every quote left delimits a string, so the even pieces between quotes are the rest."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(unescaped.split(b'"')[::2])


def check_json_depth(value: Any, limit: int, raw: bytes | None = None) -> None:
    """Refuse (422) a JSON value with containers nested deeper than `limit`, naming where.

    `raw`, the value's JSON text, makes the common case cheap: only a body found too deep
    is walked, to name the path. The walk is iterative: the point is to get there before
    anything recursive does.
    """
    if raw is not None and not json_too_deep(raw, limit):
        return
    Link = tuple[Any, Any]  # (parent link or None, key): the path is spelled out only for the error
    stack: list[tuple[Any, int, Link | None]] = [(value, 1, None)]
    while stack:
        node, depth, link = stack.pop()
        if depth > limit:
            raise Invalid(
                f"JSON nested more than {limit} levels deep (limits.max_json_depth)", _cut(_spell(link) or "body")
            )
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, (link, key)))


def _spell(link: tuple[Any, Any] | None) -> str:
    keys = []
    while link is not None:
        link, key = link
        keys.append(str(key))
    return ".".join(reversed(keys))


# --- validating output -----------------------------------------------------------------


def _refuse_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]  # attrs class: ref is its field


# Only the schema itself (and the bundled metaschemas) can be referenced: nothing is fetched.
NO_FETCH_REGISTRY: referencing.Registry[Any] = referencing.Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


def output_problem(schema: dict[str, Any], value: Any) -> str | None:
    """Why `value` does not satisfy `schema` (a message naming where), or None when it does."""
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, registry=NO_FETCH_REGISTRY)  # no format_checker: formats do no work
    try:
        problem = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except referencing.exceptions.Unresolvable as exc:
        return f"the schema has a reference that cannot be resolved ({exc})"
    except RecursionError:
        return "the output is nested too deeply to validate against the schema"
    except re2.error:  # patterns were compiled at request time; jsonschema also joins them with "|"
        return "the schema's patterns could not be run"
    if problem is None:
        return None
    where = "/".join(str(p) for p in problem.absolute_path) or "(root)"
    return f"does not match the schema at {where}: {problem.message}"
