"""The issuer side of OIDC for HSM keys: JWTs signed by a key store, JWKS and discovery documents.

STS ``AssumeRoleWithWebIdentity`` fetches ``<issuer>/.well-known/openid-configuration``, follows its
``jwks_uri``, picks the key by the token's ``kid`` and checks ``iss``/``aud``/``sub``/``exp``. So the
token header always names its ``kid``, the JWKS entries carry ``kid``/``use``/``alg``, and the issuer
URL is held to what IAM accepts as a provider URL (``validate_issuer_url``).

Design choices:

* ``iat``, ``exp``, ``nbf`` and ``jti`` belong to ``mint_jwt``: callers that pass them get an error
  instead of a silent override (or a token that outlives its ``ttl``). The clock is injectable and
  ``iat`` is rounded *down*, so a token is never issued in the future.
* Every signature is checked against the public key before the token is returned (``verify=True``
  by default): a faulty HSM result fails here, not later inside STS with an opaque error.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import secrets
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsm_keys.encoding.base64url import b64url_decode, b64url_encode
from hsm_keys.encoding.certificates import CertificateLike, load_certificate, x5c, x5t_s256
from hsm_keys.encoding.ec_points import spec_of_public_key
from hsm_keys.encoding.jwk import jwk_thumbprint, jwk_to_public_key, public_key_to_jwk
from hsm_keys.errors import EncodingError, InvalidInputError, InvalidTokenError, UnsupportedAlgorithmError
from hsm_keys.keystore.base import KeyStore
from hsm_keys.keystore.software import verify_signature
from hsm_keys.types import KeyInfo, KeyType, PublicKey, SignatureAlgorithm
from hsm_keys.x509 import Clock, resolve_now

RESERVED_CLAIMS = frozenset({"iat", "exp", "nbf", "jti"})
"""Claims ``mint_jwt`` sets itself and refuses from callers."""

DEFAULT_CLAIMS_SUPPORTED = ("aud", "exp", "iat", "iss", "jti", "nbf", "sub")
MAX_ISSUER_LENGTH = 255
"""IAM's limit on an OIDC provider URL."""

_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# RFC 3986 pchar without percent-encoding: an issuer is compared byte for byte by STS, and two
# spellings of one path would be two different issuers.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


# -- tokens ------------------------------------------------------------------------------------------


def _json(value: Mapping[str, Any], what: str) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} cannot be encoded as JSON: {exc}") from exc
    except RecursionError:
        raise InvalidInputError(f"{what} nest too deeply to be encoded as JSON") from None


# Longest token lifetime mint_jwt accepts. Tokens for STS live minutes; a year is already absurd
# but still a valid date, unlike the overflowing timestamps an unbounded ttl produces.
MAX_TTL_SECONDS = 366 * 24 * 3600


def _ttl_seconds(ttl: int | dt.timedelta) -> int:
    if isinstance(ttl, dt.timedelta):
        seconds = math.floor(ttl.total_seconds())
    elif isinstance(ttl, int) and not isinstance(ttl, bool):
        seconds = ttl
    else:
        raise InvalidInputError(f"ttl must be whole seconds (int) or a timedelta, got {type(ttl).__name__}")
    if seconds <= 0:
        raise InvalidInputError(f"ttl must be at least one second, got {seconds} s")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidInputError(
            f"ttl of {seconds} s is longer than a year ({MAX_TTL_SECONDS} s): "
            "a token that outlives its key's rotation cannot be revoked by rotating"
        )
    return seconds


def _check_audience(aud: Any) -> Any:
    """``aud`` stays exactly as given: a non-empty string, or a non-empty list of them."""
    if isinstance(aud, str):
        if not aud:
            raise InvalidInputError("aud must not be empty")
        return aud
    if isinstance(aud, (list, tuple)):
        if not aud or not all(isinstance(item, str) and item for item in aud):
            raise InvalidInputError("aud as a list must hold one or more non-empty strings")
        return list(aud)
    raise InvalidInputError(f"aud must be a string or a list of strings, got {type(aud).__name__}")


