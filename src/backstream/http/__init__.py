"""The HTTP edge: app factory, one ASGI middleware per concern, one module per surface.

Only this package knows HTTP: it maps the core's domain errors (`backstream.errors`)
to statuses and the shared error shape. The core never imports it.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
