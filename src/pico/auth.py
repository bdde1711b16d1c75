"""Who may do what: JWT verification for the proxy, upstream and admin ports.

`TokenVerifier` checks a bearer token against the keys of one port's `auth` config (HMAC, RSA
or ECDSA public keys, or a JWKS) with PyJWT, and returns the `Token`'s grants: its expiry and
the `pico.endpoints` globs it may use. Every refusal is an `AuthFailure` with a status, a
message for the client (nothing from the key or the token is echoed) and a reason for
`pico_auth_failures_total`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.types import Options

from pico import log
from pico.config.schema import AuthConfig
from pico.http.settings import Admission
from pico.tls import client_context

_log = log.get_logger("auth")

_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_ECDSA_ALGORITHMS = ("ES256", "ES384", "ES512")
# Verified tokens kept, so that a client sending the same token on every request costs a dict
# lookup, not a signature check (HS256 ~20 us, RS256 more). Only valid tokens get in.
_CACHE_SIZE = 4096
# A JWKS fetched over https is refetched at most this often for an unknown `kid`: a client
# cannot make the node hammer the key server by sending made-up key ids.
_JWKS_MIN_REFRESH = 1.0
# A JWKS server that does not answer must not hold a refresher thread for long.
_JWKS_TIMEOUT = 10.0


class AuthFailure(Exception):
    """A refused token: `status` and `message` for the client, `reason` for the metric."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason

    def fresh(self) -> AuthFailure:
        """A new instance to raise: a shared one would keep the last traceback (and the
        frames, tokens included, it refers to) alive, and chain each raise to the one before."""
        return AuthFailure(self.status, self.message, self.reason)


MISSING = AuthFailure(401, "missing token", "missing")
MALFORMED = AuthFailure(401, "malformed token", "malformed")
UNSUPPORTED = AuthFailure(401, "unsupported auth type", "unsupported")
EXPIRED = AuthFailure(401, "expired token", "expired")
NOT_YET_VALID = AuthFailure(401, "token not yet valid", "not_yet_valid")
NO_EXPIRY = AuthFailure(401, "token without expiry", "no_expiry")
BAD_SIGNATURE = AuthFailure(401, "invalid signature", "invalid_signature")
BAD_CLAIMS = AuthFailure(401, "invalid claims", "invalid_claims")
UNKNOWN_KEY = AuthFailure(401, "unknown signing key", "unknown_key")
NOT_PERMITTED = AuthFailure(403, "endpoint not permitted", "not_permitted")


@dataclass(frozen=True, slots=True)
class Token:
    """What a verified token grants."""

    expires: float | None  # `exp`, seconds since the epoch
    endpoints: tuple[str, ...] | None  # `pico.endpoints` globs; None: every endpoint

    def permits(self, endpoint_id: str) -> bool:
        """Whether the token's `pico.endpoints` globs (`*` only, ASCII case folded) allow it."""
        if self.endpoints is None:
            return True
        key = endpoint_id.lower()
        return any(_glob(pattern).fullmatch(key) for pattern in self.endpoints)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    # Only `*` is special (as in Piko): `?` and `[` are literal characters of an endpoint id.
    return re.compile(".*".join(re.escape(part) for part in pattern.lower().split("*")))


def bearer(value: str | bytes | None) -> str:
    """The token of an `Authorization: Bearer <token>` value. Raises AuthFailure."""
    if value is None:
        raise MISSING.fresh()
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    if not token:
        raise (MISSING if not scheme else MALFORMED).fresh()
    if scheme.lower() != "bearer":
        raise UNSUPPORTED.fresh()
    return token.strip()