def mint_jwt(
    store: KeyStore,
    kid: str,
    claims: Mapping[str, Any],
    alg: SignatureAlgorithm | str | None = None,
    *,
    ttl: int | dt.timedelta,
    now: Clock | None = None,
    not_before: bool = False,
    verify: bool = True,
) -> str:
    """A compact JWS (RFC 7519 JWT) over ``claims``, signed in the store by key ``kid``.

    Header: ``alg``, ``typ: JWT``, ``kid``. Added claims: integer ``iat`` (now, rounded down),
    ``exp`` (``iat + ttl``), ``nbf`` (= ``iat``) when ``not_before`` is set, and a random ``jti``.
    ``alg`` defaults to the key's default algorithm and must suit its key spec.
    """
    if not isinstance(claims, Mapping):
        raise InvalidInputError(f"claims must be a mapping, got {type(claims).__name__}")
    if not all(isinstance(name, str) for name in claims):
        raise InvalidInputError("claim names must be strings")
    reserved = sorted(RESERVED_CLAIMS.intersection(claims))
    if reserved:
        raise InvalidInputError(
            f"claims may not set {', '.join(reserved)}: "
            "mint_jwt sets them from its clock, its ttl and a random jti"
        )
    seconds = _ttl_seconds(ttl)
    issued_at = math.floor(resolve_now(now).timestamp())
    info = store.get(kid)
    algorithm = info.default_algorithm if alg is None else SignatureAlgorithm.parse(alg)
    algorithm.check_spec(info.spec)

    payload: dict[str, Any] = dict(claims)
    if "aud" in payload:
        payload["aud"] = _check_audience(payload["aud"])
    payload["iat"] = issued_at
    if not_before:
        payload["nbf"] = issued_at
    payload["exp"] = issued_at + seconds
    payload["jti"] = secrets.token_urlsafe(16)

    header = {"alg": algorithm.value, "typ": "JWT", "kid": info.kid}
    signing_input = f"{b64url_encode(_json(header, 'header'))}.{b64url_encode(_json(payload, 'claims'))}"
    signature = store.sign(info.kid, signing_input.encode("ascii"), algorithm, verify=verify)
    return f"{signing_input}.{b64url_encode(signature)}"


