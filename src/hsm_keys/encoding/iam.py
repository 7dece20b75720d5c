"""Thumbprints as IAM OIDC identity providers take them.

IAM wants the SHA-1 of the *top intermediate CA* of the chain the issuer's host serves: following
AWS's instructions (``openssl s_client -showcerts``), the last certificate the server sends. Servers
sometimes send their self-signed root as well; it is skipped, since the root is not what AWS pins.
A server that sends a lone self-signed certificate is pinned by that certificate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from hsm_keys.encoding.certificates import CertificateLike, certificate_thumbprint, load_certificate
from hsm_keys.errors import EncodingError, InvalidInputError

MAX_THUMBPRINTS = 5
"""IAM keeps at most five thumbprints per OIDC provider."""

_HEX40 = re.compile(r"[0-9a-f]{40}")


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject equals issuer and the certificate's own key verifies its signature."""
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def iam_thumbprint_certificate(chain: Sequence[CertificateLike]) -> x509.Certificate:
    """The certificate IAM pins for a served chain (leaf first)."""
    if isinstance(chain, (bytes, str, x509.Certificate)):
        raise EncodingError("pass the served chain as a sequence of certificates (leaf first)")
    certs = [load_certificate(cert) for cert in chain]
    if not certs:
        raise EncodingError("the served chain is empty; a TLS server always sends at least its leaf")
    if len(certs) > 1 and is_self_signed(certs[-1]):
        return certs[-2]
    return certs[-1]


def oidc_thumbprint(chain: Sequence[CertificateLike]) -> str:
    """SHA-1 (lowercase hex) of the top intermediate CA of the served chain, as IAM expects."""
    return certificate_thumbprint(iam_thumbprint_certificate(chain), "sha1")


def normalize_thumbprint(value: str) -> str:
    """``"AB:CD:..."`` / ``"ab cd ..."`` / ``"ABCD..."`` -> 40 lowercase hex digits."""
    if not isinstance(value, str):
        raise EncodingError(f"a thumbprint must be a string, got {type(value).__name__}")
    compact = re.sub(r"[ \t\r\n:]", "", value).lower()  # ASCII separators only
    if not _HEX40.fullmatch(compact):
        raise EncodingError(
            f"thumbprint {value!r} is not a SHA-1 digest (40 hex digits, optionally colon-separated)"
        )
    return compact


def merge_thumbprints(existing: Iterable[str], new: str | Iterable[str]) -> list[str]:
    """``existing`` followed by the ``new`` ones not already present (case-insensitively), normalised.

    Order is kept so a provider's current thumbprints stay first. More than five in total is an
    error: dropping one silently could remove the thumbprint a live issuer still needs.
    """
    if isinstance(existing, str):
        raise EncodingError("existing thumbprints must be a list of strings, not one string")
    additions = [new] if isinstance(new, str) else list(new)
    merged: list[str] = []
    for value in [*existing, *additions]:
        thumbprint = normalize_thumbprint(value)
        if thumbprint not in merged:
            merged.append(thumbprint)
    if len(merged) > MAX_THUMBPRINTS:
        raise InvalidInputError(
            f"an IAM OIDC provider holds at most {MAX_THUMBPRINTS} thumbprints; merging would give "
            f"{len(merged)} ({', '.join(merged)}); remove stale ones first"
        )
    return merged
