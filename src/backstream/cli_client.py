"""`backstream chat` and `backstream runs …`: the command line over the Python client.

Text is rendered as it arrives; on a terminal a status line follows it (seq, state, usage).
`--json` prints machine-readable output instead: one JSON object per event (NDJSON) for
streams, one JSON document for everything else. The client is imported only when a
command runs, so `backstream serve` does not load it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from .client import Client, StreamEvent

Url = Annotated[
    str | None, typer.Option("--url", envvar="BACKSTREAM_URL", help="Server [default: http://127.0.0.1:8080]")
]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="BACKSTREAM_API_KEY", help="API key or token")]
Tenant = Annotated[str | None, typer.Option("--tenant", envvar="BACKSTREAM_TENANT", help="X-Tenant")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output (NDJSON for streams)")]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Model name or alias [default: the server's]")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate")]
System = Annotated[str | None, typer.Option("--system", help="System prompt")]
MessageId = Annotated[str, typer.Argument(help="The run's message_id")]

runs = typer.Typer(no_args_is_help=True, help="Background runs: start, watch, status, result, list, cancel, delete.")


def register(cli: typer.Typer) -> None:
    """Adds `chat` and `runs` to the `backstream` command."""
    cli.command("chat")(chat)
    cli.add_typer(runs, name="runs")


def _client(url: str | None, api_key: str | None, tenant: str | None) -> Client:
    from .client import Client

    return Client(url, api_key, tenant)


def _body(prompt: str, model: str | None, max_tokens: int, system: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    if model:
        body["model"] = model
    if system:
        body["system"] = system
    return body


def _guarded(action: Callable[[], None]) -> None:
    """Runs a command; a typed error becomes one line on stderr and exit status 1 (2 for a bad request)."""
    from .client import BackstreamError

    try:
        action()
    except BackstreamError as exc:
        rid = f" [request {exc.request_id}]" if exc.request_id else ""
        typer.echo(f"backstream: {exc}{rid}", err=True)
        for detail in exc.details or []:
            typer.echo(f"  {detail}", err=True)
        raise typer.Exit(2 if exc.status_code in (400, 422) else 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print_json(value: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


def _render(events: Iterable[StreamEvent], as_json: bool, label: str) -> None:
    """Streams events: NDJSON, or live text (and a status line on a terminal)."""
    if as_json:
        for event in events:
            _print_json({"seq": event.seq, "type": event.type, "data": event.data})
        return
    from .cli_render import render_live

    render_live(events, label)


# ---------------------------------------------------------------- commands


def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask")],
    model: Model = None,
    max_tokens: MaxTokens = 512,
    system: System = None,
    url: Url = None,
    api_key: ApiKey = None,
    tenant: Tenant = None,
    json: Json = False,
) -> None:
    """Chat synchronously: the answer's tokens are printed as they arrive."""

    def act() -> None:
        with _client(url, api_key, tenant) as c:
            _render(c.chat(**_body(prompt, model, max_tokens, system)), json, "chat")

    _guarded(act)


@runs.command("start")
def runs_start(
    prompt: Annotated[str, typer.Argument(help="What to ask")],
    model: Model = None,
    max_tokens: MaxTokens = 512,
    system: System = None,
    message_id: Annotated[str | None, typer.Option("--message-id", help="A custom id")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Then watch it")] = False,
    url: Url = None,
    api_key: ApiKey = None,
    tenant: Tenant = None,
    json: Json = False,
) -> None:
    """Start a background run; prints its message_id (and watches it with --watch)."""

    def act() -> None:
        with _client(url, api_key, tenant) as c:
            run = c.start(message_id=message_id, **_body(prompt, model, max_tokens, system))
            if json:
                _print_json({"message_id": run.message_id, "status": run.status})
            else:
                typer.echo(run.message_id)
            if watch:
                _render(c.watch(run.message_id), json, run.message_id)

    _guarded(act)


@runs.command("watch")
def runs_watch(
    message_id: MessageId,
    after: Annotated[int | None, typer.Option("--after", help="Only events after this seq")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    tenant: Tenant = None,
    json: Json = False,
) -> None:
    """Watch a run live until it ends; reconnects by itself (no gap, no repeat) across disconnects."""

    def act() -> None:
        with _client(url, api_key, tenant) as c:
            _render(c.watch(message_id, after=after), json, message_id)

    _guarded(act)


def _show(fetch: Callable[[Client], Any], url: str | None, api_key: str | None, tenant: str | None, json: bool) -> None:
    def act() -> None:
        with _client(url, api_key, tenant) as c:
            value = fetch(c)
        if json:
            _print_json(value)
        else:
            from .cli_render import show

            show(value)

    _guarded(act)


@runs.command("status")
def runs_status(
    message_id: MessageId, url: Url = None, api_key: ApiKey = None, tenant: Tenant = None, json: Json = False
) -> None:
    """A run's state and metadata."""
    _show(lambda c: c.status(message_id), url, api_key, tenant, json)


@runs.command("result")
def runs_result(
    message_id: MessageId, url: Url = None, api_key: ApiKey = None, tenant: Tenant = None, json: Json = False
) -> None:
    """A run folded into one message (what exists so far while it runs), plus its status."""
    _show(lambda c: c.result(message_id), url, api_key, tenant, json)


@runs.command("cancel")
def runs_cancel(
    message_id: MessageId, url: Url = None, api_key: ApiKey = None, tenant: Tenant = None, json: Json = False
) -> None:
    """Stop a pending or running run."""
    _show(lambda c: c.cancel(message_id), url, api_key, tenant, json)


@runs.command("delete")
def runs_delete(
    message_id: MessageId, url: Url = None, api_key: ApiKey = None, tenant: Tenant = None, json: Json = False
) -> None:
    """Cancel a run if it is active, then remove it."""

    def fetch(c: Client) -> dict[str, Any]:
        c.delete(message_id)
        return {"message_id": message_id, "deleted": True}

    _show(fetch, url, api_key, tenant, json)


@runs.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option("--status", help="pending, processing, completed, …")] = None,
    model: Model = None,
    created_after: Annotated[str | None, typer.Option("--created-after", help="ISO-8601 time")] = None,
    created_before: Annotated[str | None, typer.Option("--created-before", help="ISO-8601 time")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Page size")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    tenant: Tenant = None,
    json: Json = False,
) -> None:
    """The runs of this tenant, every page (needs the server's listing endpoint, GET /v1/messages/async)."""

    def fetch(c: Client) -> list[dict[str, Any]]:
        from .client import BackstreamError

        try:
            return list(
                c.list(
                    status=status, model=model, created_after=created_after, created_before=created_before, limit=limit
                )
            )
        except BackstreamError as exc:
            if exc.status_code == 405:  # a server from before the listing endpoint
                exc.message = "this server cannot list runs (no GET /v1/messages/async)"
            raise

    _show(fetch, url, api_key, tenant, json)
