"""The stream store: background runs and their event logs, behind one small interface.

Backends: `memory` (tests, throwaway), `sqlite` (the embedded default), `redis`
(several replicas); `deployment.py` picks one. Watchers read only from the store;
an event becomes visible to them only after the backend has made it durable.
"""

from __future__ import annotations

from .base import TERMINAL, FencedOut, RunQuery, RunRecord, StreamStore

__all__ = ["TERMINAL", "FencedOut", "RunQuery", "RunRecord", "StreamStore"]
