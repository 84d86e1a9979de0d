"""A fake OpenAI-compatible `POST /v1/embeddings`: word-hashing vectors, recorded requests, a failure switch."""

from __future__ import annotations

import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

DIMENSIONS = 64


def vector(text: str) -> list[float]:
    """A bag of words hashed into DIMENSIONS buckets: texts sharing words point the same way."""
    out = [0.0] * DIMENSIONS
    for word in re.findall(r"\w+", text.lower()):
        out[zlib.crc32(word.encode()) % DIMENSIONS] += 1.0
    return out


class FakeEmbeddings:
    """Serves /v1/embeddings on 127.0.0.1 in a thread; `fail = True` answers 500."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # {"headers": {...}, "body": {...}}
        self.fail = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                owner.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                )
                if owner.fail or self.path != "/v1/embeddings":
                    self._answer(500, {"error": {"message": "embeddings are down", "type": "server_error"}})
                    return
                data = [
                    {"object": "embedding", "index": i, "embedding": vector(t)} for i, t in enumerate(body["input"])
                ]
                self._answer(200, {"object": "list", "data": data, "model": body.get("model")})

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                raw = orjson.dumps(payload)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeEmbeddings:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
