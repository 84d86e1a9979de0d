"""Log lines that user-supplied values cannot forge.

Ids, names and messages from requests end up in log messages. A value holding a
newline would otherwise start a line of its own that reads like a real record, so
the formatter escapes every control character in the rendered line, and indents
tracebacks so that none of their lines starts at the left margin either.
"""

from __future__ import annotations

import logging
import sys

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators some viewers break on.
_CONTROL_CODES = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {
    code: _SHORT.get(chr(code)) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _CONTROL_CODES
}

TRACE_INDENT = "    | "


def escape_controls(text: str) -> str:
    """`text` on one line: control characters become visible escapes such as `\\n`."""
    return text.translate(_ESCAPES)


class SafeFormatter(logging.Formatter):
    """A formatter whose every record is one line, plus indented traceback lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: object) -> str:
        return _indent(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    # A traceback ends with the exception's message, which may carry user input: after the
    # indent, no line of it can pass for a record of its own. Other controls are escaped.
    lines = (escape_controls(line) for line in text.splitlines())
    return "\n".join(TRACE_INDENT + line for line in lines)


def configure_logging(level: str) -> None:
    """Root logging to stderr through SafeFormatter (what `logging.basicConfig` did before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(LINE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
