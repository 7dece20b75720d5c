"""Certificate digests (thumbprints, x5c, x5t, x5t#S256) and IAM's OIDC thumbprint rules.

Digests are checked against ``openssl x509 -fingerprint``, not only against hashlib.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import subprocess
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsm_keys.encoding import (
    b64url_decode,
    certificate_thumbprint,
    iam_thumbprint_certificate,
    is_self_signed,
    load_certificate,
    load_certificates,
    merge_thumbprints,
    normalize_thumbprint,
    oidc_thumbprint,
    x5c,
    x5t,
    x5t_s256,
)
from hsm_keys.errors import EncodingError, InvalidInputError

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass
class Chain:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def chain() -> Chain:
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Test Root", root_key, "Test Root", root_key, ca=True)
    inter = _cert("Test Intermediate", inter_key, "Test Root", root_key, ca=True)
    leaf = _cert("idp.example.test", leaf_key, "Test Intermediate", inter_key, ca=False)
    return Chain(root, inter, leaf, root_key)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _openssl_fingerprint(cert: x509.Certificate, digest: str) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", f"-{digest}"],
        input=_pem(cert),
        capture_output=True,
        check=True,
    ).stdout.decode()
    return out.strip().split("=", 1)[1]  # "sha1 Fingerprint=AB:CD:..."


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
def test_thumbprints_match_openssl_in_every_input_form(chain: Chain, digest: str) -> None:
    expected = _openssl_fingerprint(chain.leaf, digest).replace(":", "").lower()
    for form in (chain.leaf, _der(chain.leaf), _pem(chain.leaf), _pem(chain.leaf).decode()):
        assert certificate_thumbprint(form, digest) == expected  # type: ignore[arg-type]


def test_thumbprint_defaults_to_sha1_and_refuses_other_digests(chain: Chain) -> None:
    assert certificate_thumbprint(chain.leaf) == hashlib.sha1(_der(chain.leaf)).hexdigest()
    with pytest.raises(EncodingError, match="sha1"):
        certificate_thumbprint(chain.leaf, "md5")  # type: ignore[arg-type]


def test_x5t_and_x5t_s256_are_base64url_raw_digests(chain: Chain) -> None:
    sha1 = bytes.fromhex(_openssl_fingerprint(chain.leaf, "sha1").replace(":", ""))
    sha256 = bytes.fromhex(_openssl_fingerprint(chain.leaf, "sha256").replace(":", ""))
    assert b64url_decode(x5t(chain.leaf)) == sha1
    assert b64url_decode(x5t_s256(_pem(chain.leaf))) == sha256
    assert "=" not in x5t(chain.leaf) + x5t_s256(chain.leaf)


def test_x5c_is_padded_standard_base64_leaf_first(chain: Chain) -> None:
    values = x5c([chain.leaf, _der(chain.intermediate), _pem(chain.root)])
    assert [base64.b64decode(v, validate=True) for v in values] == [
        _der(chain.leaf),
        _der(chain.intermediate),
        _der(chain.root),
    ]
    assert all(len(v) % 4 == 0 for v in values)
    with pytest.raises(EncodingError, match="sequence"):
        x5c(chain.leaf)  # type: ignore[arg-type]
    with pytest.raises(EncodingError, match="at least one"):
        x5c([])


def test_loading_bundles_and_rejecting_garbage(chain: Chain) -> None:
    bundle = _pem(chain.leaf) + b"\n" + _pem(chain.intermediate)
    assert [_der(c) for c in load_certificates(bundle)] == [_der(chain.leaf), _der(chain.intermediate)]
    with pytest.raises(EncodingError, match="one certificate, found 2"):
        load_certificate(bundle)
    with pytest.raises(EncodingError, match="could not parse"):
        load_certificate(b"not a certificate")
    with pytest.raises(EncodingError, match="expected a certificate"):
        load_certificate(42)  # type: ignore[arg-type]


def test_iam_thumbprint_is_the_top_intermediate_of_the_served_chain(chain: Chain) -> None:
    intermediate = certificate_thumbprint(chain.intermediate)
    assert oidc_thumbprint([chain.leaf, chain.intermediate]) == intermediate
    # A server that also sends its self-signed root: the root is skipped.
    assert oidc_thumbprint([chain.leaf, chain.intermediate, chain.root]) == intermediate
    assert oidc_thumbprint([chain.leaf, chain.intermediate]) != certificate_thumbprint(chain.leaf)


def test_a_lone_certificate_is_its_own_thumbprint(chain: Chain) -> None:
    assert oidc_thumbprint([chain.root]) == certificate_thumbprint(chain.root)
    assert oidc_thumbprint([chain.leaf]) == certificate_thumbprint(chain.leaf)


def test_a_last_certificate_that_only_looks_self_signed_is_kept(chain: Chain) -> None:
    # Subject equals issuer, but signed by another key: not self-signed, so it is the top CA sent.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _cert("Lookalike", impostor_key, "Lookalike", chain.root_key, ca=True)
    assert not is_self_signed(impostor)
    assert is_self_signed(chain.root)
    assert iam_thumbprint_certificate([chain.leaf, impostor]) == impostor
    # A cross-signed CA (issuer differs) sent last is likewise the one pinned.
    cross = _cert("Cross CA", impostor_key, "Other Root", chain.root_key, ca=True)
    assert oidc_thumbprint([chain.leaf, chain.intermediate, cross]) == certificate_thumbprint(cross)


def test_an_empty_or_single_argument_chain_is_rejected(chain: Chain) -> None:
    with pytest.raises(EncodingError, match="empty"):
        oidc_thumbprint([])
    with pytest.raises(EncodingError, match="sequence"):
        oidc_thumbprint(chain.leaf)  # type: ignore[arg-type]


def test_normalize_thumbprint() -> None:
    digest = "9E99A48A9960B14926BB7F3B02E22DA2B0AB7280"
    colons = ":".join(digest[i : i + 2] for i in range(0, 40, 2))
    assert normalize_thumbprint(colons) == digest.lower()
    assert normalize_thumbprint(f"  {digest.lower()}\n") == digest.lower()
    assert normalize_thumbprint(colons.replace(":", " ")) == digest.lower()
    # Only ASCII separators: a no-break space or other Unicode space is not a thumbprint.
    for odd in ("\u00a0", "\u2003", "\u3000"):
        with pytest.raises(EncodingError):
            normalize_thumbprint(colons.replace(":", odd))
    for bad in ("", digest[:-1], digest + "00", "zz" * 20, hashlib.sha256(b"x").hexdigest()):
        with pytest.raises(EncodingError, match="40 hex"):
            normalize_thumbprint(bad)
    with pytest.raises(EncodingError):
        normalize_thumbprint(None)  # type: ignore[arg-type]


def _digests(count: int) -> list[str]:
    return [hashlib.sha1(bytes([i])).hexdigest() for i in range(count)]


def test_merge_thumbprints_deduplicates_case_insensitively_and_keeps_order() -> None:
    a, b, c = _digests(3)
    assert merge_thumbprints([a, b], c.upper()) == [a, b, c]
    assert merge_thumbprints([a.upper(), b], [b.upper(), a, c]) == [a, b, c]
    assert merge_thumbprints([], [a, a]) == [a]


def test_merge_thumbprints_refuses_more_than_five() -> None:
    five = _digests(6)
    assert merge_thumbprints(five[:4], five[4]) == five[:5]
    assert merge_thumbprints(five[:5], five[0].upper()) == five[:5]
    with pytest.raises(InvalidInputError, match="at most 5"):
        merge_thumbprints(five[:5], five[5])
    with pytest.raises(EncodingError, match="list"):
        merge_thumbprints(five[0], five[1])  # type: ignore[arg-type]
