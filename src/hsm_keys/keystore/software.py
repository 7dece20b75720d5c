"""JOSE-form signing and verification in software with ``cryptography``.

The memory backend signs with this, and ``verify=True`` batches check HSM output with it: a second,
independent computation path guards against faulty HSM results.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from hsm_keys.errors import UnsupportedAlgorithmError
from hsm_keys.types import Padding, PublicKey, SignatureAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_algorithm(alg: SignatureAlgorithm) -> hashes.HashAlgorithm:
    if alg.hash_name is None:
        raise UnsupportedAlgorithmError(f"{alg.value} has no separate hash")
    return _HASHES[alg.hash_name]()


def pss_padding(alg: SignatureAlgorithm) -> padding.PSS:
    """RFC 7518 section 3.5: MGF1 with the same hash, salt as long as the hash output."""
    return padding.PSS(mgf=padding.MGF1(hash_algorithm(alg)), salt_length=alg.hash_size)


def software_sign(private_key: PrivateKey, message: bytes, alg: SignatureAlgorithm) -> bytes:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(message)
    if isinstance(private_key, rsa.RSAPrivateKey):
        pad = pss_padding(alg) if alg.padding is Padding.PSS else padding.PKCS1v15()
        return private_key.sign(message, pad, hash_algorithm(alg))
    der = private_key.sign(message, ec.ECDSA(hash_algorithm(alg)))
    r, s = utils.decode_dss_signature(der)
    size = (private_key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def verify_signature(
    public_key: PublicKey, signature: bytes, message: bytes, alg: SignatureAlgorithm
) -> bool:
    """True when ``signature`` (JOSE form) is valid for ``message`` under ``alg``."""
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            if alg is not SignatureAlgorithm.EdDSA:
                return False
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            if alg.padding not in (Padding.PKCS1V15, Padding.PSS):
                return False
            pad = pss_padding(alg) if alg.padding is Padding.PSS else padding.PKCS1v15()
            public_key.verify(signature, message, pad, hash_algorithm(alg))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            size = (public_key.curve.key_size + 7) // 8
            if alg.padding is not Padding.ECDSA or len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            der = utils.encode_dss_signature(r, s)
            public_key.verify(der, message, ec.ECDSA(hash_algorithm(alg)))
        else:
            return False
    except InvalidSignature:
        return False
    return True
