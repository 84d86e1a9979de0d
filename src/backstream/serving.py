"""uvicorn's server, with a shutdown in the order durable streams need.

uvicorn on SIGTERM stops accepting, waits for connections to finish, cuts the rest
after a timeout, and only then runs the application's shutdown. Watchers of
background runs never finish by themselves, so they were cut without a final
event. Here the application drains first: stop accepting, end or hand back the
runs (their watchers receive stream_end, or a clean close they can resume from),
then let uvicorn close what is left, all within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger("backstream.serve")

DRAIN_SHARE = 0.8  # of the grace period for runs and watchers; the rest for other connections


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains runs and watchers before connections are closed."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], grace_s: float) -> None:
        config.timeout_graceful_shutdown = max(1, int(grace_s * (1 - DRAIN_SHARE)))
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while runs are ended; uvicorn closes again, harmlessly
        budget = self.grace_s * DRAIN_SHARE
        try:
            await asyncio.wait_for(self.drain(budget), budget + 1)
        except Exception as exc:  # shutdown goes on: recovery or a peer's takeover ends what is left
            log.warning("draining runs did not finish (%s: %s)", type(exc).__name__, exc)
        await super().shutdown(sockets)
