"""ECDSA signature forms: JOSE / PKCS#11 raw ``r||s`` (fixed width) and X.509 / X9.62 DER.

HSMs return raw ``r||s``; certificates and most libraries want DER. The raw form is always exactly
twice the coordinate size (64 / 96 / 132 bytes): a short ``r`` or ``s`` is left-padded, never
trimmed, because JWS verifiers reject signatures of any other length.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsm_keys.encoding.ec_params import coordinate_size
from hsm_keys.errors import EncodingError
from hsm_keys.types import KeySpec

_RAW_SIZES = {64: 32, 96: 48, 132: 66}


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """DER ``Ecdsa-Sig-Value`` from a 64 / 96 / 132-byte ``r||s``."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise EncodingError(f"ECDSA signature must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    size = _RAW_SIZES.get(len(raw))
    if size is None:
        raise EncodingError(
            f"raw ECDSA signature is {len(raw)} bytes; expected 64 (P-256), 96 (P-384) or 132 (P-521)"
        )
    r = int.from_bytes(raw[:size], "big")
    s = int.from_bytes(raw[size:], "big")
    if r == 0 or s == 0:
        raise EncodingError("raw ECDSA signature has r or s equal to zero")
    return utils.encode_dss_signature(r, s)


def ecdsa_der_to_raw(der: bytes, curve_or_size: int | KeySpec | str | ec.EllipticCurve) -> bytes:
    """Fixed-width ``r||s`` from a DER signature; ``curve_or_size`` is 32/48/66, a spec, a JOSE
    curve name or a curve object."""
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise EncodingError(f"DER ECDSA signature must be bytes, got {type(der).__name__}")
    size = coordinate_size(curve_or_size)
    try:
        r, s = utils.decode_dss_signature(bytes(der))
    except ValueError as exc:
        raise EncodingError(f"malformed DER ECDSA signature: {exc}") from exc
    if r <= 0 or s <= 0:
        raise EncodingError("DER ECDSA signature has a zero or negative r or s")
    limit = 1 << (8 * size)
    if r >= limit or s >= limit:
        raise EncodingError(f"DER ECDSA signature values do not fit {size}-byte coordinates")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")
