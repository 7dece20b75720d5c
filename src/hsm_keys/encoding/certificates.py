"""Certificate loading and the digests JOSE and IAM use: SHA-1 / SHA-256 thumbprints, ``x5c``,
``x5t`` and ``x5t#S256`` (RFC 7515 sections 4.1.6-4.1.8).

Every digest is over the certificate's DER, whatever form it came in.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsm_keys.encoding.base64url import b64url_encode
from hsm_keys.errors import EncodingError

CertificateLike: TypeAlias = x509.Certificate | bytes | str
"""A ``cryptography`` certificate, DER bytes, or PEM text (str or bytes)."""

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def load_certificates(data: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (in order), or the single certificate of DER bytes."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    try:
        if _PEM_MARKER in raw:
            return x509.load_pem_x509_certificates(raw)
        return [x509.load_der_x509_certificate(raw)]
    except ValueError as exc:
        raise EncodingError(f"could not parse certificate data: {exc}") from exc


def load_certificate(cert: CertificateLike) -> x509.Certificate:
    """One certificate from any accepted form; a bundle of several is refused."""
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, (bytes, bytearray, memoryview, str)):
        raise EncodingError(f"expected a certificate, DER bytes or PEM text, got {type(cert).__name__}")
    certs = load_certificates(bytes(cert) if not isinstance(cert, str) else cert)
    if len(certs) != 1:
        raise EncodingError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def certificate_der(cert: CertificateLike) -> bytes:
    return load_certificate(cert).public_bytes(Encoding.DER)


def certificate_thumbprint(cert: CertificateLike, algorithm: Literal["sha1", "sha256"] = "sha1") -> str:
    """Lowercase hex digest of the DER, no colons (the form IAM's thumbprint list takes)."""
    if algorithm not in ("sha1", "sha256"):
        raise EncodingError(f"thumbprint algorithm must be 'sha1' or 'sha256', got {algorithm!r}")
    return hashlib.new(algorithm, certificate_der(cert), usedforsecurity=False).hexdigest()


def x5c(chain: Iterable[CertificateLike]) -> list[str]:
    """RFC 7517 ``x5c``: standard base64 (with padding, not base64url) of each DER, leaf first."""
    if isinstance(chain, (bytes, str, x509.Certificate)):
        raise EncodingError("x5c takes a sequence of certificates (leaf first), not a single one")
    values = [base64.b64encode(certificate_der(cert)).decode("ascii") for cert in chain]
    if not values:
        raise EncodingError("x5c needs at least one certificate")
    return values


def x5t(cert: CertificateLike) -> str:
    """RFC 7515 ``x5t``: base64url of the raw SHA-1 digest of the DER."""
    return b64url_encode(hashlib.sha1(certificate_der(cert), usedforsecurity=False).digest())


def x5t_s256(cert: CertificateLike) -> str:
    """RFC 7515 ``x5t#S256``: base64url of the raw SHA-256 digest of the DER."""
    return b64url_encode(hashlib.sha256(certificate_der(cert)).digest())
