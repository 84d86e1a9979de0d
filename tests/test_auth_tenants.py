"""Tenant values that come from credentials (JWT claims, API key config) are checked like X-Tenant, over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.server import ServerProcess, free_port
from tests.test_auth import KEY_A, KEY_B, USER, Idp, auth_config, bearer, endpoints, sha

DEFAULT_CLAIM = "default_tenant"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Idp:
    return Idp(tmp_path_factory.mktemp("idp-tenants"))


@pytest.fixture(scope="module")
def with_default_claim(
    fake: FakeUpstream, idp: Idp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    config = auth_config(fake, idp)
    config["auth"]["jwt"]["default_tenant_claim"] = DEFAULT_CLAIM
    srv = ServerProcess(tmp_path_factory.mktemp("tenants"), config, name="auth-tenants").start()
    yield srv
    srv.stop()


def _start_globex_run(c: Any, fake: FakeUpstream, mid: str) -> None:
    """A run of tenant globex that stays `processing` (20 s of tokens) until cancelled."""
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(400)], delay=0.05)])
    resp = c.post(
        "/v1/messages/async", params={"message_id": mid}, json={"model": "gpt", "messages": USER}, headers=bearer(KEY_B)
    )
    assert resp.status_code == 200, resp.text
    with c.stream("GET", f"/v1/messages/async/{mid}/stream", headers=bearer(KEY_B)) as s:
        for line in s.iter_lines():  # its first token: the run is under way; leaving does not cancel it
            if line == "event: text_delta":
                break
    assert c.get(f"/v1/messages/async/{mid}/status", headers=bearer(KEY_B)).json()["status"] == "processing"


def _assert_refused_everywhere(c: Any, headers: dict[str, str], mid: str, why: str) -> None:
    for method, path, body in endpoints(mid):
        resp = c.request(method, path, json=body, headers=headers)
        assert resp.status_code == 403, (why, method, path, resp.text)
        assert resp.json()["error"]["type"] == "permission_error", (why, resp.text)


def test_token_default_tenant_outside_its_list_gets_403(
    with_default_claim: ServerProcess, fake: FakeUpstream, idp: Idp
) -> None:
    with with_default_claim.client() as c:
        _start_globex_run(c, fake, "globex-run")
        sneaky = idp.token(tenants=["acme"], **{DEFAULT_CLAIM: "globex"})
        # before the fix the default claim alone let this token read (and cancel) globex's run
        assert c.get("/v1/messages/async/globex-run/status", headers=bearer(sneaky)).status_code == 403
        _assert_refused_everywhere(c, bearer(sneaky), "globex-run", "default outside the list")
        _assert_refused_everywhere(
            c, bearer(sneaky, "globex"), "globex-run", "default outside the list, X-Tenant of it"
        )
        _assert_refused_everywhere(
            c, bearer(idp.token(tenants="acme", **{DEFAULT_CLAIM: "globex"})), "globex-run", "space-separated list"
        )
        assert len(fake.requests) == 1, "no refused request reached the upstream"
        status = c.get("/v1/messages/async/globex-run/status", headers=bearer(KEY_B)).json()
        assert status["status"] == "processing", "globex's run is untouched"
        assert c.post("/v1/messages/async/globex-run/cancel", headers=bearer(KEY_B)).status_code == 200


def test_token_default_tenant_inside_its_list_applies(
    with_default_claim: ServerProcess, fake: FakeUpstream, idp: Idp
) -> None:
    with with_default_claim.client() as c:
        _start_globex_run(c, fake, "globex-run-2")
        both = {"tenants": ["acme", "globex"]}
        to_globex = bearer(idp.token(**both, **{DEFAULT_CLAIM: "globex"}))
        to_acme = bearer(idp.token(**both, **{DEFAULT_CLAIM: "acme"}))
        assert c.get("/v1/messages/async/globex-run-2/status", headers=to_globex).json()["status"] == "processing"
        assert c.get("/v1/messages/async/globex-run-2/status", headers=to_acme).status_code == 404
        everything = bearer(idp.token(tenants=["*"], **{DEFAULT_CLAIM: "globex"}))
        assert c.post("/v1/messages/async/globex-run-2/cancel", headers=everything).status_code == 200
        assert c.get("/v1/messages/async/globex-run-2/status", headers=bearer(KEY_B)).json()["status"] == "cancelled"


@pytest.mark.parametrize(
    "claims",
    [
        {"tenants": ["acme", "bad tenant!"]},
        {"tenants": ["acme", "x" * 65]},
        {"tenants": ["acme", ""]},
        {"tenants": ["acme\n"]},
        {"tenants": ["acme", "globex/../acme"]},
        {"tenants": ["acme"], DEFAULT_CLAIM: "acme\n"},
        {"tenants": ["*"], DEFAULT_CLAIM: "bad tenant!"},
        {"tenants": ["*"], DEFAULT_CLAIM: ""},
        {"tenants": ["acme"], DEFAULT_CLAIM: ["acme"]},
        {"tenants": ["acme"], DEFAULT_CLAIM: 7},
    ],
    ids=[
        "space",
        "too-long",
        "empty",
        "newline",
        "slash",
        "default-newline",
        "star-bad-default",
        "empty-default",
        "list-default",
        "number-default",
    ],
)
def test_malformed_tenant_in_token_is_refused(
    with_default_claim: ServerProcess, fake: FakeUpstream, idp: Idp, claims: dict[str, Any]
) -> None:
    with with_default_claim.client() as c:
        token = idp.token(**claims)
        for headers in (bearer(token), bearer(token, "acme")):
            resp = c.get("/v1/models", headers=headers)
            assert resp.status_code == 403, (claims, resp.text)
            assert resp.json()["error"]["type"] == "permission_error"
        assert c.get("/v1/models", headers=bearer(idp.token(tenants=["acme"]))).status_code == 200, (
            "a sound token still works"
        )
    assert not fake.requests


def _serve_exit(tmp: Path, key: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp / "bad-key.yaml"
    config.write_text(yaml.safe_dump({"store": "memory", "auth": {"api_keys": [key]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
    cmd = [
        sys.executable,
        "-m",
        "backstream",
        "serve",
        "--config",
        str(config),
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize(
    "key",
    [
        {"tenants": ["acme"], "default_tenant": "globex"},
        {"tenants": ["*"], "default_tenant": "bad tenant!"},
        {"tenants": ["*"], "default_tenant": "acme\n"},
        {"tenants": ["acme\n"]},
    ],
    ids=["outside", "star-malformed", "star-newline", "tenant-newline"],
)
def test_api_key_default_tenant_checked_at_config_load(tmp_path: Path, key: dict[str, Any]) -> None:
    proc = _serve_exit(tmp_path, {"name": "k", "sha256": sha(KEY_A), **key})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid configuration" in proc.stderr and "api key 'k'" in proc.stderr, proc.stderr[-2000:]
