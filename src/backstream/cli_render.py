"""How the client commands show things to people: live text with a status line, and documents.

On a terminal a stream is a rich `Live` view (the text so far, then a status line: run,
seq, state, usage); piped, the text goes to stdout as it arrives and the status line to
stderr once the stream ends, so `backstream chat … > file` captures the answer alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

if TYPE_CHECKING:
    from .client import StreamEvent

_DELTA_STYLE = {"text_delta": "", "thinking_delta": "dim italic"}


class StreamView:
    """What a stream showed so far: its text, and the facts of the status line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.text = Text()
        self.seq = 0
        self.state = "waiting"
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None

    def feed(self, event: StreamEvent) -> str:
        """Takes an event in; returns the text it adds (for the plain renderer)."""
        self.seq = event.seq
        data = event.data
        if event.type in _DELTA_STYLE:
            delta = str(data.get("delta") or "")
            self.text.append(delta, style=_DELTA_STYLE[event.type])
            self.state = "streaming"
            return delta if event.type == "text_delta" else ""
        if event.type == "stream_start":
            self.state = f"started on {data.get('model')}"
        elif event.type == "tool_call_start":
            self.state = f"calling {data.get('name')}"
        elif event.type == "stream_end":
            self.state = str(data.get("finish_reason"))
            self.usage = data.get("usage")
            err = data.get("error")
            self.error = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else None
        return ""

    def status_line(self) -> Text:
        parts = [self.label, f"seq {self.seq}", self.state]
        if self.usage:
            parts.append(f"{self.usage.get('prompt_tokens') or 0} in / {self.usage.get('completion_tokens') or 0} out")
        line = Text(" · ".join(parts), style="bold cyan")
        if self.error:
            line.append(f"  {self.error}", style="bold red")
        return line


def render_live(events: Iterable[StreamEvent], label: str) -> None:
    view = StreamView(label)
    if not sys.stdout.isatty():
        for event in events:
            added = view.feed(event)
            if added:
                sys.stdout.write(added)
                sys.stdout.flush()
        sys.stdout.write("\n")
        Console(stderr=True, highlight=False).print(view.status_line())
        return
    console = Console(highlight=False)
    with Live(Group(view.text, view.status_line()), console=console, refresh_per_second=12) as live:
        for event in events:
            view.feed(event)
            live.update(Group(view.text, view.status_line()))


def show(value: Any) -> None:
    """A response document for people: a message's text, a table of runs, or the document itself."""
    console = Console(highlight=False)
    if isinstance(value, dict) and value.get("type") == "message":
        for block in value.get("content") or []:
            console.print(block.get("text") or block.get("thinking") or block, markup=False)
        usage = value.get("usage") or {}
        console.print(
            f"[bold cyan]{value.get('status')} · {value.get('finish_reason')} · "
            f"{usage.get('prompt_tokens')} in / {usage.get('completion_tokens')} out[/]"
        )
        return
    if isinstance(value, list):
        from rich.table import Table

        table = Table("message_id", "status", "model", "created_at")
        for run in value:
            table.add_row(
                str(run.get("message_id")),
                str(run.get("status")),
                str((run.get("metadata") or {}).get("model")),
                str(run.get("created_at")),
            )
        console.print(table)
        return
    console.print_json(data=value)
