"""JWKS and discovery documents as STS reads them, and the issuer URL rules."""

from __future__ import annotations

import base64
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc.jwk import KeySet

from hsm_keys import oidc
from hsm_keys.encoding import jwk_thumbprint
from hsm_keys.errors import EncodingError, InvalidInputError, UnsupportedAlgorithmError
from hsm_keys.keystore import KeyStore
from hsm_keys.types import Binding, KeySpec
from hsm_keys.x509 import self_signed_certificate

ACCOUNT = "123456789012"
ISSUER = "https://idp.example.test/123456789012/alice"
JWKS_URI = ISSUER + "/jwks.json"


def test_jwks_of_store_keys_is_read_by_pyjwt_and_joserfc(store: KeyStore) -> None:
    rsa_key = store.generate(KeySpec.RSA_2048, Binding("alice", ACCOUNT))
    ec_key = store.generate(KeySpec.EC_P384, Binding("bob", ACCOUNT))
    document = oidc.jwks([rsa_key, ec_key])
    assert [entry["kid"] for entry in document["keys"]] == [rsa_key.kid, ec_key.kid]
    assert [entry["alg"] for entry in document["keys"]] == ["RS256", "ES384"]
    assert all(entry["use"] == "sig" for entry in document["keys"])
    assert all(jwk_thumbprint(entry) == entry["kid"] for entry in document["keys"])
    assert set(document["keys"][0]) == {"kty", "n", "e", "kid", "use", "alg"}
    assert set(document["keys"][1]) == {"kty", "crv", "x", "y", "kid", "use", "alg"}

    parsed = pyjwt.PyJWKSet.from_dict(document)
    assert {key.key_id for key in parsed.keys} == {rsa_key.kid, ec_key.kid}
    keyset = KeySet.import_key_set(document)
    assert {key.kid for key in keyset.keys} == {rsa_key.kid, ec_key.kid}


def test_jwks_algorithm_override_must_suit_every_key(store: KeyStore) -> None:
    info = store.generate(KeySpec.RSA_2048, Binding("alice", ACCOUNT))
    assert oidc.jwks([info], alg="PS512")["keys"][0]["alg"] == "PS512"
    with pytest.raises(UnsupportedAlgorithmError):
        oidc.jwks([info], alg="ES256")


def test_jwks_accepts_public_keys_and_ready_entries() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    entry = oidc.public_jwk(ed, kid="next")
    document = oidc.jwks([public, entry])
    assert document["keys"][0]["kid"] == jwk_thumbprint(public)
    assert document["keys"][0]["alg"] == "ES256"
    assert document["keys"][1] == {**entry, "kid": "next"}
    assert document["keys"][1]["alg"] == "EdDSA"
    assert oidc.jwks([]) == {"keys": []}


def test_jwks_refuses_duplicate_kids_private_members_and_missing_kids() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidInputError, match="more than once"):
        oidc.jwks([public, public])
    entry: dict[str, Any] = oidc.public_jwk(public)
    with pytest.raises(EncodingError, match="private"):
        oidc.jwks([{**entry, "d": "AAAA"}])
    with pytest.raises(InvalidInputError, match="kid"):
        oidc.jwks([{k: v for k, v in entry.items() if k != "kid"}])


def test_x5c_entries_carry_the_certificate_of_the_same_key(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    cert = self_signed_certificate(store, info.kid, "alice", days=1)
    entry = oidc.public_jwk(info, certificates=[cert])
    assert base64.b64decode(entry["x5c"][0]) == cert.public_bytes(Encoding.DER)
    assert entry["kid"] == info.kid
    assert oidc.certificate_jwk(cert) == {**entry, "kid": jwk_thumbprint(info.public_key)}
    assert pyjwt.PyJWK(entry).key_id == info.kid
    other = store.generate(KeySpec.EC_P256, Binding("bob", ACCOUNT))
    with pytest.raises(InvalidInputError, match="certify the key"):
        oidc.public_jwk(other, certificates=[cert])


def test_discovery_document_has_what_sts_reads() -> None:
    document = oidc.discovery_document(ISSUER, JWKS_URI, ["RS256", "ES256", "rs256"])
    assert document == {
        "issuer": ISSUER,
        "jwks_uri": JWKS_URI,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "claims_supported": ["aud", "exp", "iat", "iss", "jti", "nbf", "sub"],
    }
    assert oidc.discovery_document(ISSUER, JWKS_URI, "ES384")["id_token_signing_alg_values_supported"] == [
        "ES384"
    ]


@pytest.mark.parametrize(
    ("issuer", "jwks_uri", "algorithms", "error"),
    [
        ("http://idp.example.test", JWKS_URI, ["RS256"], InvalidInputError),
        (ISSUER, "http://idp.example.test/jwks.json", ["RS256"], InvalidInputError),
        (ISSUER, "https:///jwks.json", ["RS256"], InvalidInputError),
        (ISSUER, JWKS_URI + "#keys", ["RS256"], InvalidInputError),
        (ISSUER, JWKS_URI, [], InvalidInputError),
        (ISSUER, JWKS_URI, ["HS256"], UnsupportedAlgorithmError),
    ],
)
def test_discovery_document_refuses_bad_input(
    issuer: str, jwks_uri: str, algorithms: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        oidc.discovery_document(issuer, jwks_uri, algorithms)


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example.test",
        "https://idp.example.test/123456789012/alice",
        "https://idp.example.test/0/a+b=c,d.e@f_g-h",
        "https://xn--idp-example.test/x",
        "https://" + "a" * 63 + ".example/" + "b" * 100,
    ],
)
def test_valid_issuer_urls(url: str) -> None:
    assert oidc.validate_issuer_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://idp.example.test", "https"),
        ("HTTPS://idp.example.test", "https"),
        ("idp.example.test", "https"),
        ("https://", "no host"),
        ("https://idp.example.test:443", "port"),
        ("https://idp.example.test:8443/x", "port"),
        ("https://[::1]/x", "port"),
        ("https://user@idp.example.test", "user"),
        ("https://idp.example.test/x?y=1", "query"),
        ("https://idp.example.test/x?", "query"),
        ("https://idp.example.test/x#f", "fragment"),
        ("https://idp.example.test/", "slash"),
        ("https://idp.example.test/x/", "slash"),
        ("https://IdP.example.test/x", "lowercase"),
        ("https://idp..test/x", "host"),
        ("https://-idp.example.test", "host"),
        ("https://idp_1.example.test", "host"),
        ("https://idp.example.test//x", "segment"),
        ("https://idp.example.test/./x", "segment"),
        ("https://idp.example.test/a/../b", "segment"),
        ("https://idp.example.test/a%2Fb", "segment"),
        ("https://idp.example.test/a b", "whitespace"),
        ("https://localhost/x", "fully qualified"),
        ("https://1.2.3.4/x", "fully qualified"),
        ("https://2130706433/x", "fully qualified"),
        ("https://0x7f000001/x", "fully qualified"),
        ("https://idp.example.test/\u00e9", "ASCII"),
        ("https://idp.example.test/" + "x" * 250, "255"),
        (None, "string"),
    ],
)
def test_invalid_issuer_urls(url: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        oidc.validate_issuer_url(url)
