"""The default JSON response: serialised by orjson (faster, and the same bytes as events use)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class ORJSONResponse(JSONResponse):
    """JSONResponse rendered with orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
