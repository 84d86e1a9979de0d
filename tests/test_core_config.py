"""Settings in-process (config.py): defaults, then the YAML file, then BACKSTREAM_* variables, then explicit
overrides; the short forms; values kept as strings where YAML would read them otherwise; and the
errors that name the key for bad values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backstream.config import ConfigError, Settings, is_loopback, load_settings


def write(tmp_path: Path, tree: Any, name: str = "backstream.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s.store == "sqlite" and s.data_dir == "./.backstream" and (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.runs.max_events == 100_000 and s.runs.max_bytes == 64 * 1024 * 1024 and s.runs.max_steps == 10
    assert s.redis.url == "redis://127.0.0.1:6379/0" and s.redis.key_prefix == "backstream"
    assert s.egress.allow_hosts == [] and s.egress.allow_private is False
    assert s.default_model == "local" and [(m.name, m.provider, m.max_concurrency) for m in s.models] == [
        ("local", "local", 1)
    ]
    assert s.auth.enabled is False and s.cors.allow_origins == []


def test_the_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKSTREAM_TEST_REDIS_URL", "BACKSTREAM_TEST_LOGS"):  # the suite's own knobs are no settings
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BACKSTREAM_RUNS__MAX_STEPS", "4")
    assert load_settings().runs.max_steps == 4


def test_yaml_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {"store": "memory", "runs": {"max_events": 5000, "max_steps": 3}, "shutdown_grace_s": 4})
    s = load_settings(path, environ={})
    assert (s.store, s.runs.max_events, s.runs.max_steps, s.shutdown_grace_s) == ("memory", 5000, 3, 4.0)
    s = load_settings(path, environ={"BACKSTREAM_RUNS__MAX_EVENTS": "7000"})
    assert s.runs.max_events == 7000 and s.runs.max_steps == 3, (
        "the environment wins key by key, the rest of the section stays"
    )
    s = load_settings(path, environ={"BACKSTREAM_STORE": "redis"}, store="sqlite")
    assert s.store == "sqlite", "explicit overrides (command-line flags) win over the environment"
    assert load_settings(path, environ={}, store=None).store == "memory", "an override of None changes nothing"


def test_config_file_from_the_environment_and_the_argument_wins(tmp_path: Path) -> None:
    from_env = write(tmp_path, {"port": 9001}, "env.yaml")
    from_arg = write(tmp_path, {"port": 9002}, "arg.yaml")
    assert load_settings(environ={"BACKSTREAM_CONFIG": str(from_env)}).port == 9001
    assert load_settings(from_arg, environ={"BACKSTREAM_CONFIG": str(from_env)}).port == 9002


def test_short_forms(tmp_path: Path) -> None:
    env = {
        "BACKSTREAM_STORE": "redis",
        "BACKSTREAM_REDIS_URL": "redis://cache.internal:6380/3",
        "BACKSTREAM_DATA_DIR": "/var/lib/bs",
    }
    s = load_settings(environ=env)
    assert (s.store, s.redis.url, s.data_dir) == ("redis", "redis://cache.internal:6380/3", "/var/lib/bs")
    path = write(tmp_path, {"redis": {"url": "redis://from-file/0", "key_prefix": "kept"}})
    s = load_settings(path, environ={"BACKSTREAM_REDIS_URL": "redis://from-env/1"})
    assert (s.redis.url, s.redis.key_prefix) == ("redis://from-env/1", "kept")


def test_environment_values_are_yaml_but_urls_and_paths_stay_strings() -> None:
    env = {
        "BACKSTREAM_EGRESS__ALLOW_HOSTS": '[mcp.example.com, "tools.example.com:8443"]',
        "BACKSTREAM_EGRESS__ALLOW_PRIVATE": "true",
        "BACKSTREAM_RUNS__TOOL_TIMEOUT_S": "2.5",
        "BACKSTREAM_DATA_DIR": "2024",
        "BACKSTREAM_REDIS__URL": "redis://h:1/2",
        "BACKSTREAM_LIMITS__TENANTS": "{acme: {requests_per_minute: 600}}",
        "BACKSTREAM_LOG_LEVEL": "debug",
    }
    s = load_settings(environ=env)
    assert s.egress.allow_hosts == ["mcp.example.com", "tools.example.com:8443"] and s.egress.allow_private is True
    assert s.runs.tool_timeout_s == 2.5 and s.data_dir == "2024" and s.redis.url == "redis://h:1/2"
    assert s.limits.tenants["acme"].requests_per_minute == 600 and s.log_level == "debug"
    # YAML reads 123 as a number, which a string field refuses: the error names the key, quoting the value helps.
    with pytest.raises(ConfigError, match="redis.key_prefix: Input should be a valid string"):
        load_settings(environ={"BACKSTREAM_REDIS__KEY_PREFIX": "123"})
    assert load_settings(environ={"BACKSTREAM_REDIS__KEY_PREFIX": '"123"'}).redis.key_prefix == "123"


def test_environment_keys_that_are_not_settings_are_ignored() -> None:
    s = load_settings(
        environ={"BACKSTREAM_": "x", "BACKSTREAM_RUNS__": "x", "BACKSTREAM_CONFIG": "", "OTHER_STORE": "redis"}
    )
    assert s == load_settings(environ={})


def test_a_models_list_from_the_environment(tmp_path: Path) -> None:
    env = {
        "BACKSTREAM_MODELS": "[{name: fast, provider: openai, base_url: 'http://up:8000/v1', fallbacks: [local]}]",
        "BACKSTREAM_DEFAULT_MODEL": "fast",
    }
    s = load_settings(environ=env)
    assert [m.name for m in s.models] == ["local", "fast"] and s.models[1].base_url == "http://up:8000/v1"
    assert s.models[1].upstream_model == "fast" and s.models[1].retries == 2


def test_an_explicit_local_model_is_not_duplicated() -> None:
    s = load_settings(environ={}, models=[{"name": "local", "provider": "local", "max_concurrency": 3}])
    assert [(m.name, m.max_concurrency) for m in s.models] == [("local", 3)]


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"BACKSTREAM_RUNS__MAX_EVENTS": "5"}, "runs.max_events"),
        ({"BACKSTREAM_RUNS__MAX_STEPS": "1000"}, "runs.max_steps"),
        ({"BACKSTREAM_RUNS__MAX_BYTES": "lots"}, "runs.max_bytes"),
        ({"BACKSTREAM_STORE": "postgres"}, "store"),
        ({"BACKSTREAM_PORT": "70000"}, "port"),
        ({"BACKSTREAM_RUNS__MAX_EVENTZ": "5000"}, "runs.max_eventz"),
        ({"BACKSTREAM_NOPE": "1"}, "nope"),
        ({"BACKSTREAM_REDIS__LEASE_S": "0"}, "redis.lease_s"),
        ({"BACKSTREAM_LIMITS__MAX_JSON_DEPTH": "500"}, "limits.max_json_depth"),
        ({"BACKSTREAM_CORS__ALLOW_ORIGINS": "[https://app.example.com/]"}, "cors.allow_origins"),
        ({"BACKSTREAM_CORS__ALLOW_ORIGINS": "['*']", "BACKSTREAM_CORS__ALLOW_CREDENTIALS": "true"}, "cors"),
        ({"BACKSTREAM_DEFAULT_MODEL": "gpt-9"}, "default_model 'gpt-9' is not in the model table"),
        (
            {"BACKSTREAM_MODELS": "[{name: a, provider: openai, fallbacks: [b]}]"},
            "fallback 'b' is not in the model table",
        ),
        ({"BACKSTREAM_MODELS": "[{name: a, provider: openai, aliases: [local]}]"}, "'local' is used twice"),
        ({"BACKSTREAM_MODELS": "[{name: a, provider: gemini}]"}, "models.0.provider"),
        (
            {"BACKSTREAM_AUTH__JWT": "{jwks_file: k.json, issuer: i, audience: a, algorithms: [HS256]}"},
            "refused: HS256",
        ),
        ({"BACKSTREAM_AUTH__JWT": "{issuer: i, audience: a}"}, "exactly one of jwks_url and jwks_file"),
        (
            {"BACKSTREAM_AUTH__API_KEYS": f"[{{name: k, sha256: {'a' * 64}, tenants: [acme], default_tenant: other}}]"},
            "default_tenant must be one of its tenants",
        ),
        (
            {"BACKSTREAM_AUTH__API_KEYS": f"[{{name: k, sha256: {'a' * 64}, tenants: ['*']}}]"},
            "default_tenant is required",
        ),
        ({"BACKSTREAM_AUTH__API_KEYS": "[{name: k, sha256: 'not-hex', tenants: [acme]}]"}, "auth.api_keys.0.sha256"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert str(caught.value).startswith("invalid configuration: ")
    assert key in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("store: [unclosed", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping at the top level"),
        ("42", "mapping"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(write(tmp_path, content), environ={})


def test_an_empty_file_means_defaults_and_a_missing_file_is_an_error(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == load_settings(environ={})
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_a_bad_value_in_the_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.1\.retries"):
        load_settings(
            write(
                tmp_path,
                {
                    "models": [
                        {"name": "local", "provider": "local"},
                        {"name": "x", "provider": "openai", "retries": 99},
                    ]
                },
            ),
            environ={},
        )


@pytest.mark.parametrize(
    ("host", "auth", "insecure", "ok"),
    [
        ("127.0.0.1", False, False, True),
        ("localhost", False, False, True),
        ("::1", False, False, True),
        ("0.0.0.0", False, False, False),
        ("0.0.0.0", False, True, True),
        ("0.0.0.0", True, False, True),
        ("example.com", False, False, False),
    ],
)
def test_exposure_without_authentication(host: str, auth: bool, insecure: bool, ok: bool) -> None:
    tree: dict[str, Any] = {"host": host, "insecure_no_auth": insecure}
    if auth:
        tree["auth"] = {"api_keys": [{"name": "k", "sha256": "b" * 64, "tenants": ["acme"]}]}
    settings = Settings.model_validate(tree)
    if ok:
        settings.check_exposure()
    else:
        with pytest.raises(ConfigError, match=f"refusing to listen on {host} without authentication"):
            settings.check_exposure()


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("::") and not is_loopback("my-host")


@pytest.mark.parametrize(
    ("tree", "says"),
    [
        ({"tools": {"semantic_search": {"embeddings": "nope"}}}, "tools.semantic_search.embeddings 'nope'"),
        ({"default_model": "emb"}, "default_model 'emb' is an embeddings model"),
        ({"tools": {"semantic_search": {"embeddings": "local"}}}, "tools.semantic_search.embeddings 'local'"),
    ],
)
def test_embeddings_models_are_not_chat_models_and_search_names_one(tree: dict[str, Any], says: str) -> None:
    models = [{"name": "local", "provider": "local"}, {"name": "emb", "provider": "embeddings"}]
    with pytest.raises(ConfigError, match=says):
        load_settings(environ={}, **{"models": models, **tree})
    assert load_settings(environ={}, models=models, tools={"semantic_search": {"embeddings": "emb"}})
