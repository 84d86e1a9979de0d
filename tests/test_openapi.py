"""Schemathesis against the server's own OpenAPI document: no 5xx, no response the document does not allow.

Three seeded runs share one server on SQLite: the document as served (positive and negative data,
every check), negative data with the request headers the server reads, and the Authorization header
itself; then a regression case for what the stateful run found.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from backstream.auth import jwks_from_public_keys
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.server import SECRETS, ServerProcess, fake_models

KEY = "bsk_schemathesis_key_0123456789abc"
SECRETS.add(KEY)
ST = Path(sys.executable).parent / "st"
# Headers the server reads but its document does not declare; declared here so that they are generated too.
# The schemas are the valid forms, so negative mode sends everything else.
HEADERS = {
    "X-Tenant": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
    "X-Request-Id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}
STREAM_HEADERS = {"Last-Event-ID": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 16}}
# A valid key, or anything shaped like a JWT (the server verifies those against a JWKS).
AUTHORIZATION = {
    "anyOf": [
        {"enum": [f"Bearer {KEY}"]},
        {"type": "string", "pattern": "^Bearer [A-Za-z0-9_-]{1,60}\\.[A-Za-z0-9_-]{1,60}\\.[A-Za-z0-9_-]{0,60}$"},
    ]
}
# Only `not_a_server_error` and the body shapes are checked with generated headers: an invalid
# X-Request-Id is replaced rather than refused, and 401/403 are not in the served document.
NEGATIVE_CHECKS = "not_a_server_error,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzzed(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    jwks = tmp / "jwks.json"
    jwks.write_bytes(jwks_from_public_keys([("ec1", ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256")]))
    config = {
        "store": "sqlite",  # the default store; its integers are bounded, unlike the memory store's
        "default_model": "gpt",
        # The document's examples name `local`: served by the fake upstream here, so that no fuzzed
        # request waits (past schemathesis' 10 s timeout) for the in-process model.
        "models": [
            {"name": "local", "provider": "openai", "base_url": fake.base_url, "model": "gpt-up", "retries": 0},
            *fake_models(fake),
        ],
        "auth": {
            # every tenant, so that generated X-Tenant values reach the endpoints instead of stopping at 403
            "api_keys": [
                {
                    "name": "st",
                    "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "tenants": ["*"],
                    "default_tenant": "acme",
                }
            ],
            "jwt": {"jwks_file": str(jwks), "issuer": "https://idp.test/", "audience": "backstream"},
        },
    }
    srv = ServerProcess(tmp, config, name="schemathesis").start()
    yield srv
    srv.stop()


def _st(srv: ServerProcess, *args: str) -> None:
    proc = subprocess.run([str(ST), "run", *args, "--seed", "1234"], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in output and "failures" not in output.lower().split("summary")[-1]
    log = srv.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


def _document(
    srv: ServerProcess,
    tmp: Path,
    headers: dict[str, Any],
    stream_headers: dict[str, Any] | None = None,
    required: bool = False,
) -> str:
    """The served document with `headers` declared on every /v1/ operation and the error shape on 401/403/429."""
    doc = httpx.get(f"{srv.url}/openapi.json").json()
    error = {
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, operations in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for op in operations.values():
            declared = {**headers, **(stream_headers if stream_headers and path.endswith("/stream") else {})}
            op.setdefault("parameters", []).extend(
                {"name": n, "in": "header", "required": required, "schema": s} for n, s in declared.items()
            )
            for status in ("401", "403", "429"):
                op["responses"].setdefault(status, error)
    out = tmp / "openapi-with-headers.json"
    out.write_text(json.dumps(doc))
    return str(out)


def test_openapi_document_holds_under_fuzzing(fuzzed: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    _st(
        fuzzed,
        f"{fuzzed.url}/openapi.json",
        "-H",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        "25",
        "--checks",
        "all",
        # Cross-field rules (tool ids, tool_choice names, …) cannot be written in JSON Schema,
        # so schema-valid bodies may still be refused with 422; every other check applies.
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,fuzzing,stateful",
        # One worker, as below: with two, a failure was seen once that its own request does not reproduce
        # (a stream request with an invalid `after` reported as answered 200; sent alone it is 422).
        "-w",
        "1",
    )


def test_negative_data_and_headers_never_5xx(fuzzed: ServerProcess, tmp_path: Path) -> None:
    """Invalid bodies, parameters and X-Tenant / X-Request-Id / Last-Event-ID values: refused or ignored, never a 5xx."""
    _st(
        fuzzed,
        _document(fuzzed, tmp_path, HEADERS, STREAM_HEADERS),
        "--url",
        fuzzed.url,
        "-H",
        f"Authorization: Bearer {KEY}",
        "--mode",
        "negative",
        "--max-examples",
        "25",
        "--checks",
        NEGATIVE_CHECKS,
        # coverage: each parameter's boundary and wrong-type values, deterministically. One worker:
        # with two, hypothesis' lambda descriptions race in ast.parse (SystemError inside schemathesis).
        "--phases",
        "coverage,fuzzing",
        "-w",
        "1",
    )


def test_authorization_header_never_5xx(fuzzed: ServerProcess, tmp_path: Path) -> None:
    """Generated Authorization values (keys, JWT-shaped garbage, anything): 200, 401 or 403, never a 5xx."""
    _st(
        fuzzed,
        _document(fuzzed, tmp_path, {"Authorization": AUTHORIZATION}, required=True),
        "--url",
        fuzzed.url,
        "--max-examples",
        "25",
        "--checks",
        NEGATIVE_CHECKS,
        "--phases",
        "coverage,fuzzing",
        # the middleware decides before any endpoint runs: the operations without bodies suffice
        "--include-method",
        "GET",
        "--include-method",
        "DELETE",
        "-w",
        "1",
    )


def test_runs_deleted_while_writing_leave_the_store_writing(fuzzed: ServerProcess, fake: FakeUpstream) -> None:
    """Found by the stateful run on SQLite: a run deleted mid-write cancelled its write's future, which
    ended the store's writer thread; every later request that writes then hung."""
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(50)])] * 100)
    with fuzzed.client(timeout=10) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        for i in range(100):
            mid = c.post("/v1/messages/async", json=body, headers=auth).json()["message_id"]
            if i % 3 == 0:
                c.post(f"/v1/messages/async/{mid}/cancel", headers=auth)
            assert c.delete(f"/v1/messages/async/{mid}", headers=auth).status_code == 204
        assert c.post("/v1/messages/async", json=body, headers=auth).status_code == 200
    log = fuzzed.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
