"""A stand-in for a SearxNG instance: `GET /search?q=…&format=json` answered with SearxNG-shaped JSON.

A real HTTP server (http.server in a thread) that records every query it receives, so tests
can check what reached it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.local_http import LocalHttpServer, QuietHandler


class FakeSearxng(LocalHttpServer):
    """`results` are SearxNG result objects ({url, title, content, engine, …}), returned for any query."""

    def __init__(self, results: list[dict[str, Any]] | None = None) -> None:
        self.results = results or []
        self.queries: list[dict[str, list[str]]] = []  # the query string of each /search request
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                parts = urlsplit(self.path)
                if parts.path != "/search":
                    self.send_error(404)
                    return
                query = parse_qs(parts.query)
                fake.queries.append(query)
                if query.get("format") != ["json"]:
                    self.send_error(403)  # what SearxNG answers when the format is not enabled
                    return
                body = json.dumps(
                    {
                        "query": query.get("q", [""])[0],
                        "number_of_results": len(fake.results),
                        "results": fake.results,
                        "answers": [],
                        "suggestions": [],
                        "unresponsive_engines": [],
                    }
                ).encode()
                self.reply(200, body, {"Content-Type": "application/json"})

        super().__init__(Handler)
