"""Runs last: the logs of every server process started during the suite hold no credential used in it."""

from __future__ import annotations

from tests.conftest import LOG_DIR, SECRETS


def test_no_secret_in_any_server_log() -> None:
    logs = sorted(LOG_DIR.glob("*.log"))
    assert logs, "the suite started servers, so there are logs to check"
    assert SECRETS, "tests registered the credentials they used"
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"{path.name} contains a credential"
