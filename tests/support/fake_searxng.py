"""A stand-in for a SearxNG instance: `GET /search?q=…&format=json` answered with SearxNG-shaped JSON.

A real HTTP server (http.server in a thread) that records every query it receives, so tests
can check what reached it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class FakeSearxng:
    """`results` are SearxNG result objects ({url, title, content, engine, …}), returned for any query."""

    def __init__(self, results: list[dict[str, Any]] | None = None) -> None:
        self.results = results or []
        self.queries: list[dict[str, list[str]]] = []  # the query string of each /search request
        fake = self

        class Handler(BaseHTTPRequestHandler):
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
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeSearxng:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
