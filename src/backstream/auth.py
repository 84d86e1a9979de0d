"""Who is calling, and for which tenant: API keys (stored as sha256) and OAuth 2.0 JWT access tokens."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson

from .config import ApiKeyConfig, AuthSettings, JwtConfig, Quota
from .errors import Forbidden, Invalid, Unauthenticated

TENANT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ANONYMOUS_TENANT = "default"
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `tenants` None means every tenant."""

    name: str
    tenants: frozenset[str] | None
    default_tenant: str
    quota: Quota | None = None  # per-key limits overriding the defaults


ANONYMOUS = Principal("anonymous", None, ANONYMOUS_TENANT)


def new_api_key() -> tuple[str, str]:
    """A fresh key and its sha256 (what goes in the config)."""
    key = "bsk_" + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def _unauthorized(message: str, error: str | None = "invalid_token") -> Unauthenticated:
    return Unauthenticated(message, challenge=error)


class Authenticator:
    """Turns an Authorization header into a Principal, and a principal plus X-Tenant into the tenant it acts for."""

    def __init__(self, settings: AuthSettings) -> None:
        self.enabled = settings.enabled
        self._keys: list[tuple[bytes, ApiKeyConfig]] = [(bytes.fromhex(k.sha256), k) for k in settings.api_keys]
        self._jwt = settings.jwt
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_client: jwt.PyJWKClient | None = None
        if self._jwt is not None:
            if self._jwt.jwks_file:
                self._jwks = jwt.PyJWKSet.from_json(Path(self._jwt.jwks_file).read_text())
            else:
                self._jwks_client = jwt.PyJWKClient(
                    self._jwt.jwks_url or "", cache_jwk_set=True, lifespan=300, timeout=10
                )

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise _unauthorized(
                "authentication required: send Authorization: Bearer <API key or access token>", error=None
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'", error="invalid_request")
        if token.count(".") == 2 and self._jwt is not None:
            return await self._from_jwt(token, self._jwt)
        return self._from_api_key(token)

    def _from_api_key(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, config in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(stored, digest):
                found = config
        if found is None:
            raise _unauthorized("invalid API key or token")
        tenants = None if "*" in found.tenants else frozenset(found.tenants)
        return Principal(f"key:{found.name}", tenants, found.default_tenant or found.tenants[0], found.limits)

    async def _signing_key(self, token: str, header: dict[str, Any]) -> Any:
        kid = header.get("kid")
        if self._jwks is not None:
            matches = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
            if not matches:
                raise _unauthorized("no key in the JWKS matches the token's kid")
            return matches[0]
        assert self._jwks_client is not None
        try:
            return await asyncio.to_thread(self._jwks_client.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientError as exc:
            raise _unauthorized(f"cannot find the token's signing key: {exc}") from None

    async def _from_jwt(self, token: str, config: JwtConfig) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("malformed token") from None
        alg = header.get("alg")
        if alg not in config.algorithms:
            raise _unauthorized(f"token algorithm {alg!r} is not accepted")
        key = await self._signing_key(token, header)
        # The key decides the algorithm family: an RSA public key is never used as an HMAC secret.
        if _KEY_TYPES.get(alg[:2]) != key.key_type:
            raise _unauthorized("the token's algorithm does not fit its key type")
        declared = (getattr(key, "_jwk_data", None) or {}).get("alg")  # only if the JWK names one
        if declared not in (None, alg):
            raise _unauthorized("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"invalid token: {exc}") from None
        tenants, default = _token_tenants(claims, config)
        return Principal(f"jwt:{claims.get('sub', '?')}", tenants, default)

    @staticmethod
    def tenant_for(principal: Principal, header: str | None) -> str:
        """The tenant a request acts for: X-Tenant if given and allowed, else the principal's default."""
        if header is None or header == "":
            # Checked again here so that no credential source can act for a tenant it was not granted.
            if not _is_tenant(principal.default_tenant) or not _grants(principal.tenants, principal.default_tenant):
                raise _forbidden("these credentials may not act for their default tenant")
            return principal.default_tenant
        if not _is_tenant(header):
            raise Invalid("X-Tenant must be 1-64 characters of letters, digits, '_', '.' and '-'", "X-Tenant")
        if not _grants(principal.tenants, header):
            raise _forbidden(f"these credentials may not act for tenant {header!r}")
        return header


def _is_tenant(value: object) -> bool:
    # fullmatch: `$` alone would accept a trailing newline
    return isinstance(value, str) and TENANT_ID.fullmatch(value) is not None


def _grants(tenants: frozenset[str] | None, tenant: str) -> bool:
    return tenants is None or tenant in tenants


def _forbidden(message: str) -> Forbidden:
    return Forbidden(message)


def _token_tenants(claims: dict[str, Any], config: JwtConfig) -> tuple[frozenset[str] | None, str]:
    """The granted tenants (None: all) and the default tenant of a verified token; 403 unless both are sound.

    Every value is held to the X-Tenant rules, and the default must be one of the granted tenants:
    a token must not reach a tenant through its default claim that its tenant list does not grant.
    """
    raw = claims.get(config.tenants_claim)
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise _forbidden(f"the token grants no tenants (claim {config.tenants_claim!r})")
    if any(t != "*" and not _is_tenant(t) for t in raw):
        raise _forbidden(f"the token's claim {config.tenants_claim!r} holds an invalid tenant id")
    tenants = None if "*" in raw else frozenset(raw)
    default = claims.get(config.default_tenant_claim) if config.default_tenant_claim else None
    if default is None:
        return tenants, next((t for t in raw if t != "*"), ANONYMOUS_TENANT)
    if not _is_tenant(default):
        raise _forbidden(f"the token's claim {config.default_tenant_claim!r} is not a valid tenant id")
    if not _grants(tenants, default):
        raise _forbidden(
            f"the token's default tenant is not one of the tenants it grants (claim {config.tenants_claim!r})"
        )
    return tenants, default


def jwks_from_public_keys(keys: list[tuple[str, Any, str]]) -> bytes:
    """A JWKS document for (kid, public key, alg) triples; used by tests and `backstream keys`."""
    out = []
    for kid, public_key, alg in keys:
        jwk = orjson.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(public_key))
        jwk.update({"kid": kid, "alg": alg, "use": "sig"})
        out.append(jwk)
    return orjson.dumps({"keys": out})
