"""The token checker: every algorithm, every failure reason, endpoint globs, JWKS by kid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pico.auth import AuthFailure, ProxyAuth, Token, TokenVerifier, bearer
from pico.config import load_config_dict
from pico.config.loader import ConfigError
from pico.config.schema import AuthConfig
from pico.http.settings import Admission
from tests.support.cluster import wait_for

SECRET = "s3cret-for-tests-only-" + "x" * 64
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
}


def pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def config(**values: Any) -> AuthConfig:
    return load_config_dict(AuthConfig, values)


def claims(**extra: Any) -> dict[str, Any]:
    return {"exp": int(time.time()) + 60, **extra}


def failure(verifier: TokenVerifier, token: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as err:
        verifier.verify(token)
    return err.value


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_tokens_of_every_size_verify(alg: str) -> None:
    verifier = TokenVerifier(config(hmac_secret_key=SECRET))
    token = jwt.encode(claims(), SECRET, algorithm=alg)
    assert verifier.verify(token).endpoints is None


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_rsa_tokens_of_every_size_verify(alg: str) -> None:
    verifier = TokenVerifier(config(rsa_public_key=pem(RSA_KEY)))
    assert verifier.verify(jwt.encode(claims(), RSA_KEY, algorithm=alg)).expires


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_ecdsa_tokens_of_every_size_verify(alg: str) -> None:
    verifier = TokenVerifier(config(ecdsa_public_key=pem(EC_KEYS[alg])))
    assert verifier.verify(jwt.encode(claims(), EC_KEYS[alg], algorithm=alg)).expires


def test_a_key_given_as_a_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem(RSA_KEY))
    verifier = TokenVerifier(config(rsa_public_key=str(path)))
    assert verifier.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256"))


def test_each_failure_has_its_own_reason_and_echoes_nothing() -> None:
    verifier = TokenVerifier(config(hmac_secret_key=SECRET, audience="pico", issuer="me"))
    good = {"aud": "pico", "iss": "me"}
    now = int(time.time())
    cases = {
        "malformed": "not.a.token",
        "expired": jwt.encode({**good, "exp": now - 5}, SECRET, algorithm="HS256"),
        "not_yet_valid": jwt.encode(claims(nbf=now + 60, **good), SECRET, algorithm="HS256"),
        "no_expiry": jwt.encode(good, SECRET, algorithm="HS256"),
        "invalid_signature": jwt.encode(claims(**good), "another-secret-entirely" * 4, "HS256"),
        "invalid_claims": jwt.encode(claims(aud="other", iss="me"), SECRET, algorithm="HS256"),
    }
    for reason, token in cases.items():
        err = failure(verifier, token)
        assert (err.status, err.reason) == (401, reason), reason
        assert token not in err.message and SECRET not in err.message
    wrong_issuer = jwt.encode(claims(aud="pico", iss="them"), SECRET, algorithm="HS256")
    assert failure(verifier, wrong_issuer).reason == "invalid_claims"


def test_a_token_without_expiry_passes_only_when_allowed() -> None:
    token = jwt.encode({"sub": "x"}, SECRET, algorithm="HS256")
    assert TokenVerifier(config(hmac_secret_key=SECRET, allow_no_expiry=True)).verify(token)
    assert failure(TokenVerifier(config(hmac_secret_key=SECRET)), token).reason == "no_expiry"


def test_algorithms_no_configured_key_verifies_are_refused() -> None:
    rsa_only = TokenVerifier(config(rsa_public_key=pem(RSA_KEY)))
    # An HMAC token "signed" with the public key (the classic algorithm confusion).
    forged = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert failure(rsa_only, forged).reason == "invalid_signature"
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert failure(rsa_only, unsigned).reason == "invalid_signature"


def test_bearer_values() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer(b"bearer  abc ") == "abc"
    for value, reason in [(None, "missing"), ("", "missing"), ("Bearer", "malformed")]:
        with pytest.raises(AuthFailure) as err:
            bearer(value)
        assert err.value.reason == reason
    with pytest.raises(AuthFailure) as err:
        bearer("Basic Zm9vOmJhcg==")
    assert err.value.message == "unsupported auth type"


@pytest.mark.parametrize(
    ("globs", "allowed", "refused"),
    [
        (["my-*", "api"], ["my-app", "MY-APP", "my-", "api"], ["api2", "your-app", "x"]),
        (["*"], ["anything"], []),
        (["a*b*c"], ["abc", "a-b-c", "aXXbYYc"], ["ab", "acb"]),
        (["a.b"], ["a.b"], ["axb"]),  # `.` is literal
    ],
)
def test_endpoint_globs(globs: list[str], allowed: list[str], refused: list[str]) -> None:
    token = Token(None, tuple(globs))
    assert all(token.permits(e) for e in allowed)
    assert not any(token.permits(e) for e in refused)


def test_the_endpoints_claim_limits_a_token() -> None:
    verifier = TokenVerifier(config(hmac_secret_key=SECRET))
    token = jwt.encode(claims(pico={"endpoints": ["my-*"]}), SECRET, algorithm="HS256")
    grants = verifier.verify(token)
    assert grants.permits("my-app") and not grants.permits("other")
    empty = jwt.encode(claims(pico={"endpoints": []}), SECRET, algorithm="HS256")
    assert verifier.verify(empty).permits("other")
    bad = jwt.encode(claims(pico={"endpoints": "my-*"}), SECRET, algorithm="HS256")
    assert failure(verifier, bad).reason == "invalid_claims"


def jwks_file(tmp_path: Path) -> Path:
    keys = [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "r1"},
        {
            **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEYS["ES256"].public_key())),
            "kid": "e1",
        },
    ]
    keys[0]["alg"] = "RS256"
    keys[1]["alg"] = "ES256"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def test_jwks_keys_are_chosen_by_kid(tmp_path: Path) -> None:
    verifier = TokenVerifier(config(jwks={"endpoint": f"file://{jwks_file(tmp_path)}"}))
    rsa_token = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "r1"})
    ec_token = jwt.encode(claims(), EC_KEYS["ES256"], algorithm="ES256", headers={"kid": "e1"})
    assert verifier.verify(rsa_token) and verifier.verify(ec_token)
    unknown = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "nope"})
    assert failure(verifier, unknown).reason == "unknown_key"
    # The right kid with another key's algorithm is refused.
    mixed = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "e1"})
    assert failure(verifier, mixed).reason == "invalid_signature"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"rsa_public_key": "/no/such/file.pem"}, "rsa_public_key"),
        ({"rsa_public_key": "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----"}, "rsa"),
        ({"jwks": {"endpoint": "http://example.com/jwks"}}, "jwks.endpoint"),
        ({"jwks": {"endpoint": "file:///no/such.json"}}, "jwks.endpoint"),
        ({"hmac_secret_key": "x", "jwks": {"endpoint": "https://e.example/j"}}, "jwks.endpoint"),
    ],
)
def test_bad_auth_config_names_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**values)
    assert key.split(".")[0] in str(err.value)


def test_an_ecdsa_key_is_not_accepted_as_rsa() -> None:
    with pytest.raises(ConfigError) as err:
        config(rsa_public_key=pem(EC_KEYS["ES256"]))
    assert "rsa_public_key" in str(err.value)


async def test_an_https_jwks_is_fetched_when_due_and_on_an_unknown_kid_at_most_once_a_second(
    tmp_path: Path,
) -> None:
    keys = json.loads(jwks_file(tmp_path).read_text())
    served: dict[str, Any] = {"keys": keys["keys"][:1]}  # only r1 at first
    fetches: list[float] = []
    now = [1000.0]

    def fetch() -> dict[str, Any]:
        fetches.append(now[0])
        return served

    verifier = TokenVerifier(
        config(jwks={"endpoint": "https://keys.example/jwks.json", "cache_ttl": "1h"}),
        clock=lambda: now[0],
        jwks_fetch=fetch,
    )
    jwks = verifier.jwks
    assert jwks is not None and jwks.due()  # never fetched
    jwks.refresh()
    r1 = jwt.encode({"exp": 10**10}, RSA_KEY, algorithm="RS256", headers={"kid": "r1"})
    assert verifier.verify(r1)
    e1 = jwt.encode({"exp": 10**10}, EC_KEYS["ES256"], algorithm="ES256", headers={"kid": "e1"})
    assert failure(verifier, e1).reason == "unknown_key"
    assert not jwks.due()  # the unknown kid asks for a refresh, but not within a second
    now[0] += 1.0
    assert jwks.due()
    served = {"keys": keys["keys"]}  # the key server now has e1 (a rotation)
    jwks.refresh()
    assert verifier.verify(e1)
    assert fetches == [1000.0, 1001.0]
    now[0] += 3600
    assert jwks.due()  # the TTL ran out


async def test_the_refresher_fetches_in_a_thread_and_keeps_its_keys_when_a_fetch_fails(
    tmp_path: Path,
) -> None:
    keys = json.loads(jwks_file(tmp_path).read_text())
    calls = [0]

    def fetch() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] > 1:
            raise jwt.PyJWKClientError("key server down")
        return keys

    verifier = TokenVerifier(
        config(jwks={"endpoint": "https://keys.example/jwks.json", "cache_ttl": "10ms"}),
        jwks_fetch=fetch,
    )
    task = asyncio.get_running_loop().create_task(verifier.keep_keys_fresh(poll=0.005))
    try:
        await wait_for(lambda: calls[0] >= 3, what="three fetches, two of them failing")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    r1 = jwt.encode({"exp": 10**10}, RSA_KEY, algorithm="RS256", headers={"kid": "r1"})
    assert verifier.verify(r1)  # the keys of the first fetch are still in use


def test_the_proxy_admits_until_the_token_expires_unless_told_to_keep_connections() -> None:
    verifier = TokenVerifier(config(hmac_secret_key=SECRET))
    token = jwt.encode(claims(pico={"endpoints": ["db"]}), SECRET, algorithm="HS256")
    expires = float(jwt.decode(token, SECRET, algorithms=["HS256"])["exp"])
    header = f"Bearer {token}".encode()
    # An upgraded connection it lets in is to end at `exp` ...
    assert ProxyAuth(verifier).admit(header, "db") == Admission(None, expires)
    # ... unless disconnect on expiry is off; a refusal carries no expiry either way.
    assert ProxyAuth(verifier, disconnect_on_expiry=False).admit(header, "db") == (None, None)
    assert ProxyAuth(verifier).admit(header, "web") == Admission((403, "endpoint not permitted"))
    assert ProxyAuth(verifier).admit(None, "db") == Admission((401, "missing token"))
