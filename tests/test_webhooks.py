"""Webhooks: run endings POSTed to a loopback receiver that verifies them with the official
Standard Webhooks library, fails the first attempts, and counts deliveries per `webhook-id`;
across a kill -9 and restart (SQLite) and with two replicas on Redis: delivered exactly once."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.support.fake_upstream import FakeUpstream
from tests.support.replicas import replica_config
from tests.support.runs import slow, start, wait_status
from tests.support.server import SECRETS, ServerProcess, fake_models

SECRET_ENV = "TEST_WEBHOOK_SECRET"
FAST_RETRY = {"webhooks_backoff_s": 0.1, "webhooks_backoff_max_s": 0.3, "webhooks_retry_s": 120}


class Receiver:
    """A loopback HTTP server: verifies each POST's signature, answers 500 while `failing` or for the first
    `fail_first` attempts of each id, and records what it accepted."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        self.verifier = Webhook(secret)
        self.fail_first = fail_first
        self.failing = False
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()  # answered 2xx, per webhook-id
        self.events: dict[str, list[dict[str, Any]]] = {}  # path -> accepted events
        self.bad_signatures = 0
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                self.send_response(receiver.handle(self.path, body, dict(self.headers.items())))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None: ...

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        try:
            event = self.verifier.verify(body, {k.lower(): v for k, v in headers.items()})
        except Exception:
            with self.changed:
                self.bad_signatures += 1
                self.changed.notify_all()
            return 400
        msg_id = headers["webhook-id"]
        with self.changed:
            self.attempts[msg_id] += 1
            if self.failing or self.attempts[msg_id] <= self.fail_first:
                self.changed.notify_all()
                return 500
            self.delivered[msg_id] += 1
            self.events.setdefault(path, []).append({**event, "webhook_id": msg_id})
            self.changed.notify_all()
        return 204

    def wait(self, predicate: Any, timeout: float = 15) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), (self.attempts, self.delivered, self.events)

    def for_run(self, path: str, mid: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(path, []) if e["data"]["message_id"] == mid]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def secret() -> str:
    value = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    SECRETS.add(value)
    SECRETS.add(value.removeprefix("whsec_"))
    return value


@pytest.fixture()
def receiver(secret: str) -> Iterator[Receiver]:
    r = Receiver(secret)
    yield r
    r.close()


def hook(receiver: Receiver, path: str = "/hook", **filters: Any) -> dict[str, Any]:
    return {"url": receiver.url + path, "secret_env": SECRET_ENV, **filters}


def webhook_server(
    tmp: Path, config: dict[str, Any], secret: str, hooks: list[dict[str, Any]], name: str
) -> ServerProcess:
    full = {**config, **FAST_RETRY, "webhooks": hooks, "egress": {"allow_hosts": ["127.0.0.1"]}}
    return ServerProcess(tmp, full, env={SECRET_ENV: secret}, name=name)


def test_delivered_once_after_failures_and_a_kill(
    fake: FakeUpstream, tmp_path: Path, secret: str, receiver: Receiver
) -> None:
    """SQLite: attempts fail, the server is killed with the delivery pending, the restart delivers it once."""
    config = {"store": "sqlite", "models": fake_models(fake)}
    srv = webhook_server(tmp_path, config, secret, [hook(receiver)], "webhooks-sqlite").start()
    receiver.failing = True
    try:
        with srv.client() as c:
            mid = start(c)
            status = wait_status(c, mid, {"completed"})
        receiver.wait(lambda: sum(receiver.attempts.values()) >= 2)
        srv.kill()
        receiver.failing = False
        srv.start()
        receiver.wait(lambda: receiver.for_run("/hook", mid))
        # A second run's delivery comes after any stray repeat of the first would have.
        with srv.client() as c:
            second = start(c)
            wait_status(c, second, {"completed"})
        receiver.wait(lambda: receiver.for_run("/hook", second))
    finally:
        srv.stop()
    [event] = receiver.for_run("/hook", mid)
    assert receiver.delivered[event["webhook_id"]] == 1
    assert receiver.attempts[event["webhook_id"]] >= 3
    assert event["type"] == "run.completed" and event["webhook_id"].startswith("msg_")
    data = event["data"]
    assert data["status"] == "completed" and data["tenant"] == "default"
    assert data["metadata"]["event_count"] == status["metadata"]["event_count"]
    assert receiver.bad_signatures == 0
    assert all(n == 1 for n in receiver.delivered.values())