def _pem(value: str) -> str:
    """A PEM key given inline or as a path to a file."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()


class _Jwks:
    """The keys of a JWKS, by `kid`: a `file://` set loaded once, or an https one fetched
    (in a thread, never on the event loop) every `cache_ttl` and when a `kid` is unknown."""

    def __init__(
        self,
        endpoint: str,
        cache_ttl: float,
        clock: Callable[[], float],
        fetch: Callable[[], Any] | None = None,
        root_ca: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.root_ca = root_ca
        self.cache_ttl = cache_ttl
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched = float("-inf")
        self.wanted = False  # an unknown kid was seen: refresh at the next chance
        self.remote = not endpoint.startswith("file://")
        self._fetch = fetch or self._fetch_https
        if not self.remote:
            self._load(jwt.PyJWKSet.from_json(Path(endpoint[len("file://") :]).read_text()))

    def _load(self, keys: jwt.PyJWKSet) -> None:
        self.keys = {k.key_id or "": k for k in keys.keys}

    def key(self, kid: str | None) -> jwt.PyJWK:
        key = self.keys.get(kid or "")
        if key is None and kid is None and len(self.keys) == 1:
            key = next(iter(self.keys.values()))
        if key is None:
            self.wanted = True
            raise UNKNOWN_KEY.fresh()
        return key

    def due(self) -> bool:
        """Whether `refresh()` should run now."""
        if not self.remote:
            return False
        age = self.clock() - self.fetched
        return age >= self.cache_ttl or (self.wanted and age >= _JWKS_MIN_REFRESH)

    def _fetch_https(self) -> Any:
        client = jwt.PyJWKClient(
            self.endpoint,
            cache_keys=False,
            cache_jwk_set=False,
            timeout=_JWKS_TIMEOUT,
            ssl_context=client_context(self.root_ca),
        )
        return client.fetch_data()

    def refresh(self) -> None:
        """Fetch the set (blocking: run it in a thread). Raises jwt.PyJWKClientError."""
        self.fetched = self.clock()
        self.wanted = False
        self._load(jwt.PyJWKSet.from_dict(self._fetch()))


class TokenVerifier:
    """Verifies bearer tokens against one port's `auth` config.

    `on_failure` is called with the reason of every refusal `check()` makes (the metric).
    """

    def __init__(
        self,
        config: AuthConfig,
        clock: Callable[[], float] = time.time,
        on_failure: Callable[[str], None] | None = None,
        jwks_fetch: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.on_failure = on_failure
        self._keys: list[tuple[Any, Sequence[str]]] = []
        if config.hmac_secret_key:
            self._keys.append((config.hmac_secret_key.encode(), _HMAC_ALGORITHMS))
        if config.rsa_public_key:
            self._keys.append((_pem(config.rsa_public_key), _RSA_ALGORITHMS))
        if config.ecdsa_public_key:
            self._keys.append((_pem(config.ecdsa_public_key), _ECDSA_ALGORITHMS))
        self.jwks = (
            _Jwks(
                config.jwks.endpoint,
                config.jwks.cache_ttl,
                clock,
                jwks_fetch,
                root_ca=config.jwks.root_ca,
            )
            if config.jwks.endpoint
            else None
        )
        self._cache: dict[str, Token] = {}
        required = [] if config.allow_no_expiry else ["exp"]
        self._options: Options = {"require": required, "verify_aud": bool(config.audience)}

    def verify(self, token: str) -> Token:
        """The grants of a valid token. Raises AuthFailure."""
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires is None or self.clock() < cached.expires:
                return cached
            del self._cache[token]
            raise EXPIRED.fresh()
        grants = self._verify(token)
        if len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[token] = grants
        return grants

    def _verify(self, token: str) -> Token:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise MALFORMED.fresh() from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise MALFORMED.fresh()
        key, algorithms = self._key_for(algorithm, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=self.config.audience or None,
                issuer=self.config.issuer or None,
                options=self._options,
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise EXPIRED.fresh() from None
        except jwt.ImmatureSignatureError:
            raise NOT_YET_VALID.fresh() from None
        except jwt.MissingRequiredClaimError as exc:
            raise (NO_EXPIRY if exc.claim == "exp" else BAD_CLAIMS).fresh() from None
        except jwt.InvalidSignatureError:
            raise BAD_SIGNATURE.fresh() from None
        except jwt.DecodeError:
            raise MALFORMED.fresh() from None
        except jwt.InvalidTokenError:
            raise BAD_CLAIMS.fresh() from None
        return Token(_expiry(claims), _endpoints(claims))

    def _key_for(self, algorithm: str, kid: object) -> tuple[Any, Sequence[str]]:
        if self.jwks is not None:
            key = self.jwks.key(kid if isinstance(kid, str) else None)
            if key.algorithm_name != algorithm:
                raise BAD_SIGNATURE.fresh()
            return key.key, (algorithm,)
        for key, algorithms in self._keys:
            if algorithm in algorithms:
                return key, algorithms
        raise BAD_SIGNATURE.fresh()  # signed with an algorithm no configured key verifies

    async def load_keys(self) -> bool:
        """Fetch an https JWKS once (the port then opens with its keys, so the first agents
        are not refused for an unknown key). False if the fetch failed: it is logged, and
        `keep_keys_fresh` retries."""
        jwks = self.jwks
        if jwks is None or not jwks.remote:
            return True
        try:
            await asyncio.to_thread(jwks.refresh)
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, OSError, ValueError) as exc:
            _log.warn("jwks fetch failed", endpoint=jwks.endpoint, error=str(exc))
            return False
        return True

    async def keep_keys_fresh(self, poll: float = 0.25) -> None:
        """Refetch an https JWKS when it is due (its TTL, or an unknown kid), until cancelled.

        A failed fetch keeps the keys it had and is logged at most once a minute.
        """
        jwks = self.jwks
        if jwks is None or not jwks.remote:
            return
        logged = float("-inf")
        while True:
            if jwks.due():
                try:
                    await asyncio.to_thread(jwks.refresh)
                except (jwt.PyJWKClientError, jwt.PyJWKSetError, OSError, ValueError) as exc:
                    if self.clock() - logged >= 60:
                        logged = self.clock()
                        _log.warn("jwks fetch failed", endpoint=jwks.endpoint, error=str(exc))
            await asyncio.sleep(poll)

    def verify_header(self, value: str | bytes | None) -> Token:
        """The grants of an `Authorization: Bearer <token>` value. Raises AuthFailure."""
        return self.verify(bearer(value))

    def check(self, value: str | bytes | None, endpoint_id: str | None = None) -> Token:
        """Verify an `Authorization` value and, if given, that it permits `endpoint_id`.

        Raises AuthFailure (401, or 403 `endpoint not permitted`); each refusal is counted.
        """
        try:
            token = self.verify(bearer(value))
            if endpoint_id is not None and not token.permits(endpoint_id):
                raise NOT_PERMITTED.fresh()
        except AuthFailure as exc:
            if self.on_failure is not None:
                self.on_failure(exc.reason)
            raise
        return token


def _expiry(claims: dict[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def _endpoints(claims: dict[str, Any]) -> tuple[str, ...] | None:
    pico = claims.get("pico")
    if not isinstance(pico, dict):
        return None
    endpoints = pico.get("endpoints")
    if endpoints is None or endpoints == []:
        return None  # a missing or empty list means every endpoint (as in Piko)
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise BAD_CLAIMS.fresh()
    return tuple(endpoints)


class ProxyAuth:
    """The proxy port's `RequestAuth` (http/settings.py) over a verifier.

    With `disconnect_on_expiry`, a connection a request upgrades (WebSocket, TCP) ends when
    the token it came with expires, as an agent's tunnel does: a token must not let a
    connection in for longer than it is valid.
    """

    def __init__(self, verifier: TokenVerifier, *, disconnect_on_expiry: bool = True) -> None:
        self.verifier = verifier
        self.disconnect_on_expiry = disconnect_on_expiry

    def admit(self, credentials: bytes | None, endpoint_id: str) -> Admission:
        try:
            token = self.verifier.check(credentials, endpoint_id)
        except AuthFailure as exc:
            return Admission((exc.status, exc.message))
        return Admission(None, token.expires if self.disconnect_on_expiry else None)


def verifier_for(
    config: AuthConfig, on_failure: Callable[[str], None] | None = None
) -> TokenVerifier | None:
    """A verifier when `config` sets a key, else None (auth off on that port)."""
    if config.enabled:
        return TokenVerifier(config, on_failure=on_failure)
    return None


__all__ = [
    "AuthFailure",
    "ProxyAuth",
    "Token",
    "TokenVerifier",
    "bearer",
    "verifier_for",
]
