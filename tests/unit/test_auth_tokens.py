"""The token checker: every algorithm, every failure reason, endpoint globs, JWKS by kid."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pico.auth import AuthFailure, Token, TokenVerifier, bearer
from pico.config import load_config_dict
from pico.config.loader import ConfigError
from pico.config.schema import AuthConfig

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
