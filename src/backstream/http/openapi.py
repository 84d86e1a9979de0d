"""The OpenAPI document: shared response docs, the chat body example, and the ChatRequest schema in components."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..api_models import ChatRequest, ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        413: "Body too large",
        422: "Invalid request (field-level details)",
        502: "Upstream provider failed",
        503: "Upstream overloaded",
        504: "Upstream timed out",
    }.items()
}

REQUEST_EXAMPLE = {
    "model": "local",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Write a haiku about rivers."}],
    "stream": True,
}


def chat_body_doc() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatRequest"},
                    "example": REQUEST_EXAMPLE,
                }
            },
        }
    }


# Summaries in the docs' operation lists, where the handler's name alone would be the summary ("Start", "Watch").
SUMMARIES = {
    ("get", "/healthz"): "Liveness",
    ("get", "/readyz"): "Readiness",
    ("get", "/metrics"): "Prometheus metrics",
    ("get", "/v1/models"): "List models",
    ("post", "/v1/messages"): "Create a message",
    ("post", "/v1/messages/async"): "Start a background run",
    ("get", "/v1/messages/async"): "List background runs",
    ("get", "/v1/messages/async/{message_id}/stream"): "Watch a run (SSE, resumable)",
    ("get", "/v1/messages/async/{message_id}/status"): "A run's status",
    ("get", "/v1/messages/async/{message_id}/result"): "A run's result message",
    ("post", "/v1/messages/async/{message_id}/cancel"): "Cancel a run",
    ("post", "/v1/chat/completions"): "Create a chat completion (OpenAI dialect)",
    ("post", "/v1/responses"): "Create a response (OpenAI Responses dialect)",
    ("get", "/v1/responses/{response_id}"): "Retrieve a response",
    ("delete", "/v1/responses/{response_id}"): "Delete a response",
    ("post", "/v1/responses/{response_id}/cancel"): "Cancel a background response",
}


def _summarise(paths: dict[str, Any]) -> None:
    for path, item in paths.items():
        for method, operation in item.items():
            summary = SUMMARIES.get((method, path))
            if summary is not None:
                operation["summary"] = summary


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _summarise(doc.get("paths", {}))
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        chat_schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(chat_schema.pop("$defs", {}))
        schemas["ChatRequest"] = chat_schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
