"""Self-signed X.509 certificates for keys that never leave their key store.

``cryptography``'s ``CertificateBuilder.sign`` needs the private key as an in-process object, and an
HSM key is neither extractable nor wrapped as one. So the TBSCertificate is built with asn1crypto,
its DER is signed by ``KeyStore.sign`` (the only place the private key is used), and the three parts
(TBS, signature algorithm, signature) are assembled into the Certificate by hand. ``cryptography``
then parses the result, so what we return is exactly what any verifier will see.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Any

from asn1crypto import algos, core, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from hsm_keys.encoding.ecdsa import ecdsa_raw_to_der
from hsm_keys.errors import CertificateError, EncodingError, InvalidInputError
from hsm_keys.keystore.base import KeyStore
from hsm_keys.types import Padding, SignatureAlgorithm

MAX_SERIAL_BITS = 159
"""RFC 5280 section 4.1.2.2: at most 20 octets, positive, so 159 value bits after the sign bit."""

_UTC_TIME_LIMIT = dt.datetime(2050, 1, 1, tzinfo=dt.UTC)

# asn1crypto names for the AlgorithmIdentifier of each JOSE algorithm (RFC 4055, RFC 5758, RFC 8410).
_SIGNATURE_ALGORITHMS: dict[SignatureAlgorithm, str] = {
    SignatureAlgorithm.RS256: "sha256_rsa",
    SignatureAlgorithm.RS384: "sha384_rsa",
    SignatureAlgorithm.RS512: "sha512_rsa",
    SignatureAlgorithm.PS256: "rsassa_pss",
    SignatureAlgorithm.PS384: "rsassa_pss",
    SignatureAlgorithm.PS512: "rsassa_pss",
    SignatureAlgorithm.ES256: "sha256_ecdsa",
    SignatureAlgorithm.ES384: "sha384_ecdsa",
    SignatureAlgorithm.ES512: "sha512_ecdsa",
    SignatureAlgorithm.EdDSA: "ed25519",
}

Clock = dt.datetime | Callable[[], dt.datetime]


def resolve_now(now: Clock | None) -> dt.datetime:
    """The current time from an injected clock (a datetime or a callable); must be timezone-aware."""
    value = now() if callable(now) else now
    if value is None:
        return dt.datetime.now(dt.UTC)
    if not isinstance(value, dt.datetime):
        raise InvalidInputError(f"now must be a datetime or return one, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError("now must be timezone-aware (e.g. datetime.now(datetime.UTC))")
    return value.astimezone(dt.UTC)


def signature_algorithm_identifier(alg: SignatureAlgorithm) -> algos.SignedDigestAlgorithm:
    """AlgorithmIdentifier for ``alg``: NULL parameters for PKCS#1 v1.5, none for ECDSA and Ed25519
    (RFC 5758 section 3.2, RFC 8410 section 3), explicit RSASSA-PSS-params for PSS (RFC 4055)."""
    name = _SIGNATURE_ALGORITHMS[alg]
    if alg.padding is Padding.PKCS1V15:
        return algos.SignedDigestAlgorithm({"algorithm": name, "parameters": core.Null()})
    if alg.padding is Padding.PSS:
        digest = {"algorithm": alg.hash_name, "parameters": core.Null()}
        params = algos.RSASSAPSSParams(
            {
                "hash_algorithm": digest,
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
                "salt_length": alg.hash_size,
            }
        )
        return algos.SignedDigestAlgorithm({"algorithm": name, "parameters": params})
    return algos.SignedDigestAlgorithm({"algorithm": name})


def _subject_name(subject: str | x509.Name) -> asn1_x509.Name:
    if isinstance(subject, str):
        if not subject.strip():
            raise InvalidInputError("subject common name must not be empty")
        try:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        except ValueError as exc:
            raise InvalidInputError(f"invalid subject common name: {exc}") from exc
    if not isinstance(subject, x509.Name):
        raise InvalidInputError(
            f"subject must be a common name or an x509.Name, got {type(subject).__name__}"
        )
    if not len(subject):
        raise InvalidInputError("subject name must not be empty")
    return asn1_x509.Name.load(subject.public_bytes())


def _time(value: dt.datetime) -> asn1_x509.Time:
    """RFC 5280 section 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    return asn1_x509.Time(name="utc_time" if value < _UTC_TIME_LIMIT else "general_time", value=value)


