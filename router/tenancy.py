"""Who is asking, and which cache salt their requests get.

A shared prefix cache is a side channel: a hit is measurably faster than a miss, so one
tenant could probe another's prompts. A salt the client chooses protects nothing (an
attacker sends the victim's salt), so the router derives it on the server side:
``HMAC-SHA256(secret, tenant)``, replaces any client ``cache_salt`` unless that tenant may
choose its own, mixes it into the router's keys and forwards it to the engine. Tenants in
one ``shared_salt_groups`` entry share a salt on purpose.

API keys are stored as SHA-256 digests only; comparisons are constant-time. Secrets come
from files or environment variables and are never logged. This module owns identity and
salts; it refuses to own routing or HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from router.config import AuthConfig
from router.errors import Forbidden, NotFound, Unauthorized


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    allow_client_salt: bool = False


ANONYMOUS = Tenant("")


def read_secret(file: str | None, env: str | None) -> str | None:
    """A secret from a file (trailing newline dropped) or an environment variable; None if neither is set."""
    if file:
        return Path(file).read_text().strip()
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ValueError(f"environment variable {env} named in the auth config is not set")
        return value.strip()
    return None


def derive_salt(secret: str, name: str) -> str:
    return hmac.new(secret.encode(), b"cache-router-salt\x00" + name.encode(), hashlib.sha256).hexdigest()[:32]


class Tenancy:
    def __init__(self, config: AuthConfig) -> None:
        self._keys = {k.sha256.lower(): Tenant(k.tenant, k.allow_client_salt) for k in config.api_keys or []}
        self._require_key = config.api_keys is not None
        self._header = config.tenant_header.lower() if config.tenant_header else None
        self._admin = read_secret(config.admin_token_file, config.admin_token_env)
        # Without a secret, salts still come from the authenticated identity (clients cannot
        # choose them); the secret only adds protection against clients that reach engines directly.
        self._secret = read_secret(config.salt_secret_file, config.salt_secret_env) or ""
        self.tenancy_enabled = self._require_key or self._header is not None
        self._group_of = {t: g for g, members in config.shared_salt_groups.items() for t in members}

    @property
    def admin_enabled(self) -> bool:
        return self._admin is not None

    def identify(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant of a request, or Unauthorized. ``headers`` keys are lower-case (ASGI)."""
        if self._require_key:
            auth = headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not key:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            digest = hashlib.sha256(key.strip().encode()).hexdigest()
            # dict lookup by digest is safe: the digest of a guess reveals nothing about stored keys.
            tenant = self._keys.get(digest)
            if tenant is None:
                raise Unauthorized("invalid API key")
            return tenant
        if self._header:
            name = headers.get(self._header)
            return Tenant(name) if name else ANONYMOUS
        return ANONYMOUS

    def salt_for(self, tenant: Tenant, client_salt: str | None) -> str | None:
        """The cache salt to hash with and forward to the engine.

        Without tenancy configured, the client's salt passes through (vLLM's own behaviour).
        With it, every salt is derived on the server: a tenant's own (or its group's), or,
        for a tenant allowed to choose, one derived from tenant *and* client salt, so no
        client-sent value can ever equal another tenant's salt.
        """
        if not self.tenancy_enabled:
            return client_salt
        if tenant is ANONYMOUS or (tenant.allow_client_salt and client_salt is not None):
            if client_salt is None:
                return None
            return derive_salt(self._secret, f"client\x00{tenant.name}\x00{client_salt}")
        group = self._group_of.get(tenant.name)
        return derive_salt(self._secret, f"group\x00{group}" if group else f"tenant\x00{tenant.name}")

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """Admin and debug endpoints: 404 when no admin token is configured, 403 without the right one.

        The token is read from ``x-admin-token``, else from ``Authorization: Bearer``."""
        if self._admin is None:
            raise NotFound("not found")
        # x-admin-token first: with API keys configured, Authorization carries the tenant's key
        # (a dry run is answered under that tenant's salt), so the admin token travels apart.
        token = headers.get("x-admin-token")
        if token is None:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self._admin.encode()):
            raise Forbidden("admin token required")
