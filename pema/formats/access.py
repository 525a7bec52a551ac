"""Access to the project's HTTP services, the PLM owner's (:mod:`pema.owner.service`) and the adapter service
(:mod:`pema.jobs.serve_adapters`): bearer tokens per tenant, the check of a request's ``Authorization`` header, and
:class:`RequestError`, an answer other than 200 with a message naming what was wrong.

Tokens come from a JSON file ``{"tenant": "token", ...}`` or an environment variable of ``tenant:token`` pairs,
comma-separated (each service names its own: ``PEMA_OWNER_TOKENS``, ``PEMA_ADAPTER_TOKENS``). Both services use
this one code path, so a token is checked the same way everywhere (in constant time, ``hmac.compare_digest``).
"""
from __future__ import annotations

import hmac
import json
import os
import threading
import time
from pathlib import Path

from pema.errors import ConfigError

UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer <token>)"


class RequestError(Exception):
    """An answer other than 200: ``status`` and a message naming what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


MIN_TOKEN_CHARS = 16  # a bearer token is a secret: a short or blank one is refused when the service starts


def load_tokens(path: str | os.PathLike | None = None, env: str = "PEMA_OWNER_TOKENS") -> dict[str, str]:
    """``{token: tenant}`` from a JSON file ``{"tenant": "token", ...}`` or ``$env`` (``tenant:token`` pairs,
    comma-separated); ConfigError when neither gives a token (a service without tokens would answer anyone)."""
    pairs: dict[str, str] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{path}: not JSON ({exc}); expected {{\"tenant\": \"token\", ...}}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
            raise ConfigError(f"{path}: expected a JSON object {{\"tenant\": \"token\", ...}}")
        pairs = dict(data)
    elif os.environ.get(env):
        for item in os.environ[env].split(","):
            tenant, sep, token = item.strip().partition(":")
            if not sep or not tenant or not token:
                raise ConfigError(f"${env}: {item!r} is not tenant:token")
            pairs[tenant] = token
    if not pairs:
        raise ConfigError(f"no access tokens: pass a tokens file or set ${env}=tenant:token")
    where = path if path is not None else f"${env}"
    for tenant, token in pairs.items():
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"{where}: the token of tenant {tenant!r} is not a usable secret: give at least "
                              f"{MIN_TOKEN_CHARS} printable characters without spaces (openssl rand -hex 16)")
    by_token: dict[str, str] = {}
    for tenant, token in pairs.items():
        if token in by_token:  # two tenants on one token would be one tenant, silently
            raise ConfigError(f"{where}: tenants {by_token[token]!r} and {tenant!r} share one token; give each its own")
        by_token[token] = tenant
    return by_token


def bearer_tenant(headers: dict[str, str], tokens: dict[str, str]) -> str:
    """The tenant whose token the ``Authorization: Bearer <token>`` header carries; RequestError 401 for a missing
    or wrong one. ``tokens`` is :func:`load_tokens`'s ``{token: tenant}``."""
    auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    for known, tenant in tokens.items():
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), known):
            return tenant
    raise RequestError(401, UNAUTHORIZED)


def json_object(body: bytes) -> dict:
    """A request body as a JSON object; RequestError 400 for anything else."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise RequestError(400, f"body is not JSON ({exc})") from None
    except RecursionError:  # [[[[... nested past the parser's stack: refused, not a 500
        raise RequestError(400, "body is not JSON this service reads: nested too deep") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    return data


class RateLimiter:
    """Each tenant's request rate: a token bucket of ``burst`` requests refilled at ``per_s`` a second.
    ``take(tenant)`` -> None when the request may go on, else the seconds until one may (the 429's Retry-After)."""

    def __init__(self, per_s: float, burst: int):
        self.per_s, self.burst = float(per_s), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (requests left, when counted)
        self._lock = threading.Lock()

    def take(self, tenant: str) -> float | None:
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(tenant, (float(self.burst), now))
            left = min(float(self.burst), left + (now - then) * self.per_s)
            if left < 1.0:
                self._buckets[tenant] = (left, now)
                return (1.0 - left) / self.per_s
            self._buckets[tenant] = (left - 1.0, now)
            return None
