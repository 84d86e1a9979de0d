"""A fake OpenAI-compatible `POST /v1/embeddings`: word-hashing vectors, recorded requests, a failure switch."""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from tests.support.local_http import LocalHttpServer, QuietHandler

DIMENSIONS = 64


def vector(text: str) -> list[float]:
    """A bag of words hashed into DIMENSIONS buckets: texts sharing words point the same way."""
    out = [0.0] * DIMENSIONS
    for word in re.findall(r"\w+", text.lower()):
        out[zlib.crc32(word.encode()) % DIMENSIONS] += 1.0
    return out


class FakeEmbeddings(LocalHttpServer):
    """Serves /v1/embeddings on 127.0.0.1 in a thread; `fail = True` answers 500."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # {"headers": {...}, "body": {...}}
        self.fail = False
        owner = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
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
                self.reply(status, orjson.dumps(payload), {"content-type": "application/json"})

        super().__init__(Handler)
        self.base_url = f"{self.url}/v1"
