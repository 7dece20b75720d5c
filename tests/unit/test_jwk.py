"""JWKs and thumbprints: RFC 7638 / RFC 8037 / RFC 9278 vectors, and agreement with joserfc and PyJWT."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey, OKPKey, RSAKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from hsm_keys.encoding import (
    b64url_decode,
    b64url_encode,
    jwk_thumbprint,
    jwk_thumbprint_bytes,
    jwk_thumbprint_uri,
    jwk_to_public_key,
    public_key_to_jwk,
)
from hsm_keys.errors import EncodingError
from hsm_keys.types import PublicKey

# RFC 7638 section 3.1.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 8037 appendix A.2 (public key), A.3 (thumbprint) and A.4 (an EdDSA JWS over it).
RFC8037_JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)

CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def test_rfc7638_vector() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    key = jwk_to_public_key(RFC7638_JWK)
    assert jwk_thumbprint(key) == RFC7638_THUMBPRINT
    assert public_key_to_jwk(key) == {k: RFC7638_JWK[k] for k in ("kty", "n", "e")}
    # RFC 7638 section 3.1 also spells out the hashed JSON; the digest must be of exactly that.
    canonical = '{"e":"AQAB","kty":"RSA","n":"' + RFC7638_JWK["n"] + '"}'
    assert jwk_thumbprint_bytes(RFC7638_JWK) == hashlib.sha256(canonical.encode()).digest()


def test_rfc9278_uri_of_the_rfc7638_key() -> None:
    assert (
        jwk_thumbprint_uri(RFC7638_JWK)
        == "urn:ietf:params:oauth:jwk-thumbprint:sha-256:" + RFC7638_THUMBPRINT
    )


def test_rfc8037_vector_and_signature() -> None:
    assert jwk_thumbprint(RFC8037_JWK) == RFC8037_THUMBPRINT
    key = jwk_to_public_key(RFC8037_JWK)
    assert isinstance(key, ed25519.Ed25519PublicKey)
    assert jwk_thumbprint(key) == RFC8037_THUMBPRINT
    header, payload, signature = RFC8037_JWS.split(".")
    key.verify(b64url_decode(signature), f"{header}.{payload}".encode())
    assert b64url_decode(payload) == b"Example of Ed25519 signing"


def _ec_keys() -> st.SearchStrategy[PublicKey]:
    def derive(pair: tuple[str, int]) -> PublicKey:
        curve = CURVES[pair[0]]
        return ec.derive_private_key(pair[1], curve).public_key()

    return st.tuples(st.sampled_from(sorted(CURVES)), st.integers(1, (1 << 255) - 1)).map(derive)


def _ed_keys() -> st.SearchStrategy[PublicKey]:
    return st.binary(min_size=32, max_size=32).map(
        lambda seed: ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    )


RSA_KEYS = [rsa.generate_private_key(65537, bits).public_key() for bits in (2048, 2048, 3072)]
# A modulus whose top octet is small checks minimal (not fixed-width) encoding of n.
RSA_KEYS.append(rsa.RSAPublicNumbers(65537, (1 << 2048) + 0x1235).public_key())


def _independent_jwk(key: PublicKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(key, as_dict=True)
    return OKPAlgorithm.to_jwk(key, as_dict=True)


def _joserfc_thumbprint(jwk: dict[str, str]) -> str:
    cls = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}[jwk["kty"]]
    return str(cls.import_key(jwk).thumbprint())


def _same_key(a: PublicKey, b: PublicKey) -> bool:
    return a.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == b.public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


@settings(max_examples=60, deadline=None)
@given(st.one_of(_ec_keys(), _ed_keys(), st.sampled_from(RSA_KEYS)))
def test_jwk_round_trip_agrees_with_pyjwt_and_joserfc(key: PublicKey) -> None:
    jwk = public_key_to_jwk(key)
    independent = _independent_jwk(key)
    assert jwk == {name: independent[name] for name in jwk}
    assert _same_key(jwk_to_public_key(jwk), key)
    assert jwk_thumbprint(key) == jwk_thumbprint(jwk) == _joserfc_thumbprint(jwk)
    if jwk["kty"] == "EC":
        size = {"P-256": 32, "P-384": 48, "P-521": 66}[jwk["crv"]]
        assert len(b64url_decode(jwk["x"])) == len(b64url_decode(jwk["y"])) == size
    if jwk["kty"] == "RSA":
        assert b64url_decode(jwk["n"])[0] != 0


def test_optional_members_do_not_change_the_thumbprint() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk: dict[str, str] = {**public_key_to_jwk(key), "kid": "x", "use": "sig", "alg": "ES256"}
    assert jwk_thumbprint(jwk) == jwk_thumbprint(key)


def _p256_jwk() -> dict[str, str]:
    return public_key_to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda j: j.update(d="AAAA"), "private"),
        (lambda j: j.update(crv="P-224"), "curve"),
        (lambda j: j.update(kty="oct"), "key type"),
        (lambda j: j.pop("y"), "'y'"),
        (lambda j: j.update(x=j["x"][:-3]), "32 bytes"),
        (lambda j: j.update(y=b64url_encode(b"\x01" * 32)), "invalid EC"),
        (lambda j: j.update(x=j["x"] + "="), "padding"),
        (lambda j: j.update(x=1), "'x'"),
    ],
)
def test_malformed_ec_jwks_are_rejected(mutate: Any, message: str) -> None:
    jwk: dict[str, Any] = _p256_jwk()
    mutate(jwk)
    with pytest.raises(EncodingError, match=message):
        jwk_to_public_key(jwk)
    with pytest.raises(EncodingError):
        jwk_thumbprint(jwk)


def test_rsa_members_with_leading_zero_octets_are_rejected() -> None:
    padded = dict(RFC7638_JWK, n=b64url_encode(b"\x00" + b64url_decode(RFC7638_JWK["n"])))
    with pytest.raises(EncodingError, match="minimal"):
        jwk_to_public_key(padded)
    with pytest.raises(EncodingError, match="minimal"):
        jwk_thumbprint(padded)


@pytest.mark.parametrize(
    "n",
    [
        b"\x01\x00\x02",  # 17 bits
        (2**1023 + 1).to_bytes(128, "big"),  # 1024 bits: below RFC 7518's 2048
        b64url_decode(RFC7638_JWK["n"])[:-1] + b"\x02",  # 2048 bits but even
    ],
)
def test_rsa_moduli_that_are_too_small_or_even_are_rejected(n: bytes) -> None:
    with pytest.raises(EncodingError, match="modulus"):
        jwk_to_public_key(dict(RFC7638_JWK, n=b64url_encode(n)))


def test_non_canonical_ed25519_points_are_rejected() -> None:
    # y = p (all but the sign bit of 0xff..ff 7f is >= 2**255 - 19): a second encoding of y = 0.
    non_canonical = (2**255 - 19).to_bytes(32, "little")
    with pytest.raises(EncodingError, match="canonical"):
        jwk_to_public_key(dict(RFC8037_JWK, x=b64url_encode(non_canonical)))
    with pytest.raises(EncodingError, match="canonical"):
        jwk_to_public_key(dict(RFC8037_JWK, x=b64url_encode(b"\xff" * 32)))


def test_private_rsa_members_are_rejected() -> None:
    with pytest.raises(EncodingError, match="dp, p"):
        jwk_to_public_key(dict(RFC7638_JWK, p="AQAB", dp="AQAB"))


def test_ed25519_jwk_of_the_wrong_size_or_curve() -> None:
    with pytest.raises(EncodingError, match="32 bytes"):
        jwk_to_public_key(dict(RFC8037_JWK, x=b64url_encode(b"\x01" * 31)))
    with pytest.raises(EncodingError, match="X25519"):
        jwk_to_public_key(dict(RFC8037_JWK, crv="X25519"))


def test_a_jwk_must_be_an_object() -> None:
    with pytest.raises(EncodingError, match="JSON object"):
        jwk_to_public_key(json.dumps(RFC8037_JWK))  # type: ignore[arg-type]


def test_keys_of_unsupported_curves_have_no_jwk() -> None:
    with pytest.raises(EncodingError, match="secp256k1"):
        public_key_to_jwk(ec.generate_private_key(ec.SECP256K1()).public_key())
