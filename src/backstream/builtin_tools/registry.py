"""Which module implements each built-in tool type, and the request checks they need before a run starts.

Modules are imported on first use: a request without built-in tools never loads
their libraries (PDF parsing, psycopg, the embedding model).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from .base import BuiltinTool

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import Settings

MODULES = {
    "semantic_search_v1": "search",
    "database_query_v1": "database",
    "web_fetch_v1": "web",
    "web_search_v1": "web",
    "skill_list_v1": "skills",
    "skill_load_v1": "skills",
    "skill_unload_v1": "skills",
    "code_execution_v1": "sandbox",
}


def module_for(tool_type: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{MODULES[tool_type]}")


def create(tool_type: str) -> BuiltinTool:
    """A fresh tool of this type for one run (each module's TOOLS maps its types to factories)."""
    factory = module_for(tool_type).TOOLS[tool_type]
    tool: BuiltinTool = factory()
    return tool


def check_request(chat: ChatRequest, settings: Settings) -> None:
    """Refuse (errors.Invalid, a 422) what a built-in tool cannot accept, before anything runs or connects.

    Each module with built-in tools in the request may define `check_request(chat, settings)`.
    """
    checked: set[str] = set()
    for tool in chat.builtin_tools or ():
        name = MODULES[tool.type]
        if name in checked:
            continue
        checked.add(name)
        check = getattr(module_for(tool.type), "check_request", None)
        if check is not None:
            check(chat, settings)
