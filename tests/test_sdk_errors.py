"""Errors through each official SDK: 401, 404, 422 and 429 arrive as the SDK's own exception types,
with bodies in that SDK's error shape; `x-api-key` (the Anthropic SDK's header) is a credential."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.server import SECRETS, ServerProcess, fake_models

KEY = "bsk_test_sdk_errors_0123456789abcdef"
LIMITED_A = "bsk_test_sdk_limited_a_0123456789ab"
LIMITED_O = "bsk_test_sdk_limited_o_0123456789ab"
SECRETS.update({KEY, LIMITED_A, LIMITED_O})
HI: Any = [{"role": "user", "content": "Hi"}]


def _key(name: str, key: str, **limits: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "tenants": [name]}
    if limits:
        entry["limits"] = limits
    return entry


@pytest.fixture(scope="module")
def secured(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = [
        _key("sdk", KEY),
        _key("lima", LIMITED_A, requests_per_minute=2),
        _key("limo", LIMITED_O, requests_per_minute=2),
    ]
    config = {"store": "memory", "models": fake_models(fake), "auth": {"api_keys": keys}}
    srv = ServerProcess(tmp_path_factory.mktemp("sdk-errors"), config, name="sdk-errors").start()
    yield srv
    srv.stop()


def _claude(server: ServerProcess, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=30)


def _oai(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_anthropic_errors(secured: ServerProcess) -> None:
    client = _claude(secured, KEY)  # the key goes in x-api-key
    assert client.messages.create(model="gpt", max_tokens=8, messages=HI).stop_reason == "end_turn"
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        _claude(secured, "bsk_wrong").messages.create(model="gpt", max_tokens=8, messages=HI)
    with pytest.raises(anthropic.NotFoundError) as not_found:
        client.models.retrieve("no-such-model")
    with pytest.raises(anthropic.UnprocessableEntityError) as invalid:
        client.messages.create(model="no-such-model", max_tokens=8, messages=HI)
    for info, type_ in (
        (unauthenticated, "authentication_error"),
        (not_found, "not_found_error"),
        (invalid, "invalid_request_error"),
    ):
        body: Any = info.value.body
        assert body["type"] == "error" and body["error"]["type"] == type_ and body["error"]["message"]
    assert "no-such-model" in str(invalid.value.body)
    limited = _claude(secured, LIMITED_A)
    with pytest.raises(anthropic.RateLimitError) as limited_info:
        for _ in range(5):
            limited.messages.create(model="gpt", max_tokens=8, messages=HI)
    assert limited_info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert limited_info.value.response.headers["retry-after"]


def test_openai_errors(secured: ServerProcess) -> None:
    client = _oai(secured, KEY)
    assert client.chat.completions.create(model="gpt", messages=HI).choices[0].finish_reason == "stop"
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        _oai(secured, "bsk_wrong").chat.completions.create(model="gpt", messages=HI)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.responses.retrieve("resp_no_such_response")
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="gpt", messages=HI, n=2)
    for info, type_ in (
        (unauthenticated, "authentication_error"),
        (not_found, "not_found_error"),
        (invalid, "invalid_request_error"),
    ):
        body: Any = info.value.body  # the SDK hands over the "error" object
        assert body["type"] == type_ and body["message"] and "param" in body and "code" in body
    assert invalid.value.body["param"] == "n"  # type: ignore[index]
    limited = _oai(secured, LIMITED_O)
    with pytest.raises(openai.RateLimitError) as limited_info:
        for _ in range(5):
            limited.responses.create(model="gpt", input="Hi")
    assert limited_info.value.code == "rate_limit_exceeded"
