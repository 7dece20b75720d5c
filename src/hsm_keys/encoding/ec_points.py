"""Public keys from the attributes a PKCS#11 token returns (``CKA_EC_POINT``, ``CKA_MODULUS`` ...).

PKCS#11 says ``CKA_EC_POINT`` is a DER OCTET STRING around an X9.62 point, but tokens differ: some
return the bare point, P-521 needs a long-form DER length, and Ed25519 keys come as raw 32 bytes,
an OCTET STRING or a BIT STRING. Each form is recognised by its exact length and structure, so a
point of the wrong size is an error rather than a silent misreading.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm_keys.encoding._der import TAG_BIT_STRING, TAG_OCTET_STRING, read_tlv
from hsm_keys.encoding.ec_params import curve_for_spec, spec_for_curve, spec_from_ec_params
from hsm_keys.errors import EncodingError
from hsm_keys.types import KeySpec, KeyType, PublicKey

_ED25519_SIZE = 32


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise EncodingError(f"{what} must be bytes, got {type(value).__name__}")


def _is_x962_point(data: bytes, size: int) -> bool:
    if len(data) == 1 + 2 * size:
        return data[0] == 0x04
    if len(data) == 1 + size:
        return data[0] in (0x02, 0x03)
    return False


def _unwrap(data: bytes, tag: int) -> bytes | None:
    """Contents of ``data`` if it is exactly one DER element with ``tag``; None otherwise."""
    if not data or data[0] != tag:
        return None
    try:
        found, contents, rest = read_tlv(data, "EC point")
    except EncodingError:
        return None
    return contents if found == tag and not rest else None


def ec_point_bytes(point: bytes, spec: KeySpec) -> bytes:
    """The X9.62 point (``04||x||y``, or compressed ``02``/``03||x``) inside any token encoding."""
    data = _as_bytes(point, "EC point")
    if not isinstance(spec, KeySpec):
        raise EncodingError(f"spec must be a KeySpec, got {type(spec).__name__}")
    if spec.key_type is not KeyType.EC:
        raise EncodingError(f"{spec.value} is not a NIST P-curve key spec")
    size = spec.coordinate_size
    wrapped = _unwrap(data, TAG_OCTET_STRING)
    if wrapped is not None and _is_x962_point(wrapped, size):
        return wrapped
    if _is_x962_point(data, size):
        return data
    raise EncodingError(
        f"EC point of {len(data)} bytes is not a {spec.curve} point: expected a DER OCTET STRING "
        f"around {1 + 2 * size} (or compressed {1 + size}) bytes, or those bytes bare"
    )


def ed25519_point_bytes(point: bytes) -> bytes:
    """The 32-byte Ed25519 public key from raw bytes, an OCTET STRING or a BIT STRING."""
    data = _as_bytes(point, "Ed25519 point")
    if len(data) == _ED25519_SIZE:
        return data
    octets = _unwrap(data, TAG_OCTET_STRING)
    if octets is not None and len(octets) == _ED25519_SIZE:
        return octets
    bits = _unwrap(data, TAG_BIT_STRING)
    if bits is not None and len(bits) == _ED25519_SIZE + 1 and bits[0] == 0:
        return bits[1:]
    raise EncodingError(
        f"Ed25519 point of {len(data)} bytes: expected 32 raw bytes, an OCTET STRING or a BIT STRING of them"
    )


def public_key_from_ec_point(point: bytes, spec_or_params: KeySpec | bytes) -> PublicKey:
    """Public key from ``CKA_EC_POINT`` and either the key spec or the raw ``CKA_EC_PARAMS``."""
    if isinstance(spec_or_params, KeySpec):
        spec = spec_or_params
    else:
        spec = spec_from_ec_params(_as_bytes(spec_or_params, "EC params"))
    if spec is KeySpec.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(ed25519_point_bytes(point))
    encoded = ec_point_bytes(point, spec)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve_for_spec(spec), encoded)
    except ValueError as exc:
        raise EncodingError(f"EC point is not on {spec.curve}: {exc}") from exc


def rsa_public_key_from_attributes(modulus: bytes | int, public_exponent: bytes | int) -> rsa.RSAPublicKey:
    """Public key from ``CKA_MODULUS`` / ``CKA_PUBLIC_EXPONENT`` (unsigned big-endian bytes or ints)."""
    n = modulus if isinstance(modulus, int) else int.from_bytes(_as_bytes(modulus, "modulus"), "big")
    e = (
        public_exponent
        if isinstance(public_exponent, int)
        else int.from_bytes(_as_bytes(public_exponent, "public exponent"), "big")
    )
    if n <= 0 or e <= 0:
        raise EncodingError("RSA modulus and public exponent must be positive")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise EncodingError(f"invalid RSA public key attributes: {exc}") from exc


def spec_of_public_key(public_key: PublicKey) -> KeySpec:
    """The key spec a public key belongs to (RSA sizes 2048/3072/4096 only)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeySpec.ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return spec_for_curve(public_key.curve)
    if isinstance(public_key, rsa.RSAPublicKey):
        for spec in (KeySpec.RSA_2048, KeySpec.RSA_3072, KeySpec.RSA_4096):
            if spec.size == public_key.key_size:
                return spec
        raise EncodingError(f"RSA key of {public_key.key_size} bits matches no supported key spec")
    raise EncodingError(f"unsupported public key type {type(public_key).__name__}")
