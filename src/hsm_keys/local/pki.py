"""A private root -> intermediate -> leaf chain for a loopback HTTPS issuer."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LocalPki:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    ca_file: Path  # the root, for clients to trust
    chain_file: Path  # leaf + intermediate, what the server sends
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-keys local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None,
    now: dt.datetime,
    host: str | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        assert host is not None
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(host: str, directory: str | Path, *, now: dt.datetime | None = None) -> LocalPki:
    """Generate the chain and write the files a server and its clients need into ``directory``."""
    now = now or dt.datetime.now(dt.UTC)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(
        "hsm-keys local root CA",
        root_key,
        "hsm-keys local root CA",
        root_key,
        ca=True,
        path_length=1,
        now=now,
    )
    intermediate = _certificate(
        "hsm-keys local issuing CA",
        intermediate_key,
        "hsm-keys local root CA",
        root_key,
        ca=True,
        path_length=0,
        now=now,
    )
    leaf = _certificate(
        host,
        leaf_key,
        "hsm-keys local issuing CA",
        intermediate_key,
        ca=False,
        path_length=None,
        now=now,
        host=host,
    )
    pem = serialization.Encoding.PEM
    ca_file, chain_file, key_file = folder / "ca.pem", folder / "chain.pem", folder / "key.pem"
    ca_file.write_bytes(root.public_bytes(pem))
    chain_file.write_bytes(leaf.public_bytes(pem) + intermediate.public_bytes(pem))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return LocalPki(root, intermediate, leaf, leaf_key, ca_file, chain_file, key_file)
