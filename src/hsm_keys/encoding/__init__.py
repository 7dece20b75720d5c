"""Pure encodings (no I/O): base64url, JWK and thumbprints, ECDSA signature forms, EC points and
params from PKCS#11 attributes, certificate digests and IAM OIDC thumbprints."""

from __future__ import annotations

from hsm_keys.encoding.base64url import b64url_decode, b64url_encode
from hsm_keys.encoding.certificates import (
    CertificateLike,
    certificate_der,
    certificate_thumbprint,
    load_certificate,
    load_certificates,
    x5c,
    x5t,
    x5t_s256,
)
from hsm_keys.encoding.ec_params import (
    coordinate_size,
    curve_for_spec,
    ec_params_for_spec,
    spec_for_curve,
    spec_from_ec_params,
)
from hsm_keys.encoding.ec_points import (
    ec_point_bytes,
    ed25519_point_bytes,
    public_key_from_ec_point,
    rsa_public_key_from_attributes,
    spec_of_public_key,
)
from hsm_keys.encoding.ecdsa import ecdsa_der_to_raw, ecdsa_raw_to_der
from hsm_keys.encoding.iam import (
    MAX_THUMBPRINTS,
    iam_thumbprint_certificate,
    is_self_signed,
    merge_thumbprints,
    normalize_thumbprint,
    oidc_thumbprint,
)
from hsm_keys.encoding.jwk import (
    jwk_thumbprint,
    jwk_thumbprint_bytes,
    jwk_thumbprint_uri,
    jwk_to_public_key,
    public_key_to_jwk,
)

__all__ = [
    "MAX_THUMBPRINTS",
    "CertificateLike",
    "b64url_decode",
    "b64url_encode",
    "certificate_der",
    "certificate_thumbprint",
    "coordinate_size",
    "curve_for_spec",
    "ec_params_for_spec",
    "ec_point_bytes",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "ed25519_point_bytes",
    "iam_thumbprint_certificate",
    "is_self_signed",
    "jwk_thumbprint",
    "jwk_thumbprint_bytes",
    "jwk_thumbprint_uri",
    "jwk_to_public_key",
    "load_certificate",
    "load_certificates",
    "merge_thumbprints",
    "normalize_thumbprint",
    "oidc_thumbprint",
    "public_key_from_ec_point",
    "public_key_to_jwk",
    "rsa_public_key_from_attributes",
    "spec_for_curve",
    "spec_from_ec_params",
    "spec_of_public_key",
    "x5c",
    "x5t",
    "x5t_s256",
]
