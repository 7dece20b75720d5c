"""Self-signed certificates for store keys, on every backend: verified by cryptography, parsed and
verified by openssl, and compared with what cryptography's own builder emits for the same algorithm."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from hsm_keys.errors import (
    InvalidInputError,
    KeyNotFoundError,
    SigningError,
    UnsupportedAlgorithmError,
)
from hsm_keys.keystore import KeyStore
from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm
from hsm_keys.x509 import self_signed_certificate

ACCOUNT = "123456789012"
NOW = dt.datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)

CASES = [
    (KeySpec.RSA_2048, None),
    (KeySpec.RSA_2048, "RS384"),
    (KeySpec.RSA_2048, "RS512"),
    (KeySpec.RSA_2048, "PS256"),
    (KeySpec.RSA_2048, "PS384"),
    (KeySpec.RSA_2048, "PS512"),
    (KeySpec.EC_P256, None),
    (KeySpec.EC_P384, None),
    (KeySpec.EC_P521, None),
    (KeySpec.ED25519, None),
]
OPENSSL_NAMES = {
    "RS256": "sha256WithRSAEncryption",
    "RS384": "sha384WithRSAEncryption",
    "RS512": "sha512WithRSAEncryption",
    "PS256": "rsassaPss",
    "PS384": "rsassaPss",
    "PS512": "rsassaPss",
    "ES256": "ecdsa-with-SHA256",
    "ES384": "ecdsa-with-SHA384",
    "ES512": "ecdsa-with-SHA512",
    "EdDSA": "ED25519",
}
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _reference_algorithm_identifier(spec: KeySpec, alg: SignatureAlgorithm) -> bytes:
    """The AlgorithmIdentifier cryptography's own builder writes for a software key of this kind."""
    key: Any
    if spec is KeySpec.ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    elif spec.curve:
        key = ec.generate_private_key(
            {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}[spec.curve]()
        )
    else:
        key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reference")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    digest = HASHES[alg.hash_name]() if alg.hash_name else None
    pss = (
        padding.PSS(mgf=padding.MGF1(digest), salt_length=alg.hash_size)
        if alg.value.startswith("PS")
        else None
    )
    cert = builder.sign(key, digest, rsa_padding=pss) if pss else builder.sign(key, digest)
    return bytes(asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["signature_algorithm"].dump())


def _openssl(args: list[str], cert: x509.Certificate, tmp_path: Path) -> str:
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    result = subprocess.run(
        ["openssl", *[str(path) if a == "{cert}" else a for a in args]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("spec", "alg_name"), CASES, ids=[f"{s.value}-{a or 'default'}" for s, a in CASES])
def test_certificate_for_every_key_kind(
    store: KeyStore, spec: KeySpec, alg_name: str | None, tmp_path: Path
) -> None:
    info = store.generate(spec, Binding("cert", ACCOUNT))
    alg = SignatureAlgorithm.parse(alg_name) if alg_name else SignatureAlgorithm.default_for(spec)
    cert = self_signed_certificate(store, info.kid, "hsm-keys test", days=30, now=NOW, alg=alg_name)

    cert.verify_directly_issued_by(cert)  # cryptography checks the store's signature over the TBS
    spki = PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(Encoding.DER, spki) == info.public_key.public_bytes(
        Encoding.DER, spki
    )
    assert cert.version is x509.Version.v3
    assert 0 < cert.serial_number < 1 << 159
    assert cert.not_valid_before_utc == NOW.replace(microsecond=0)
    assert cert.not_valid_after_utc == NOW.replace(microsecond=0) + dt.timedelta(days=30)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hsm-keys test"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        ski.digest == aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(info.public_key).digest
    )

    parsed = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    outer = bytes(parsed["signature_algorithm"].dump())
    assert outer == bytes(parsed["tbs_certificate"]["signature"].dump())
    assert outer == _reference_algorithm_identifier(spec, alg)
    if alg.value.startswith("ES"):
        r, s = utils.decode_dss_signature(cert.signature)  # DER in the certificate, not raw r||s
        assert r > 0 and s > 0
    if alg is SignatureAlgorithm.EdDSA:
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ED25519
        assert cert.signature_algorithm_parameters is None

    text = _openssl(["x509", "-in", "{cert}", "-noout", "-text"], cert, tmp_path)
    assert text.count(f"Signature Algorithm: {OPENSSL_NAMES[alg.value]}") == 2
    assert "CN = hsm-keys test" in text
    if alg.value.startswith("PS"):
        assert text.count(f"Salt Length: 0x{alg.hash_size:02X}") == 2
        assert f"Mask Algorithm: mgf1 with {alg.hash_name}" in text
    at = str(int(NOW.timestamp()) + 3600)
    verified = _openssl(
        ["verify", "-attime", at, "-check_ss_sig", "-CAfile", "{cert}", "{cert}"], cert, tmp_path
    )
    assert verified.strip().endswith(": OK")


