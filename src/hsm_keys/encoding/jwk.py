"""RFC 7517 JWKs for public keys, RFC 7638 / RFC 8037 thumbprints and the RFC 9278 thumbprint URI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsm_keys.encoding.base64url import b64url_decode, b64url_encode
from hsm_keys.errors import EncodingError
from hsm_keys.types import PublicKey

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

# RFC 7638 section 3.2 / RFC 8037 section 2: the required members, per key type.
_REQUIRED_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
# RFC 7518 sections 6.2.2, 6.3.2 and 6.4.1; RFC 8037 section 2.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _uint_b64(value: int) -> str:
    """Minimal unsigned big-endian octets (RFC 7518 section 6.3.1: no leading zero octets)."""
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_key_to_jwk(public_key: PublicKey) -> dict[str, str]:
    """The public JWK members only (no ``kid``/``alg``/``use``: callers add what their document needs)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": _uint_b64(numbers.n), "e": _uint_b64(numbers.e)}
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise EncodingError(f"curve {public_key.curve.name} has no JOSE name")
        size = (public_key.curve.key_size + 7) // 8
        point = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(point.x.to_bytes(size, "big")),
            "y": b64url_encode(point.y.to_bytes(size, "big")),
        }
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    raise EncodingError(f"unsupported public key type {type(public_key).__name__}")


def _member(jwk: Mapping[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise EncodingError(f"JWK member {name!r} is missing or not a string")
    return value


def _uint_member(jwk: Mapping[str, Any], name: str) -> int:
    """RSA integers must be minimal (RFC 7518 section 6.3.1): a leading zero octet would change the
    thumbprint of the same key."""
    octets = b64url_decode(_member(jwk, name))
    if not octets or (len(octets) > 1 and octets[0] == 0):
        raise EncodingError(f"RSA JWK member {name!r} is not a minimal unsigned integer (leading zero octet)")
    return int.from_bytes(octets, "big")


# Smallest RSA modulus accepted from a JWK: RFC 7518 section 3.3 requires 2048 bits for RS*/PS*.
# (Keys this library makes are 2048, 3072 or 4096 bits.)
_RSA_MIN_BITS = 2048
_ED25519_P = 2**255 - 19


def jwk_to_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """Parse a public JWK, checking sizes and that EC points lie on their curve."""
    if not isinstance(jwk, Mapping):
        raise EncodingError(f"a JWK must be a JSON object, got {type(jwk).__name__}")
    kty = _member(jwk, "kty")
    private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
    if private:
        raise EncodingError(
            f"JWK holds private key material ({', '.join(private)}); only public JWKs are accepted"
        )
    try:
        if kty == "RSA":
            n = _uint_member(jwk, "n")
            e = _uint_member(jwk, "e")
            # cryptography accepts any odd-exponent pair; a modulus must at least be odd and big.
            if n.bit_length() < _RSA_MIN_BITS or n % 2 == 0:
                raise EncodingError(
                    f"RSA modulus of {n.bit_length()} bits is not a valid key of {_RSA_MIN_BITS} bits or more"
                )
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "EC":
            crv = _member(jwk, "crv")
            if crv not in _CURVES:
                raise EncodingError(f"unsupported EC curve {crv!r}")
            curve = _CURVES[crv]()
            size = (curve.key_size + 7) // 8
            x, y = b64url_decode(_member(jwk, "x")), b64url_decode(_member(jwk, "y"))
            if len(x) != size or len(y) != size:
                raise EncodingError(f"{crv} coordinates must be {size} bytes each")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        if kty == "OKP":
            crv = _member(jwk, "crv")
            if crv != "Ed25519":
                raise EncodingError(f"unsupported OKP curve {crv!r}")
            x = b64url_decode(_member(jwk, "x"))
            if len(x) != 32:
                raise EncodingError("Ed25519 public key must be 32 bytes")
            # RFC 8032 section 5.1.3: the encoded y coordinate must be below p (canonical).
            if int.from_bytes(x, "little") & ((1 << 255) - 1) >= _ED25519_P:
                raise EncodingError("Ed25519 public key is not canonically encoded (y >= p)")
            return ed25519.Ed25519PublicKey.from_public_bytes(x)
    except ValueError as exc:
        if isinstance(exc, EncodingError):
            raise
        raise EncodingError(f"invalid {kty} JWK: {exc}") from exc
    raise EncodingError(f"unsupported JWK key type {kty!r}")


def _canonical_members(jwk_or_key: Mapping[str, Any] | PublicKey) -> dict[str, str]:
    """The RFC 7638 members; a JWK is parsed first, so a malformed or non-minimal one is refused
    instead of hashing to a thumbprint no other implementation would compute."""
    if isinstance(jwk_or_key, Mapping):
        canonical = public_key_to_jwk(jwk_to_public_key(jwk_or_key))
        for name in _REQUIRED_MEMBERS[canonical["kty"]]:
            if jwk_or_key.get(name) != canonical[name]:
                raise EncodingError(f"JWK member {name!r} is not in its canonical form")
    else:
        canonical = public_key_to_jwk(jwk_or_key)
    return {name: canonical[name] for name in _REQUIRED_MEMBERS[canonical["kty"]]}


def jwk_thumbprint_bytes(jwk_or_key: Mapping[str, Any] | PublicKey) -> bytes:
    """Raw SHA-256 RFC 7638 thumbprint: required members, sorted, no whitespace."""
    canonical = json.dumps(_canonical_members(jwk_or_key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def jwk_thumbprint(jwk_or_key: Mapping[str, Any] | PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): our ``kid``."""
    return b64url_encode(jwk_thumbprint_bytes(jwk_or_key))


def jwk_thumbprint_uri(jwk_or_key: Mapping[str, Any] | PublicKey) -> str:
    """RFC 9278 URI form: ``urn:ietf:params:oauth:jwk-thumbprint:sha-256:<thumbprint>``."""
    return "urn:ietf:params:oauth:jwk-thumbprint:sha-256:" + jwk_thumbprint(jwk_or_key)