def _decode_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment))
    except (EncodingError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncodingError(f"token {what} is not base64url JSON: {exc}") from exc
    except RecursionError:  # hostile nesting, before any signature check
        raise EncodingError(f"token {what} nests too deeply") from None
    if not isinstance(value, dict):
        raise EncodingError(f"token {what} is not a JSON object")
    return value


def _key_for(key: Mapping[str, Any] | KeyInfo | PublicKey, header: Mapping[str, Any]) -> PublicKey:
    """The verification key: a public key, a KeyInfo, a JWK, or a JWKS searched by the header's kid."""
    if isinstance(key, KeyInfo):
        return key.public_key
    if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        return key
    if not isinstance(key, Mapping):
        raise InvalidInputError(f"cannot verify with a {type(key).__name__}")
    jwk: Mapping[str, Any] = key
    if "keys" in key:
        entries = key["keys"]
        if not isinstance(entries, list):
            raise EncodingError("JWKS 'keys' must be a list")
        matches = [
            entry for entry in entries if isinstance(entry, Mapping) and entry.get("kid") == header.get("kid")
        ]
        if len(matches) != 1:
            raise InvalidInputError(
                f"the JWKS has {len(matches)} keys with the token's kid {header.get('kid')!r}"
            )
        jwk = matches[0]
    if jwk.get("use", "sig") != "sig":
        raise InvalidInputError(f"the JWK is for use {jwk.get('use')!r}, not signatures")
    if "alg" in jwk and jwk["alg"] != header.get("alg"):
        raise InvalidInputError(f"the JWK is for {jwk['alg']!r} but the token uses {header.get('alg')!r}")
    return jwk_to_public_key(jwk)


def _alg_suits_key(alg: SignatureAlgorithm, public_key: PublicKey) -> bool:
    if isinstance(public_key, rsa.RSAPublicKey):
        # RFC 7518 section 3.3: RS*/PS* keys are 2048 bits or larger.
        return alg.key_type is KeyType.RSA and public_key.key_size >= 2048
    try:
        return alg.allows(spec_of_public_key(public_key))
    except EncodingError:
        return False


def _int_claim(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidTokenError(f"token claim {name!r} is not a finite number")
    return math.floor(value)


def verify_jwt(
    token: str,
    key: Mapping[str, Any] | KeyInfo | PublicKey,
    *,
    audience: str | None,
    issuer: str | None,
    now: Clock | None = None,
    leeway: int = 0,
    algorithms: Iterable[SignatureAlgorithm | str] | None = None,
) -> dict[str, Any]:
    """Claims of a compact JWS after checking signature, ``exp``/``nbf``/``iat``, ``iss`` and ``aud``.

    What STS checks, done locally so a grant can be verified end to end before anyone relies on it.
    ``audience`` / ``issuer`` of None skip that check explicitly. Errors are ``InvalidInputError``
    (``EncodingError`` for a token that is not a JWS at all, ``UnsupportedAlgorithmError`` for an
    algorithm that is not allowed, such as ``none`` or HMAC).
    """
    if isinstance(leeway, bool) or not isinstance(leeway, int) or leeway < 0:
        raise InvalidInputError(f"leeway must be a non-negative number of seconds, got {leeway!r}")
    if not isinstance(token, str):
        raise EncodingError(f"a token must be a string, got {type(token).__name__}")
    parts = token.split(".")
    if len(parts) != 3:
        raise EncodingError(f"a compact JWS has 3 dot-separated parts, this token has {len(parts)}")
    header = _decode_segment(parts[0], "header")
    payload = _decode_segment(parts[1], "payload")
    try:
        signature = b64url_decode(parts[2])
    except EncodingError as exc:
        raise EncodingError(f"token signature is not base64url: {exc}") from exc
    if "crit" in header:
        raise InvalidTokenError(
            f"token header marks extensions critical ({header['crit']!r}); none are supported"
        )
    if str(header.get("typ", "JWT")).upper() != "JWT":
        raise InvalidTokenError(f"token typ is {header.get('typ')!r}, not JWT")
    alg = SignatureAlgorithm.parse(str(header.get("alg")))
    if algorithms is not None and alg not in {SignatureAlgorithm.parse(a) for a in algorithms}:
        raise UnsupportedAlgorithmError(f"token algorithm {alg.value} is not among the allowed ones")
    public_key = _key_for(key, header)
    if not _alg_suits_key(alg, public_key):
        raise UnsupportedAlgorithmError(f"token algorithm {alg.value} does not suit the verification key")
    if not verify_signature(public_key, signature, f"{parts[0]}.{parts[1]}".encode("ascii"), alg):
        raise InvalidTokenError("token signature does not verify")

    current = resolve_now(now).timestamp()
    expires = _int_claim(payload, "exp")
    if expires is None:
        raise InvalidTokenError("token has no exp claim")
    if expires <= current - leeway:
        raise InvalidTokenError(f"token expired at {expires} (now {math.floor(current)})")
    not_before = _int_claim(payload, "nbf")
    if not_before is not None and not_before > current + leeway:
        raise InvalidTokenError(f"token is not valid before {not_before} (now {math.floor(current)})")
    issued_at = _int_claim(payload, "iat")
    if issued_at is not None and issued_at > current + leeway:
        raise InvalidTokenError(f"token was issued in the future ({issued_at}, now {math.floor(current)})")
    if issuer is not None and payload.get("iss") != issuer:
        raise InvalidTokenError(f"token iss {payload.get('iss')!r} is not {issuer!r}")
    if audience is not None:
        aud = payload.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if audience not in audiences:
            raise InvalidTokenError(f"token aud {aud!r} does not include {audience!r}")
    return payload


# -- key sets ----------------------------------------------------------------------------------------


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def public_jwk(
    key: KeyInfo | PublicKey,
    *,
    kid: str | None = None,
    alg: SignatureAlgorithm | str | None = None,
    use: str = "sig",
    certificates: Sequence[CertificateLike] | None = None,
) -> dict[str, Any]:
    """One JWKS entry: the public members, then ``kid`` (default: the RFC 7638 thumbprint, which is
    also what a KeyInfo's kid is), ``use`` and ``alg`` (default: the key's default algorithm), and
    ``x5c`` / ``x5t#S256`` when ``certificates`` (leaf first) are given."""
    public_key = key.public_key if isinstance(key, KeyInfo) else key
    spec = key.spec if isinstance(key, KeyInfo) else spec_of_public_key(public_key)
    algorithm = SignatureAlgorithm.default_for(spec) if alg is None else SignatureAlgorithm.parse(alg)
    algorithm.check_spec(spec)
    entry: dict[str, Any] = dict(public_key_to_jwk(public_key))
    entry["kid"] = kid or (key.kid if isinstance(key, KeyInfo) else jwk_thumbprint(public_key))
    entry["use"] = use
    entry["alg"] = algorithm.value
    if certificates is not None:
        chain = [load_certificate(cert) for cert in certificates]
        if not chain or _spki(chain[0].public_key()) != _spki(public_key):  # type: ignore[arg-type]
            raise InvalidInputError("the first certificate of x5c must certify the key itself")
        entry["x5c"] = x5c(chain)
        entry["x5t#S256"] = x5t_s256(chain[0])
    return entry


def jwks(
    keys: Iterable[KeyInfo | PublicKey | Mapping[str, Any]],
    *,
    alg: SignatureAlgorithm | str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{"keys": [...]}`` for KeyInfos, public keys, or ready JWKS entries (validated, kept as given).

    ``alg`` sets the algorithm of every KeyInfo / public key entry (it must suit each key); by default
    each key gets its spec's default. Two entries with one kid are refused: STS picks keys by kid.
    """
    entries: list[dict[str, Any]] = []
    for key in keys:
        if isinstance(key, Mapping):
            jwk_to_public_key(key)  # refuses private or malformed members
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                raise InvalidInputError("a JWKS entry needs a kid")
            entries.append(dict(key))
        else:
            entries.append(public_jwk(key, alg=alg))
    kids = [entry["kid"] for entry in entries]
    duplicates = sorted({kid for kid in kids if kids.count(kid) > 1})
    if duplicates:
        raise InvalidInputError(f"kid {', '.join(duplicates)} appears more than once in the JWKS")
    return {"keys": entries}


# -- issuer and discovery ----------------------------------------------------------------------------


def _check_host(host: str, url: str) -> None:
    if not host:
        raise InvalidInputError(f"issuer URL {url!r} has no host")
    if host != host.lower():
        raise InvalidInputError(f"issuer URL {url!r} must have a lowercase host (IAM compares it exactly)")
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InvalidInputError(f"issuer URL {url!r} has an invalid host name {host!r}")
    if len(labels) < 2 or labels[-1].isdigit():
        # IP literals (1.2.3.4, 2130706433) and single-label names are not public DNS names.
        raise InvalidInputError(f"issuer URL {url!r} must name a fully qualified DNS host, not {host!r}")


def validate_issuer_url(url: str) -> str:
    """``url`` unchanged if IAM and STS can use it as an issuer, else ``InvalidInputError``.

    Rules: ``https://`` only; a lowercase, fully qualified DNS host (no IP literal) with no port
    and no userinfo; no query and no fragment; no trailing slash (``iss`` must equal the provider
    URL exactly); path segments of plain URL characters (no empty, ``.`` or ``..`` segments, no
    percent-encoding); at most 255 characters.
    """
    if not isinstance(url, str):
        raise InvalidInputError(f"issuer URL must be a string, got {type(url).__name__}")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidInputError(f"issuer URL {url!r} must be printable ASCII without whitespace")
    if len(url) > MAX_ISSUER_LENGTH:
        raise InvalidInputError(
            f"issuer URL is {len(url)} characters; IAM allows at most {MAX_ISSUER_LENGTH}"
        )
    if not url.startswith("https://"):
        raise InvalidInputError(f"issuer URL {url!r} must start with https://")
    if "?" in url or "#" in url:
        raise InvalidInputError(f"issuer URL {url!r} must have no query or fragment")
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        raise InvalidInputError(f"issuer URL {url!r} must have no user information")
    if ":" in parts.netloc or "[" in parts.netloc:
        raise InvalidInputError(f"issuer URL {url!r} must have no port (and no IP literal)")
    _check_host(parts.netloc, url)
    if parts.path.endswith("/"):
        raise InvalidInputError(f"issuer URL {url!r} must not end with a slash")
    if parts.path:
        for segment in parts.path[1:].split("/"):
            if segment in ("", ".", "..") or not _PATH_SEGMENT.fullmatch(segment):
                raise InvalidInputError(f"issuer URL {url!r} has an invalid path segment {segment!r}")
    return url


def _validate_jwks_uri(uri: str) -> str:
    if not isinstance(uri, str) or not uri.startswith("https://"):
        raise InvalidInputError(f"jwks_uri {uri!r} must be an https:// URL")
    parts = urllib.parse.urlsplit(uri)
    if not parts.hostname or "@" in parts.netloc or parts.fragment or any(c.isspace() for c in uri):
        raise InvalidInputError(
            f"jwks_uri {uri!r} must have a host and no user information, fragment or spaces"
        )
    return uri


def discovery_document(
    issuer: str,
    jwks_uri: str,
    algorithms: Iterable[SignatureAlgorithm | str],
    *,
    claims_supported: Sequence[str] = DEFAULT_CLAIMS_SUPPORTED,
) -> dict[str, Any]:
    """The OpenID Provider metadata STS reads from ``<issuer>/.well-known/openid-configuration``."""
    if isinstance(algorithms, (str, SignatureAlgorithm)):
        algorithms = [algorithms]
    names: list[str] = []
    for alg in algorithms:
        name = SignatureAlgorithm.parse(alg).value
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidInputError("a discovery document needs at least one signing algorithm")
    return {
        "issuer": validate_issuer_url(issuer),
        "jwks_uri": _validate_jwks_uri(jwks_uri),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": names,
        "claims_supported": list(claims_supported),
    }


def certificate_jwk(
    certificate: x509.Certificate, *, alg: SignatureAlgorithm | str | None = None
) -> dict[str, Any]:
    """A JWKS entry for the key a certificate certifies, carrying the certificate as ``x5c``."""
    public_key = certificate.public_key()
    if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise UnsupportedAlgorithmError(f"certificate key type {type(public_key).__name__} is not supported")
    return public_jwk(public_key, alg=alg, certificates=[certificate])


__all__ = [
    "DEFAULT_CLAIMS_SUPPORTED",
    "MAX_ISSUER_LENGTH",
    "RESERVED_CLAIMS",
    "certificate_jwk",
    "discovery_document",
    "jwks",
    "mint_jwt",
    "public_jwk",
    "validate_issuer_url",
    "verify_jwt",
]
