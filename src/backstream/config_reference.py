"""The configuration reference, generated from the settings model: `python -m backstream.config_reference`.

Walks `Settings` (pydantic `model_fields`, nested sections, list and mapping entries) and prints one
Markdown table per section: key path, type, default, environment variable and description. A field's
description is its `Field(description=...)` or else the comment written beside it in config.py, so
docs/configuration.md (checked by tests/test_config_reference.py) cannot drift from the code.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import tokenize
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import config
from .config import ENV_PREFIX, Settings

HEADER = """# Configuration reference

Generated from the settings model (`src/backstream/config.py`) by `python -m backstream.config_reference`;
do not edit by hand (tests/test_config_reference.py fails when it differs from the model).

Settings come from these defaults, then the YAML file (`--config` or `BACKSTREAM_CONFIG`), then environment
variables: `BACKSTREAM_<SECTION>__<KEY>` (values are read as YAML, so `BACKSTREAM_RUNS__MAX_EVENTS=5000` is a
number and `BACKSTREAM_MODELS='[{name: x, provider: openai}]'` a list). Short forms: `BACKSTREAM_STORE`,
`BACKSTREAM_REDIS_URL`, `BACKSTREAM_DATA_DIR`. Entries of lists and mappings (`models[]`, `limits.tenants.<tenant>`)
have no variable of their own: set the whole list or mapping. `required` means the entry must give it.
"""


@dataclass
class Section:
    path: str
    doc: str
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)


def _source_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment beside the field in config.py, or on the lines just above it."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            text = " ".join(above + beside)
            if text:
                out[(node.name, stmt.target.id)] = text
    return out


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{json.dumps(value)}`"


def _model_in(tp: Any) -> tuple[type[BaseModel], str] | None:
    """The settings model a field holds, and the path suffix of its entries: '' (a section), '[]' or '.<key>'."""
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, ""
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _model_in(inner[0]) if len(inner) == 1 else None
    if origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return args[1], ".<key>"
    return None


def _env(path: list[str], settable: bool) -> str:
    return f"`{ENV_PREFIX}{'__'.join(p.upper() for p in path)}`" if settable else "—"


def _walk(model: type[BaseModel], path: list[str], settable: bool, out: list[Section], notes: dict[Any, str]) -> None:
    section = Section(".".join(path) or "top level", inspect.cleandoc(model.__doc__ or ""))
    out.append(section)
    nested: list[tuple[type[BaseModel], list[str], bool]] = []
    for name, info in model.model_fields.items():
        key = [*path, name]
        inner = _model_in(info.annotation)
        desc = info.description or next(
            (notes[c.__name__, name] for c in model.__mro__ if (c.__name__, name) in notes), ""
        )
        if inner and inner[1] == "" and settable and info.default is not None:
            nested.append((inner[0], key, settable))  # a section: its keys get their own table
            continue
        if inner:
            suffix = inner[1].replace("<key>", f"<{name.rstrip('s') or name}>")
            desc = f"{desc.rstrip(':.')}{'. ' if desc else ''}{'Entries' if suffix else 'Keys'}: `{'.'.join(key)}{suffix}`."
            nested.append((inner[0], [*path, name + suffix], settable and not suffix))
        row = (f"`{'.'.join(key)}`", _type_name(info.annotation), _default(info), _env(key, settable), desc)
        section.rows.append(tuple(cell.replace("\n", " ") for cell in row))  # type: ignore[arg-type]
    for sub, key, sub_settable in nested:
        _walk(sub, key, sub_settable, out, notes)


def sections() -> list[Section]:
    out: list[Section] = []
    _walk(Settings, [], True, out, _source_comments())
    return out


def leaf_paths() -> list[str]:
    """Every key path in the reference (with `[]` and `.<name>` for entries of lists and mappings)."""
    return [row[0].strip("`") for s in sections() for row in s.rows]


def render() -> str:
    parts = [HEADER]
    for s in sections():
        if not s.rows:
            continue
        parts.append(f"## `{s.path}`\n" if s.path != "top level" else "## Top level\n")
        if s.doc:
            parts.append(s.doc.replace("\n", " ") + "\n")
        parts.append("| key | type | default | environment variable | description |\n|---|---|---|---|---|")
        parts.extend("| " + " | ".join(row) + " |" for row in s.rows)
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
