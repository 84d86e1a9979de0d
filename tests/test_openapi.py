"""Schemathesis against the server's own OpenAPI document: no 5xx, no response the document does not allow."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import SECRETS, ServerProcess, fake_models
from tests.fake_upstream import FakeUpstream, Reply

KEY = "bsk_schemathesis_key_0123456789abc"
SECRETS.add(KEY)


def test_openapi_document_holds_under_fuzzing(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    config = {
        "store": "memory",
        "default_model": "gpt",
        "models": fake_models(fake),
        "auth": {"api_keys": [{"name": "st", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenants": ["acme"]}]},
    }
    srv = ServerProcess(tmp_path, config, name="schemathesis").start()
    try:
        st = Path(sys.executable).parent / "st"
        proc = subprocess.run(
            [
                str(st), "run", f"{srv.url}/openapi.json",
                "-H", f"Authorization: Bearer {KEY}",
                "--max-examples", "25",
                "--checks", "all",
                # Cross-field rules (tool ids, tool_choice names, …) cannot be written in JSON Schema,
                # so schema-valid bodies may still be refused with 422; every other check applies.
                "--exclude-checks", "positive_data_acceptance",
                # The coverage phase crashes inside schemathesis on this schema's nested unions.
                "--phases", "examples,fuzzing,stateful",
                "--seed", "1234",
                "-w", "2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert " passed" in output and "failures" not in output.lower().split("summary")[-1]
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
