"""docs/configuration.md is generated from the settings model and cannot drift from it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from backstream import config_reference
from backstream.config import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _model_leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field's dotted name (entries of lists and mappings without their `[]` / `.<key>` markers)."""
    out = set()
    for name, info in model.model_fields.items():
        inner = config_reference._model_in(info.annotation)
        if not inner or inner[1]:  # a value, a list or a mapping (a section is its keys)
            out.add(prefix + name)
        if inner:
            out |= _model_leaves(inner[0], f"{prefix}{name}.")
    return out


def test_committed_reference_is_the_generated_one() -> None:
    assert DOC.read_text() == config_reference.render(), (
        "docs/configuration.md is stale: python -m backstream.config_reference > docs/configuration.md"
    )


def test_every_setting_appears_with_its_default_and_variable() -> None:
    listed = {p.replace("[]", "") for p in config_reference.leaf_paths()}
    listed = {".".join(part for part in p.split(".") if not part.startswith("<")) for p in listed}
    assert _model_leaves(Settings) <= listed, _model_leaves(Settings) - listed
    text = DOC.read_text()
    assert "| `runs.max_events` | int | `100000` | `BACKSTREAM_RUNS__MAX_EVENTS` |" in text
    assert '| `models[].provider` | "openai" \\| "anthropic" \\| "local" \\| "embeddings" | required | — |' in text
    assert "`limits.tenants.<tenant>.max_active_runs`" in text