def test_the_signature_comes_from_the_store_and_no_software_key_is_made(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("spy", ACCOUNT))
    signed: list[bytes] = []
    original = store.sign

    def spy(kid: str, message: bytes, alg: Any, **kwargs: Any) -> bytes:
        signed.append(message)
        return original(kid, message, alg, **kwargs)

    def no_software_keys(*args: object, **kwargs: object) -> None:
        raise AssertionError("a software key was generated")

    monkeypatch.setattr(store, "sign", spy)
    monkeypatch.setattr(ec, "generate_private_key", no_software_keys)
    monkeypatch.setattr(rsa, "generate_private_key", no_software_keys)
    monkeypatch.setattr(ed25519.Ed25519PrivateKey, "generate", no_software_keys)
    cert = self_signed_certificate(store, info.kid, "spy", days=1)
    assert signed == [cert.tbs_certificate_bytes]


def test_a_signature_that_does_not_verify_is_refused(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("faulty", ACCOUNT))
    monkeypatch.setattr(
        store, "_sign_batch", lambda info, messages, alg, workers: [b"\x01" * 64 for _ in messages]
    )
    with pytest.raises(SigningError, match="does not verify"):
        self_signed_certificate(store, info.kid, "faulty", days=1)


def test_name_serial_and_clock_as_given(store: KeyStore) -> None:
    info = store.generate(KeySpec.ED25519, Binding("named", ACCOUNT))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "k1"),
        ]
    )
    for serial in (1, (1 << 159) - 1):
        cert = self_signed_certificate(store, info.kid, subject, days=1, serial=serial, now=lambda: NOW)
        assert cert.serial_number == serial
        assert cert.subject == cert.issuer == subject
        assert cert.not_valid_before_utc == NOW.replace(microsecond=0)


def test_random_serials_are_positive_20_octet_values(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("serials", ACCOUNT))
    serials = {self_signed_certificate(store, info.kid, "s", days=1).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all((1 << 158) <= s < (1 << 159) for s in serials)


def test_dates_from_2050_are_generalized_time(store: KeyStore, tmp_path: Path) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("late", ACCOUNT))
    start = dt.datetime(2049, 12, 1, tzinfo=dt.UTC)
    cert = self_signed_certificate(store, info.kid, "late", days=365, now=start)
    validity = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["tbs_certificate"]["validity"]
    assert validity["not_before"].name == "utc_time"
    assert validity["not_after"].name == "general_time"
    assert cert.not_valid_after_utc == start + dt.timedelta(days=365)
    assert "Not After : Dec  1 00:00:00 2050 GMT" in _openssl(
        ["x509", "-in", "{cert}", "-noout", "-text"], cert, tmp_path
    )


@pytest.mark.parametrize("serial", [0, -1, 1 << 159, True, "1"])
def test_bad_serials_are_rejected(store: KeyStore, serial: object) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("serial", ACCOUNT))
    with pytest.raises(InvalidInputError, match="serial"):
        self_signed_certificate(store, info.kid, "x", days=1, serial=serial)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "days"),
        ({"days": -5}, "days"),
        ({"days": 1.5}, "days"),
        ({"days": 10**7}, "9999"),
        ({"days": 1, "now": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"days": 1, "now": "2030-01-01"}, "datetime"),
        ({"days": 1, "subject": ""}, "empty"),
        ({"days": 1, "subject": "x" * 65}, "common name"),
        ({"days": 1, "subject": x509.Name([])}, "empty"),
        ({"days": 1, "subject": 7}, "x509.Name"),
    ],
)
def test_bad_arguments_are_rejected(store: KeyStore, kwargs: dict[str, Any], message: str) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("args", ACCOUNT))
    arguments: dict[str, Any] = {"subject": "x", **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        self_signed_certificate(store, info.kid, **arguments)


def test_algorithm_must_suit_the_key(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("alg", ACCOUNT))
    for alg in ("ES384", "RS256", "EdDSA"):
        with pytest.raises(UnsupportedAlgorithmError, match="EC_P256"):
            self_signed_certificate(store, info.kid, "x", days=1, alg=alg)
    with pytest.raises(UnsupportedAlgorithmError):
        self_signed_certificate(store, info.kid, "x", days=1, alg="HS256")


def test_unknown_kid(store: KeyStore) -> None:
    with pytest.raises(KeyNotFoundError):
        self_signed_certificate(store, "no-such-kid", "x", days=1)
