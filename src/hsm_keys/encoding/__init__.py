"""Pure encodings (no I/O): base64url, JWK and thumbprints, ECDSA signature forms, EC points."""

from hsm_keys.encoding.base64url import b64url_decode, b64url_encode
from hsm_keys.encoding.jwk import (
    jwk_thumbprint,
    jwk_thumbprint_bytes,
    jwk_thumbprint_uri,
    jwk_to_public_key,
    public_key_to_jwk,
)

__all__ = [
    "b64url_decode",
    "b64url_encode",
    "jwk_thumbprint",
    "jwk_thumbprint_bytes",
    "jwk_thumbprint_uri",
    "jwk_to_public_key",
    "public_key_to_jwk",
]