def test_events_and_tenants_filters(fake: FakeUpstream, tmp_path: Path, secret: str, receiver: Receiver) -> None:
    hooks = [
        hook(receiver, "/all"),
        hook(receiver, "/cancelled", events=["run.cancelled"]),
        hook(receiver, "/other-tenant", tenants=["other"]),
    ]
    receiver.fail_first = 1
    config = {"store": "memory", "models": fake_models(fake)}
    srv = webhook_server(tmp_path, config, secret, hooks, "webhooks-filters").start()
    fake.script("gpt-up", slow(n=1000))
    try:
        with srv.client() as c:
            cancelled = start(c)
            assert c.post(f"/v1/messages/async/{cancelled}/cancel").status_code == 200
            wait_status(c, cancelled, {"cancelled"})
            completed = start(c, model="claude")
            wait_status(c, completed, {"completed"})
        receiver.wait(lambda: len(receiver.events.get("/all", [])) == 2 and receiver.events.get("/cancelled"))
    finally:
        srv.stop()
    assert {(e["data"]["message_id"], e["type"]) for e in receiver.events["/all"]} == {
        (cancelled, "run.cancelled"),
        (completed, "run.completed"),
    }
    assert [e["data"]["message_id"] for e in receiver.events["/cancelled"]] == [cancelled]
    assert "/other-tenant" not in receiver.events
    assert receiver.bad_signatures == 0


def test_egress_rules_apply(fake: FakeUpstream, tmp_path: Path, secret: str, receiver: Receiver) -> None:
    """A loopback endpoint that egress.allow_hosts does not list is never contacted."""
    config = {"store": "memory", "models": fake_models(fake), "egress": {"allow_hosts": []}, **FAST_RETRY}
    config["webhooks"] = [hook(receiver)]
    srv = ServerProcess(tmp_path, config, env={SECRET_ENV: secret}, name="webhooks-egress").start()
    try:
        with srv.client() as c:
            wait_status(c, start(c), {"completed"})
            deadline = time.monotonic() + 10
            while 'backstream_webhook_deliveries_total{outcome="denied"} 1.0' not in c.get("/metrics").text:
                assert time.monotonic() < deadline, "the delivery was refused by the egress rules"
                time.sleep(0.05)
    finally:
        srv.stop()
    assert not receiver.attempts


def test_two_replicas_deliver_each_event_once(
    fake: FakeUpstream, tmp_path: Path, redis_db: str, secret: str, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    prefix = f"bswh-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    config = replica_config(fake, prefix, redis_db)
    replicas = [webhook_server(tmp_path, config, secret, [hook(receiver)], f"webhooks-r{i}").start() for i in (1, 2)]
    mids: list[str] = []
    try:
        for i in range(6):
            with replicas[i % 2].client() as c:
                mids.append(start(c))
        with replicas[0].client() as c:
            for mid in mids:
                wait_status(c, mid, {"completed"})
        receiver.wait(lambda: all(receiver.for_run("/hook", mid) for mid in mids))
        with replicas[1].client() as c:
            last = start(c)
        receiver.wait(lambda: receiver.for_run("/hook", last))
    finally:
        for srv in replicas:
            srv.stop()
    assert sorted(e["data"]["message_id"] for e in receiver.events["/hook"]) == sorted([*mids, last])
    assert all(n == 1 for n in receiver.delivered.values()), receiver.delivered
    assert all(receiver.attempts[i] == 3 for i in receiver.delivered), receiver.attempts
    assert receiver.bad_signatures == 0


def test_signature_matches_the_specification() -> None:
    """Our signer against the official library, with a fixed id, timestamp and body."""
    from backstream.webhooks import sign

    key = "whsec_" + base64.b64encode(b"k" * 24).decode()
    body = json.dumps({"type": "run.completed", "data": {}}).encode()
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(key, "msg_1", stamp, body),
    }
    assert Webhook(key).verify(body, headers) == {"type": "run.completed", "data": {}}
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body + b" ", headers)
