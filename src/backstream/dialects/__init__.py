"""Wire dialects: adapters at the HTTP edge between foreign APIs and Backstream's own.

Each dialect module is pure (no FastAPI, no store): it parses its request body into a
native request dict (which the edge validates with `ChatRequest`), renders canonical
events into its SSE bytes with a stateful per-stream renderer, folds a finished run
into its non-streamed object and maps the native error shape onto its own.

    anthropic         Anthropic Messages (`POST /v1/messages` with `anthropic-version`)
    openai_chat       OpenAI Chat Completions (`POST /v1/chat/completions`)
    openai_responses  OpenAI Responses (`POST /v1/responses`, background mode)

Renderers are deterministic functions of the event log, so the bytes one watcher
renders for an event are the bytes every other watcher of that run would render: they
are cached on the event per dialect (`common.cached`) and shared, like the native frame.
"""

from __future__ import annotations

ANTHROPIC = "anthropic"
OPENAI_CHAT = "chat"
OPENAI_RESPONSES = "responses"
NATIVE = "native"

__all__ = ["ANTHROPIC", "NATIVE", "OPENAI_CHAT", "OPENAI_RESPONSES"]
