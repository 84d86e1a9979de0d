"""Authentication, tenants and limits over real HTTP: API keys and JWTs checked against a JWKS."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from backstream.auth import jwks_from_public_keys
from tests.support.fake_upstream import FakeUpstream, Fault, Reply
from tests.support.runs import USER
from tests.support.server import SECRETS, ServerProcess, fake_models, free_port

ISSUER = "https://idp.test/"
AUDIENCE = "backstream"
KEY_A = "bsk_test_tenant_a_0123456789abcdef"
KEY_B = "bsk_test_tenant_b_0123456789abcdef"
KEY_ALL = "bsk_test_all_tenants_0123456789ab"
KEY_LIMITED = "bsk_test_limited_0123456789abcdef"
SECRETS.update({KEY_A, KEY_B, KEY_ALL, KEY_LIMITED})


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Idp:
    """Signs tokens like an OAuth 2.0 authorization server would."""

    def __init__(self, tmp: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not in the JWKS
        self.jwks_path = tmp / "jwks.json"
        self.jwks_path.write_bytes(
            jwks_from_public_keys([("rsa1", self.rsa.public_key(), "RS256"), ("ec1", self.ec.public_key(), "ES256")])
        )

    def token(
        self, *, tenants: Any = ("acme",), key: Any = None, alg: str = "RS256", kid: str = "rsa1", **claims: Any
    ) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "user-1",
            "iat": now,
            "exp": now + 300,
            "tenants": list(tenants),
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        tok = jwt.encode(body, key if key is not None else self.rsa, algorithm=alg, headers={"kid": kid})
        SECRETS.add(tok)
        return tok

    def unsigned(self, **claims: Any) -> str:
        """alg: none."""
        now = int(time.time())

        def b64(d: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300, "tenants": ["acme"], **claims}
        tok = f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa1'})}.{b64(body)}."
        SECRETS.add(tok)
        return tok

    def hs_confusion(self) -> str:
        """HS256 'signed' with the RSA public key as the HMAC secret."""
        public_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = int(time.time())
        header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode()).rstrip(
            b"="
        )
        body = base64.urlsafe_b64encode(
            json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "tenants": ["globex"]}).encode()
        ).rstrip(b"=")
        import hmac as _hmac

        sig = base64.urlsafe_b64encode(_hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()).rstrip(
            b"="
        )
        tok = (header + b"." + body + b"." + sig).decode()
        SECRETS.add(tok)
        return tok


def auth_config(fake: FakeUpstream, idp: Idp, **extra: Any) -> dict[str, Any]:
    return {
        "store": "sqlite",
        "models": fake_models(fake),
        "auth": {
            "api_keys": [
                {"name": "a", "sha256": sha(KEY_A), "tenants": ["acme"]},
                {"name": "b", "sha256": sha(KEY_B), "tenants": ["globex"]},
                {"name": "all", "sha256": sha(KEY_ALL), "tenants": ["*"], "default_tenant": "acme"},
                {
                    "name": "limited",
                    "sha256": sha(KEY_LIMITED),
                    "tenants": ["lim"],
                    "limits": {"requests_per_minute": 4, "max_active_runs": 1},
                },
            ],
            "jwt": {"jwks_file": str(idp.jwks_path), "issuer": ISSUER, "audience": AUDIENCE, "leeway_s": 0},
        },
        "limits": {"rate_window_s": 3, "tenants": {"quota-t": {"max_queued_runs": 1}}},
        **extra,
    }


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Idp:
    return Idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def secured(fake: FakeUpstream, idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("secured"), auth_config(fake, idp), name="secured").start()
    yield srv
    srv.stop()


def bearer(token: str, tenant: str | None = None) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}"}
    if tenant:
        h["X-Tenant"] = tenant
    return h


def endpoints(mid: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    body = {"model": "gpt", "max_tokens": 4, "messages": USER}
    return [
        ("POST", "/v1/messages", body),
        ("POST", "/v1/messages/async", body),
        ("GET", f"/v1/messages/async/{mid}/stream", None),
        ("GET", f"/v1/messages/async/{mid}/status", None),
        ("POST", f"/v1/messages/async/{mid}/cancel", None),
        ("DELETE", f"/v1/messages/async/{mid}", None),
        ("DELETE", f"/v1/messages/async/{mid}/delete", None),
        ("GET", "/v1/models", None),
    ]


def test_rejections_matrix_changes_nothing(secured: ServerProcess, fake: FakeUpstream, idp: Idp) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(300)], delay=0.02)])
    with secured.client() as c:
        resp = c.post(
            "/v1/messages/async",
            params={"message_id": "b-run"},
            json={"model": "gpt", "messages": USER},
            headers=bearer(KEY_B),
        )
        assert resp.status_code == 200, resp.text
        fake.wait_for_requests(1)
        now = int(time.time())
        bad: dict[str, tuple[dict[str, str], int]] = {
            "no token": ({}, 401),
            "not bearer": ({"Authorization": f"Basic {KEY_A}"}, 401),
            "bad API key": (bearer("bsk_wrong_key_wrong_key_wrong"), 401),
            "expired JWT": (bearer(idp.token(exp=now - 60)), 401),
            "JWT not yet valid": (bearer(idp.token(nbf=now + 600)), 401),
            "wrong audience": (bearer(idp.token(aud="someone-else")), 401),
            "wrong issuer": (bearer(idp.token(iss="https://evil.test/")), 401),
            "alg none": (bearer(idp.unsigned()), 401),
            "HS/RS confusion": (bearer(idp.hs_confusion()), 401),
            "key not in JWKS": (bearer(idp.token(key=idp.other)), 401),
            "JWT without exp": (bearer(idp.token(exp=None)), 401),
            "tenant A key asks for B": (bearer(KEY_A, "globex"), 403),
            "tenant A JWT asks for B": (bearer(idp.token(tenants=["acme"]), "globex"), 403),
        }
        for name, (headers, status) in bad.items():
            for method, path, body in endpoints("b-run"):
                resp = c.request(method, path, json=body, headers=headers)
                assert resp.status_code == status, (name, method, path, resp.text)
                err = resp.json()
                assert err["error"]["type"] == ("authentication_error" if status == 401 else "permission_error")
                if status == 401:
                    assert resp.headers["www-authenticate"].startswith("Bearer")
        # Valid credentials of tenant A: B's run does not exist for them.
        for headers in (bearer(KEY_A), bearer(idp.token(tenants=["acme"]))):
            for method, path, _body in endpoints("b-run")[2:7]:
                resp = c.request(method, path, headers=headers)
                assert resp.status_code == 404, (method, path, resp.text)
        assert len(fake.requests) == 1, "no rejected request reached the upstream"
        status = c.get("/v1/messages/async/b-run/status", headers=bearer(KEY_B)).json()
        assert status["status"] == "processing", "B's run is untouched"
        assert c.post("/v1/messages/async/b-run/cancel", headers=bearer(KEY_B)).status_code == 200


def test_valid_credentials_and_default_tenants(secured: ServerProcess, fake: FakeUpstream, idp: Idp) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    with secured.client() as c:
        for headers in (
            bearer(KEY_A),
            bearer(idp.token()),
            bearer(idp.token(key=idp.ec, alg="ES256", kid="ec1")),
            bearer(KEY_ALL, "anything"),
        ):
            resp = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 4, "messages": USER}, headers=headers)
            assert resp.status_code == 200, resp.text
        # the key for every tenant, without X-Tenant, acts for its default tenant (acme): it sees A's runs
        mid = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER}, headers=bearer(KEY_A)).json()[
            "message_id"
        ]
        assert c.get(f"/v1/messages/async/{mid}/status", headers=bearer(KEY_ALL)).status_code == 200
        assert c.get(f"/v1/messages/async/{mid}/status", headers=bearer(KEY_ALL, "globex")).status_code == 404
        resp = c.get("/v1/models", headers=bearer(KEY_A, "bad tenant!"))
        assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "X-Tenant"
        assert c.get("/healthz").status_code == 200, "health needs no credentials"


def test_same_custom_id_in_two_tenants(secured: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["for", " a"]), Reply(tokens=["for", " b"])])
    with secured.client() as c:
        for key in (KEY_A, KEY_B):
            resp = c.post(
                "/v1/messages/async",
                params={"message_id": "shared"},
                json={"model": "gpt", "messages": USER},
                headers=bearer(key),
            )
            assert resp.status_code == 200, resp.text
        texts = {}
        for key in (KEY_A, KEY_B):
            with c.stream("GET", "/v1/messages/async/shared/stream", headers=bearer(key)) as resp:
                raw = resp.read().decode()
            texts[key] = [
                json.loads(line[6:])["text"]
                for line in raw.splitlines()
                if line.startswith("data: ") and '"text"' in line
            ]
        assert texts == {KEY_A: ["for a"], KEY_B: ["for b"]}
        assert c.delete("/v1/messages/async/shared", headers=bearer(KEY_A)).status_code == 204
        assert c.get("/v1/messages/async/shared/status", headers=bearer(KEY_B)).json()["status"] == "completed"


def test_rate_limit_then_accepted_again(secured: ServerProcess) -> None:
    with secured.client() as c:
        window_start = time.time()
        codes = [c.get("/v1/models", headers=bearer(KEY_LIMITED)).status_code for _ in range(6)]
        assert codes.count(429) >= 1 and codes[0] == 200, codes
        resp = c.get("/v1/models", headers=bearer(KEY_LIMITED))
        assert resp.status_code == 429 and 1 <= int(resp.headers["retry-after"]) <= 4
        assert resp.json()["error"]["type"] == "rate_limit_error"
        time.sleep(
            max(0.0, int(resp.headers["retry-after"]) - (time.time() - window_start) % 3)
        )  # the window (3 s here) rolls over
        for _ in range(20):
            if c.get("/v1/models", headers=bearer(KEY_LIMITED)).status_code == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("never accepted again")


def test_active_run_limit_then_accepted_again(secured: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(fault=Fault.HANG)])
    time.sleep(3.1)  # a fresh rate window for this key (4 requests per 3 s)
    with secured.client() as c:
        first = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER}, headers=bearer(KEY_LIMITED))
        assert first.status_code == 200
        second = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER}, headers=bearer(KEY_LIMITED))
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert "active runs" in second.json()["error"]["message"]
        mid = first.json()["message_id"]
        assert c.post(f"/v1/messages/async/{mid}/cancel", headers=bearer(KEY_LIMITED)).status_code == 200
        fake.script("gpt-up", [Reply(tokens=["ok"])])
        third = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER}, headers=bearer(KEY_LIMITED))
        assert third.status_code == 200, third.text


def test_queued_run_limit_per_tenant(secured: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-one-up", [Reply(fault=Fault.HANG)])
    with secured.client() as c:
        h = bearer(KEY_ALL, "quota-t")
        a = c.post("/v1/messages/async", json={"model": "gpt-one", "messages": USER}, headers=h)
        assert a.status_code == 200
        b = c.post("/v1/messages/async", json={"model": "gpt-one", "messages": USER}, headers=h)
        assert b.status_code == 429 and "queued runs" in b.json()["error"]["message"]
        assert (
            c.post(
                "/v1/messages/async", json={"model": "gpt-one", "messages": USER}, headers=bearer(KEY_ALL, "other-t")
            ).status_code
            == 200
        )
        c.delete(f"/v1/messages/async/{a.json()['message_id']}", headers=h)


def test_secrets_stay_out_of_status_and_events(secured: ServerProcess, fake: FakeUpstream) -> None:
    token = "mcp-secret-token-do-not-leak-42"
    SECRETS.add(token)
    fake.script("gpt-up", [Reply(tokens=["line one\n\nevent: stream_end\ndata: {}\n\nid: 99", " done"])])
    with secured.client() as c:
        resp = c.post(
            "/v1/messages/async",
            json={"model": "gpt", "messages": USER, "correlation_id": "c1", "metadata": {"user_id": "u"}},
            headers=bearer(KEY_A),
        )
        mid = resp.json()["message_id"]
        with c.stream("GET", f"/v1/messages/async/{mid}/stream", headers=bearer(KEY_A)) as s:
            raw = s.read()
        status = c.get(f"/v1/messages/async/{mid}/status", headers=bearer(KEY_A)).text
    frames = [f for f in raw.split(b"\n\n") if f.strip()]
    assert all(f.count(b"\ndata: ") == 1 and f.startswith(b"id: ") for f in frames), (
        "model output cannot split or inject frames"
    )
    assert frames[-1].split(b"\n")[1] == b"event: stream_end" and raw.count(b"\nevent: stream_end\n") == 1
    assert token not in raw.decode() and token not in status and KEY_A not in status


def test_non_loopback_without_auth_refuses_to_start(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "backstream",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "without authentication" in proc.stderr and "--insecure-no-auth" in proc.stderr
    srv = ServerProcess(
        tmp_path, {"host": "0.0.0.0", "insecure_no_auth": True, "store": "memory"}, name="insecure"
    ).start()
    srv.stop()


def test_keys_new_prints_a_working_key(tmp_path: Path, fake: FakeUpstream) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backstream", "keys", "new", "--tenant", "t1", "--name", "fresh"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = out.split("store it now): ", 1)[1].split()[0]
    SECRETS.add(key)
    import yaml

    entry = yaml.safe_load(out.strip().splitlines()[-1].strip()[2:])
    assert entry["sha256"] == sha(key) and entry["tenants"] == ["t1"]
    srv = ServerProcess(
        tmp_path, {"store": "memory", "models": fake_models(fake), "auth": {"api_keys": [entry]}}, name="keys"
    ).start()
    try:
        with srv.client() as c:
            assert c.get("/v1/models", headers=bearer(key)).status_code == 200
            assert c.get("/v1/models").status_code == 401
    finally:
        srv.stop()


def test_jwks_url_is_fetched(tmp_path: Path, fake: FakeUpstream, idp: Idp) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = idp.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    config = auth_config(fake, idp)
    config["auth"]["jwt"] = {
        "jwks_url": f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json",
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    srv = ServerProcess(tmp_path, config, name="jwks-url").start()
    try:
        with srv.client() as c:
            assert c.get("/v1/models", headers=bearer(idp.token())).status_code == 200
            assert c.get("/v1/models", headers=bearer(idp.token(key=idp.other))).status_code == 401
    finally:
        srv.stop()
        httpd.shutdown()