def _serial(serial: int | None) -> int:
    if serial is None:
        return secrets.randbits(MAX_SERIAL_BITS) | (1 << (MAX_SERIAL_BITS - 1))  # positive, never short
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise InvalidInputError(f"serial must be an integer, got {type(serial).__name__}")
    if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS:
        raise InvalidInputError("serial must be positive and fit in 20 octets (RFC 5280 section 4.1.2.2)")
    return serial


def self_signed_certificate(
    store: KeyStore,
    kid: str,
    subject: str | x509.Name,
    *,
    days: int,
    serial: int | None = None,
    now: Clock | None = None,
    alg: SignatureAlgorithm | str | None = None,
) -> x509.Certificate:
    """A v3 self-signed certificate for the store's key ``kid``, signed by the store itself.

    ``subject`` is a common name or a full ``x509.Name``; the certificate is valid from ``now``
    (to the second) for ``days`` days. ``alg`` defaults to RS256 for RSA keys, the curve's ECDSA for
    EC keys and EdDSA for Ed25519. Extensions: basicConstraints cA=false and keyUsage
    digitalSignature (both critical), subject and authority key identifiers.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise InvalidInputError(f"days must be a positive integer, got {days!r}")
    info = store.get(kid)
    algorithm = SignatureAlgorithm.default_for(info.spec) if alg is None else SignatureAlgorithm.parse(alg)
    algorithm.check_spec(info.spec)
    name = _subject_name(subject)
    serial_number = _serial(serial)
    not_before = resolve_now(now).replace(microsecond=0)
    try:
        not_after = not_before + dt.timedelta(days=days)
    except OverflowError as exc:
        raise InvalidInputError(f"{days} days from {not_before:%Y-%m-%d} is past year 9999") from exc

    public_key = info.public_key
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key).digest
    signature_algorithm = signature_algorithm_identifier(algorithm)
    extensions: list[dict[str, Any]] = [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
        {"extn_id": "key_usage", "critical": True, "extn_value": {"digital_signature"}},
        {"extn_id": "key_identifier", "critical": False, "extn_value": key_id},
        {"extn_id": "authority_key_identifier", "critical": False, "extn_value": {"key_identifier": key_id}},
    ]
    try:
        tbs = asn1_x509.TbsCertificate(
            {
                "version": "v3",
                "serial_number": serial_number,
                "signature": signature_algorithm,
                "issuer": name,
                "validity": {"not_before": _time(not_before), "not_after": _time(not_after)},
                "subject": name,
                "subject_public_key_info": keys.PublicKeyInfo.load(
                    public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                ),
                "extensions": extensions,
            }
        )
        tbs_der = tbs.dump()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"could not encode the TBSCertificate: {exc}") from exc

    # The store checks its own output (verify=True): a faulty HSM result fails here, not in a relying party.
    signature = store.sign(kid, tbs_der, algorithm, verify=True)
    if algorithm.padding is Padding.ECDSA:
        try:
            signature = ecdsa_raw_to_der(signature)  # X.509 carries Ecdsa-Sig-Value, JOSE raw r||s
        except EncodingError as exc:
            raise CertificateError(f"the store returned an unusable ECDSA signature: {exc}") from exc

    certificate = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": signature_algorithm_identifier(algorithm),
            "signature_value": signature,
        }
    )
    try:
        return x509.load_der_x509_certificate(certificate.dump())
    except ValueError as exc:  # pragma: no cover - would mean the assembly above is wrong
        raise CertificateError(f"the assembled certificate does not parse: {exc}") from exc


__all__ = [
    "MAX_SERIAL_BITS",
    "Clock",
    "resolve_now",
    "self_signed_certificate",
    "signature_algorithm_identifier",
]
