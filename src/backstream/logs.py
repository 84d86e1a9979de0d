"""Log lines that user-supplied values cannot forge, in text or JSON, with the run's context on each.

Ids, names and messages from requests end up in log messages. A value holding a
newline would otherwise start a line of its own that reads like a real record, so
the text formatter escapes every control character in the rendered line, and indents
tracebacks so that none of their lines starts at the left margin either. JSON lines
are one `orjson.dumps` each: control characters are escaped by construction.

Every line written while a request or a run is being handled carries its context
(`message_id`, `request_id`, `tenant`, `model`): the edge and the executor set these
context variables once per request or run, and `ContextFilter` copies them onto records.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators some viewers break on.
_CONTROL_CODES = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {
    code: _SHORT.get(chr(code)) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _CONTROL_CODES
}

TRACE_INDENT = "    | "
_JSON_EXTRA_ESCAPES = {code: f"\\u{code:04x}" for code in (0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)}

CONTEXT_KEYS = ("message_id", "request_id", "tenant", "model")
_CONTEXT: dict[str, ContextVar[str | None]] = {k: ContextVar(f"backstream_{k}", default=None) for k in CONTEXT_KEYS}


def bind(**fields: str | None) -> None:
    """Set context for every log line of the current request or run (its task and the tasks it starts)."""
    for key, value in fields.items():
        _CONTEXT[key].set(value)


def context() -> dict[str, str]:
    """The context fields that are set, by name."""
    out = {}
    for key, var in _CONTEXT.items():
        value = var.get()
        if value is not None:
            out[key] = value
    return out


def escape_controls(text: str) -> str:
    """`text` on one line: control characters become visible escapes such as `\\n`."""
    return text.translate(_ESCAPES)


class ContextFilter(logging.Filter):
    """Copies the request/run context onto each record (`record.context`), never replacing one given in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "context"):
            record.context = context()
        return True


class SafeFormatter(logging.Formatter):
    """A formatter whose every record is one line, plus indented traceback lines; the context as `key=value`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ctx: dict[str, Any] = getattr(record, "context", {})  # `fields` are in the message already
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return escape_controls(line)

    def formatException(self, ei: object) -> str:
        return _indent(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the context and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "context", {}),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # orjson escapes what JSON requires (below 0x20); these also break lines in some readers.
        return orjson.dumps(line, default=str).decode().translate(_JSON_EXTRA_ESCAPES)


def _indent(text: str) -> str:
    # A traceback ends with the exception's message, which may carry user input: after the
    # indent, no line of it can pass for a record of its own. Other controls are escaped.
    lines = (escape_controls(line) for line in text.splitlines())
    return "\n".join(TRACE_INDENT + line for line in lines)


def check_level(level: str) -> str:
    """The level in upper case, or ValueError naming the accepted ones."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    return level.upper()


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr: text through SafeFormatter, or JSON lines; every record gets the context."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else SafeFormatter(LINE_FORMAT))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=check_level(level), handlers=[handler], force=True)
