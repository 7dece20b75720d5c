"""Curve identification for PKCS#11 ``CKA_EC_PARAMS`` and JOSE curve names.

Tokens describe the curve either as a DER named-curve OID or, for Edwards curves in older PKCS#11
releases, as a DER PrintableString name (``edwards25519``). Anything else -- explicit parameters,
``implicitlyCA``, unknown OIDs, Montgomery or Ed448 curves -- is refused with a clear error so a
point is never read against the wrong curve.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from hsm_keys.encoding._der import (
    TAG_NULL,
    TAG_OID,
    TAG_PRINTABLE_STRING,
    TAG_SEQUENCE,
    TAG_UTF8_STRING,
    encode_tlv,
    oid_to_dotted,
    read_single,
)
from hsm_keys.errors import EncodingError, InvalidInputError
from hsm_keys.types import KeySpec, KeyType

# DER contents of the named-curve OIDs (RFC 5480 section 2.1.1.1, RFC 8410 section 3).
_OID_SPECS: dict[bytes, KeySpec] = {
    bytes.fromhex("2a8648ce3d030107"): KeySpec.EC_P256,  # 1.2.840.10045.3.1.7 prime256v1
    bytes.fromhex("2b81040022"): KeySpec.EC_P384,  # 1.3.132.0.34 secp384r1
    bytes.fromhex("2b81040023"): KeySpec.EC_P521,  # 1.3.132.0.35 secp521r1
    bytes.fromhex("2b6570"): KeySpec.ED25519,  # 1.3.101.112 id-Ed25519
    bytes.fromhex("2b06010401da470f01"): KeySpec.ED25519,  # 1.3.6.1.4.1.11591.15.1 (GnuPG edwards25519)
}
_SPEC_OIDS: dict[KeySpec, bytes] = {
    KeySpec.EC_P256: bytes.fromhex("2a8648ce3d030107"),
    KeySpec.EC_P384: bytes.fromhex("2b81040022"),
    KeySpec.EC_P521: bytes.fromhex("2b81040023"),
    KeySpec.ED25519: bytes.fromhex("2b6570"),
}
# Curves we know but do not sign with: named so the error says what the token holds.
_KNOWN_UNSUPPORTED_OIDS: dict[bytes, str] = {
    bytes.fromhex("2b656e"): "X25519 (a key-agreement curve)",
    bytes.fromhex("2b656f"): "X448 (a key-agreement curve)",
    bytes.fromhex("2b6571"): "Ed448",
    bytes.fromhex("2b8104000a"): "secp256k1",
}
# PrintableString curve names (PKCS#11 3.0 section 2.3.10 and names tokens are seen to use).
_NAME_SPECS: dict[str, KeySpec] = {
    "prime256v1": KeySpec.EC_P256,
    "secp256r1": KeySpec.EC_P256,
    "nistp256": KeySpec.EC_P256,
    "p-256": KeySpec.EC_P256,
    "secp384r1": KeySpec.EC_P384,
    "nistp384": KeySpec.EC_P384,
    "p-384": KeySpec.EC_P384,
    "secp521r1": KeySpec.EC_P521,
    "nistp521": KeySpec.EC_P521,
    "p-521": KeySpec.EC_P521,
    "edwards25519": KeySpec.ED25519,
    "ed25519": KeySpec.ED25519,
}

_CURVES: dict[KeySpec, type[ec.EllipticCurve]] = {
    KeySpec.EC_P256: ec.SECP256R1,
    KeySpec.EC_P384: ec.SECP384R1,
    KeySpec.EC_P521: ec.SECP521R1,
}
_CURVE_NAME_SPECS = {"secp256r1": KeySpec.EC_P256, "secp384r1": KeySpec.EC_P384, "secp521r1": KeySpec.EC_P521}


def spec_from_ec_params(params: bytes) -> KeySpec:
    """The key spec a ``CKA_EC_PARAMS`` value names (``EC_P256`` ... or ``ED25519``)."""
    if not isinstance(params, (bytes, bytearray, memoryview)):
        raise EncodingError(f"EC params must be bytes, got {type(params).__name__}")
    tag, contents = read_single(bytes(params), "EC params")
    if tag == TAG_OID:
        spec = _OID_SPECS.get(contents)
        if spec is not None:
            return spec
        dotted = oid_to_dotted(contents)
        known = _KNOWN_UNSUPPORTED_OIDS.get(contents)
        detail = f" ({known})" if known else ""
        raise EncodingError(f"EC params name curve OID {dotted}{detail}, which is not supported")
    if tag in (TAG_PRINTABLE_STRING, TAG_UTF8_STRING):
        try:
            name = contents.decode("ascii")
        except UnicodeDecodeError as exc:
            raise EncodingError("EC params curve name is not ASCII") from exc
        spec = _NAME_SPECS.get(name.strip().lower())
        if spec is None:
            raise EncodingError(f"EC params name curve {name!r}, which is not supported")
        return spec
    if tag == TAG_SEQUENCE:
        raise EncodingError("EC params hold explicit curve parameters; only named curves are supported")
    if tag == TAG_NULL:
        raise EncodingError("EC params are implicitlyCA (NULL); only named curves are supported")
    raise EncodingError(f"EC params have unexpected DER tag 0x{tag:02x}")


def ec_params_for_spec(spec: KeySpec) -> bytes:
    """DER named-curve OID to put in ``CKA_EC_PARAMS`` when generating a key of ``spec``."""
    oid = _SPEC_OIDS.get(spec)
    if oid is None:
        raise EncodingError(f"{spec.value} is not an elliptic-curve key spec")
    return encode_tlv(TAG_OID, oid)


def curve_for_spec(spec: KeySpec) -> ec.EllipticCurve:
    """The ``cryptography`` curve object of a Weierstrass EC spec."""
    curve = _CURVES.get(spec)
    if curve is None:
        raise EncodingError(f"{spec.value} is not a NIST P-curve key spec")
    return curve()


def spec_for_curve(curve: ec.EllipticCurve) -> KeySpec:
    spec = _CURVE_NAME_SPECS.get(curve.name)
    if spec is None:
        raise EncodingError(f"curve {curve.name} is not supported (P-256, P-384 and P-521 are)")
    return spec


def coordinate_size(curve_or_size: int | KeySpec | str | ec.EllipticCurve) -> int:
    """Bytes in one coordinate (half an ECDSA JOSE signature) for a size, spec, JOSE name or curve."""
    if isinstance(curve_or_size, bool):
        raise EncodingError("a coordinate size must be an integer, not a bool")
    if isinstance(curve_or_size, int):
        if curve_or_size not in (32, 48, 66):
            raise EncodingError(f"coordinate size must be 32, 48 or 66 bytes, got {curve_or_size}")
        return curve_or_size
    if isinstance(curve_or_size, ec.EllipticCurve):
        return spec_for_curve(curve_or_size).coordinate_size
    if isinstance(curve_or_size, str):
        try:
            spec = KeySpec.parse(curve_or_size)
        except InvalidInputError as exc:
            raise EncodingError(f"unknown curve {curve_or_size!r}") from exc
    else:
        spec = curve_or_size
    if not isinstance(spec, KeySpec) or spec.key_type is not KeyType.EC:
        raise EncodingError(f"{curve_or_size!r} is not a NIST P-curve")
    return spec.coordinate_size
