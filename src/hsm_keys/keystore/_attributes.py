"""Public keys from the attributes a PKCS#11 token reports for its public-key objects."""

from __future__ import annotations

from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm_keys.errors import EncodingError
from hsm_keys.types import PublicKey

_NAMED_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}
_ED25519_OID = "1.3.101.112"


def public_key_from_rsa_attributes(modulus: bytes, exponent: bytes) -> PublicKey:
    return rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")).public_key()


def _point_bytes(ec_point: bytes, size: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING by the standard; some tokens return the raw point."""
    if len(ec_point) == size:
        return ec_point
    try:
        return bytes(OctetString.load(ec_point).native)
    except ValueError as exc:
        raise EncodingError(
            f"CKA_EC_POINT of {len(ec_point)} bytes is neither raw nor an OCTET STRING"
        ) from exc


def public_key_from_ec_attributes(ec_params: bytes, ec_point: bytes) -> PublicKey:
    """EC or Ed25519 public key from CKA_EC_PARAMS (named curve) and CKA_EC_POINT."""
    params = ECDomainParameters.load(ec_params)
    if params.name != "named":
        raise EncodingError("only named-curve EC parameters are supported")
    name = params.chosen.native
    if name in ("ed25519", _ED25519_OID):
        return ed25519.Ed25519PublicKey.from_public_bytes(_point_bytes(ec_point, 32))
    curve = _NAMED_CURVES.get(name)
    if curve is None:
        raise EncodingError(f"unsupported EC curve {name!r}")
    size = 1 + 2 * ((curve.key_size + 7) // 8)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, _point_bytes(ec_point, size))
