"""JWTs minted by every backend, verified by PyJWT and joserfc; and verify_jwt against PyJWT's tokens."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from joserfc import jwt as joserfc_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet

from hsm_keys import oidc
from hsm_keys.encoding import b64url_decode, b64url_encode, ecdsa_der_to_raw, ecdsa_raw_to_der
from hsm_keys.errors import (
    EncodingError,
    InvalidInputError,
    InvalidTokenError,
    KeyNotFoundError,
    SigningError,
    UnsupportedAlgorithmError,
)
from hsm_keys.keystore import KeyStore
from hsm_keys.types import Binding, KeyInfo, KeySpec, SignatureAlgorithm

ACCOUNT = "123456789012"
ISSUER = "https://idp.example.test/123456789012/alice"
AUDIENCE = "sts.amazonaws.com"
CLAIMS = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE}
NOW = dt.datetime(2031, 2, 3, 4, 5, 6, 999999, tzinfo=dt.UTC)
NOW_TS = int(NOW.replace(microsecond=0).timestamp())

CASES = [
    (KeySpec.RSA_2048, "RS256"),
    (KeySpec.RSA_2048, "RS384"),
    (KeySpec.RSA_2048, "RS512"),
    (KeySpec.RSA_2048, "PS256"),
    (KeySpec.RSA_2048, "PS384"),
    (KeySpec.RSA_2048, "PS512"),
    (KeySpec.EC_P256, "ES256"),
    (KeySpec.EC_P384, "ES384"),
    (KeySpec.EC_P521, "ES512"),
    (KeySpec.ED25519, "EdDSA"),
]
SIGNATURE_SIZES = {"ES256": 64, "ES384": 96, "ES512": 132, "EdDSA": 64}


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)), b64url_decode(signature)


def _joserfc_claims(token: str, info: KeyInfo, alg: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(oidc.jwks([info], alg=alg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # RFC 9864 deprecates the name "EdDSA"
        return dict(joserfc_jwt.decode(token, keys, algorithms=[alg]).claims)


@pytest.mark.parametrize(("spec", "alg"), CASES, ids=[f"{s.value}-{a}" for s, a in CASES])
def test_every_algorithm_verifies_with_pyjwt_and_joserfc(store: KeyStore, spec: KeySpec, alg: str) -> None:
    info = store.generate(spec, Binding("alice", ACCOUNT))
    token = oidc.mint_jwt(store, info.kid, CLAIMS, alg, ttl=300)

    header, payload, signature = _parts(token)
    assert header == {"alg": alg, "typ": "JWT", "kid": info.kid}
    assert set(payload) == {"iss", "sub", "aud", "iat", "exp", "jti"}
    assert payload["exp"] - payload["iat"] == 300
    assert isinstance(payload["iat"], int) and isinstance(payload["exp"], int)
    rsa_size = info.spec.size // 8
    assert len(signature) == SIGNATURE_SIZES.get(alg, rsa_size)

    published = oidc.jwks([info], alg=alg)
    by_pyjwt = pyjwt.decode(
        token,
        key=pyjwt.PyJWKSet.from_dict(published)[info.kid],
        algorithms=[alg],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    assert by_pyjwt == payload
    assert _joserfc_claims(token, info, alg) == payload
    assert oidc.verify_jwt(token, published, audience=AUDIENCE, issuer=ISSUER) == payload


def test_clock_rounding_not_before_and_timedelta_ttl(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("clock", ACCOUNT))
    for now in (NOW, lambda: NOW, NOW.astimezone(dt.timezone(dt.timedelta(hours=5)))):
        token = oidc.mint_jwt(store, info.kid, CLAIMS, "ES256", ttl=dt.timedelta(minutes=15), now=now)
        payload = _parts(token)[1]
        assert payload["iat"] == NOW_TS  # rounded down: never issued in the future
        assert payload["exp"] == NOW_TS + 900
        assert "nbf" not in payload
    token = oidc.mint_jwt(store, info.kid, CLAIMS, ttl=60, now=NOW, not_before=True)
    payload = _parts(token)[1]
    assert payload["nbf"] == payload["iat"] == NOW_TS
    assert _parts(token)[0]["alg"] == "ES256"  # the key's default algorithm
    claims = oidc.verify_jwt(token, info, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    assert claims["nbf"] == NOW_TS


def test_audience_is_kept_exactly_as_given(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("aud", ACCOUNT))
    for aud, expected in ((AUDIENCE, AUDIENCE), ([AUDIENCE], [AUDIENCE]), (("a", "b"), ["a", "b"])):
        token = oidc.mint_jwt(store, info.kid, {**CLAIMS, "aud": aud}, ttl=60)
        assert _parts(token)[1]["aud"] == expected
        pyjwt.decode(
            token,
            key=info.public_key,
            algorithms=["ES256"],
            audience=expected[0] if isinstance(expected, list) else expected,
        )
    for bad in ("", [], [""], ["ok", 3], 7):
        with pytest.raises(InvalidInputError, match="aud"):
            oidc.mint_jwt(store, info.kid, {**CLAIMS, "aud": bad}, ttl=60)


def test_jti_is_unique(store: KeyStore) -> None:
    info = store.generate(KeySpec.ED25519, Binding("jti", ACCOUNT))
    jtis = {_parts(oidc.mint_jwt(store, info.kid, CLAIMS, ttl=60, now=NOW))[1]["jti"] for _ in range(200)}
    assert len(jtis) == 200
    assert all(len(b64url_decode(jti)) == 16 for jti in jtis)


@pytest.mark.parametrize(
    "ttl",
    [0, -1, dt.timedelta(0), dt.timedelta(milliseconds=500), 1.5, True, "60", 10**30, dt.timedelta(days=367)],
)
def test_ttl_must_be_positive_whole_seconds(store: KeyStore, ttl: Any) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("ttl", ACCOUNT))
    with pytest.raises(InvalidInputError, match="ttl"):
        oidc.mint_jwt(store, info.kid, CLAIMS, ttl=ttl)


def test_claims_nested_too_deeply_are_invalid_input(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("deep", ACCOUNT))
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInputError, match="deeply"):
        oidc.mint_jwt(store, info.kid, {**CLAIMS, "x": deep}, ttl=60)


@pytest.mark.parametrize("claim", ["iat", "exp", "nbf", "jti"])
def test_reserved_claims_are_refused(store: KeyStore, claim: str) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("reserved", ACCOUNT))
    with pytest.raises(InvalidInputError, match=claim):
        oidc.mint_jwt(store, info.kid, {**CLAIMS, claim: 1}, ttl=60)


def test_claims_must_be_a_json_object(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("json", ACCOUNT))
    for claims in ({"x": object()}, {"x": float("nan")}, {1: "x"}, [("sub", "x")]):
        with pytest.raises(InvalidInputError):
            oidc.mint_jwt(store, info.kid, claims, ttl=60)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="timezone"):
        oidc.mint_jwt(store, info.kid, CLAIMS, ttl=60, now=dt.datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("spec", "alg"),
    [
        (KeySpec.EC_P256, "ES384"),
        (KeySpec.EC_P256, "RS256"),
        (KeySpec.RSA_2048, "ES256"),
        (KeySpec.RSA_2048, "EdDSA"),
        (KeySpec.ED25519, "ES256"),
        (KeySpec.EC_P256, "HS256"),
        (KeySpec.EC_P256, "none"),
    ],
)
def test_algorithm_must_suit_the_key(store: KeyStore, spec: KeySpec, alg: str) -> None:
    info = store.generate(spec, Binding("alg", ACCOUNT))
    with pytest.raises(UnsupportedAlgorithmError):
        oidc.mint_jwt(store, info.kid, CLAIMS, alg, ttl=60)


def test_unknown_kid(store: KeyStore) -> None:
    with pytest.raises(KeyNotFoundError):
        oidc.mint_jwt(store, "missing", CLAIMS, "ES256", ttl=60)


def test_a_faulty_store_signature_is_caught_before_the_token_leaves(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("faulty", ACCOUNT))
    monkeypatch.setattr(
        store, "_sign_batch", lambda info, messages, alg, workers: [b"\x01" * 64 for _ in messages]
    )
    with pytest.raises(SigningError, match="does not verify"):
        oidc.mint_jwt(store, info.kid, CLAIMS, ttl=60)


@pytest.mark.parametrize("spec", [KeySpec.EC_P256, KeySpec.EC_P384, KeySpec.EC_P521])
def test_thousands_of_store_signatures_have_exact_length(store: KeyStore, spec: KeySpec) -> None:
    info = store.generate(spec, Binding("many", ACCOUNT))
    alg = SignatureAlgorithm.default_for(spec)
    signatures = store.sign_many(info.kid, [i.to_bytes(4, "big") for i in range(1000)], alg)
    assert {len(s) for s in signatures} == {2 * spec.coordinate_size}
    assert all(ecdsa_der_to_raw(ecdsa_raw_to_der(s), spec) == s for s in signatures)


# -- verify_jwt: the checks STS makes, against tokens from an independent minter ------------------


@pytest.fixture(scope="module")
def foreign() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = oidc.public_jwk(key.public_key())
    return key, jwk


def _foreign_token(key: ec.EllipticCurvePrivateKey, jwk: dict[str, Any], **overrides: Any) -> str:
    """A token from PyJWT; an override of None removes that claim."""
    claims = {**CLAIMS, "iat": NOW_TS, "exp": NOW_TS + 60, **overrides}
    claims = {name: value for name, value in claims.items() if value is not None}
    return pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": jwk["kid"]})


def test_verify_jwt_accepts_pyjwt_tokens(foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]) -> None:
    key, jwk = foreign
    token = _foreign_token(key, jwk, nbf=NOW_TS)
    claims = oidc.verify_jwt(token, {"keys": [jwk]}, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    assert claims["sub"] == "alice"
    assert oidc.verify_jwt(token, key.public_key(), audience=None, issuer=None, now=NOW, algorithms=["ES256"])
    late = NOW + dt.timedelta(seconds=65)
    assert (
        oidc.verify_jwt(token, jwk, audience=AUDIENCE, issuer=ISSUER, now=late, leeway=10)["sub"] == "alice"
    )
    with pytest.raises(InvalidInputError, match="leeway"):
        oidc.verify_jwt(token, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW, leeway=-1)


@pytest.mark.parametrize(
    ("overrides", "now", "message"),
    [
        ({}, NOW + dt.timedelta(seconds=60), "expired"),
        ({"exp": None}, NOW, "no exp"),
        ({"exp": "soon"}, NOW, "not a finite number"),
        ({"nbf": NOW_TS + 10}, NOW, "not valid before"),
        ({"iat": NOW_TS + 10}, NOW, "future"),
        ({"iss": "https://other.example.test"}, NOW, "iss"),
        ({"aud": "someone-else"}, NOW, "aud"),
        ({"aud": None}, NOW, "aud"),
    ],
)
def test_verify_jwt_refuses_what_sts_would(
    foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]],
    overrides: dict[str, Any],
    now: dt.datetime,
    message: str,
) -> None:
    key, jwk = foreign
    token = _foreign_token(key, jwk, **overrides)
    with pytest.raises(InvalidInputError, match=message):
        oidc.verify_jwt(token, jwk, audience=AUDIENCE, issuer=ISSUER, now=now)


def test_verify_jwt_refuses_forgeries(foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]) -> None:
    key, jwk = foreign
    token = _foreign_token(key, jwk)
    header, payload, signature = token.split(".")
    tampered = json.loads(b64url_decode(payload)) | {"sub": "mallory"}
    forged = f"{header}.{b64url_encode(json.dumps(tampered).encode())}.{signature}"
    with pytest.raises(InvalidTokenError, match="does not verify"):
        oidc.verify_jwt(forged, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW)

    unsigned = b64url_encode(b'{"alg":"none","typ":"JWT"}') + "." + payload + "."
    with pytest.raises(UnsupportedAlgorithmError):
        oidc.verify_jwt(unsigned, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    hmac = pyjwt.encode({"sub": "x"}, "secret-secret-secret-secret-32by", algorithm="HS256")
    with pytest.raises(UnsupportedAlgorithmError):
        oidc.verify_jwt(hmac, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    with pytest.raises(UnsupportedAlgorithmError, match="allowed"):
        oidc.verify_jwt(token, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW, algorithms=["RS256"])
    with pytest.raises(InvalidInputError, match="'RS256'"):
        oidc.verify_jwt(token, {**jwk, "alg": "RS256"}, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    other = oidc.public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidInputError, match="0 keys"):
        oidc.verify_jwt(token, {"keys": [other]}, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    # An RS256 header over an EC key: refused for the algorithm, before any signature check.
    confused = (
        b64url_encode(b'{"alg":"RS256","kid":"' + jwk["kid"].encode() + b'"}')
        + "."
        + payload
        + "."
        + signature
    )
    with pytest.raises(UnsupportedAlgorithmError, match="does not suit"):
        oidc.verify_jwt(confused, key.public_key(), audience=None, issuer=None, now=NOW)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "e30.e30.###", "bm90IGpzb24.e30.", "W10.e30."])
def test_verify_jwt_refuses_malformed_tokens(
    foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]], token: str
) -> None:
    with pytest.raises(EncodingError):
        oidc.verify_jwt(token, foreign[1], audience=None, issuer=None, now=NOW)


@pytest.mark.parametrize("segment", ["header", "payload"])
def test_hostile_nesting_is_an_encoding_error(
    foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]], segment: str
) -> None:
    _, jwk = foreign
    deep = b64url_encode(b"[" * 100_000)
    token = f"{deep}.e30.AA" if segment == "header" else f"{b64url_encode(b'{}')}.{deep}.AA"
    with pytest.raises(EncodingError):
        oidc.verify_jwt(token, jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_non_finite_time_claims_are_invalid_tokens(
    foreign: tuple[ec.EllipticCurvePrivateKey, dict[str, Any]], value: str
) -> None:
    key, jwk = foreign
    token = _foreign_token(key, jwk)
    header, payload, _ = token.split(".")
    text = b64url_decode(payload).decode()
    claims = json.loads(text)
    raw = text.replace(f'"exp":{claims["exp"]}', f'"exp":{value}')
    assert raw != text
    body = b64url_encode(raw.encode())
    der = key.sign(f"{header}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    signature = b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    with pytest.raises(InvalidTokenError, match="finite"):
        oidc.verify_jwt(f"{header}.{body}.{signature}", jwk, audience=AUDIENCE, issuer=ISSUER, now=NOW)


def test_rsa_keys_below_2048_bits_do_not_verify_tokens() -> None:
    # RFC 7518 section 3.3; the signature itself is valid, so only the size check can refuse it.
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(65537, 1024)
    header = b64url_encode(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = b64url_encode(json.dumps({**CLAIMS, "iat": NOW_TS, "exp": NOW_TS + 60}).encode())
    signature = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{header}.{body}.{b64url_encode(signature)}"
    with pytest.raises(UnsupportedAlgorithmError, match="does not suit"):
        oidc.verify_jwt(token, key.public_key(), audience=AUDIENCE, issuer=ISSUER, now=NOW)
