"""The end-of-session check: no server log holds a credential that a test registered in SECRETS."""

from __future__ import annotations

from pathlib import Path

from tests.support.server import LOG_DIR, SECRETS


def reset_log_dir() -> None:
    """An empty LOG_DIR, so that the check sees this session's logs only."""
    import shutil

    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)


def leaked_secrets(log_dir: Path = LOG_DIR, secrets: set[str] = SECRETS) -> list[str]:
    """One line per registered secret found in a server log: where it is, and the secret masked."""
    leaks = []
    for path in sorted(log_dir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        for secret in sorted(secrets):
            at = next((n for n, line in enumerate(lines, 1) if secret in line), None)
            if at is not None:
                leaks.append(f"{path}:{at} contains the credential {_masked(secret)}")
    return leaks


def _masked(secret: str) -> str:
    """Enough of a secret to find it in the test code; the report is itself a log."""
    return f"{secret[:6]}… ({len(secret)} chars)" if len(secret) > 10 else f"… ({len(secret)} chars)"
