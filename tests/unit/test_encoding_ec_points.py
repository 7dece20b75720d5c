"""Public keys from PKCS#11 attributes in every form tokens are seen to return.

Expected encodings are produced independently: points by cryptography's X9.62 serialisation, DER
wrappers by asn1crypto, curve OIDs by asn1crypto's named-curve table.
"""

from __future__ import annotations

import pytest
from asn1crypto import core, keys
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm_keys.encoding import (
    ec_params_for_spec,
    ec_point_bytes,
    public_key_from_ec_point,
    public_key_to_jwk,
    rsa_public_key_from_attributes,
    spec_from_ec_params,
    spec_of_public_key,
)
from hsm_keys.errors import EncodingError
from hsm_keys.types import KeySpec

EC_SPECS = {
    KeySpec.EC_P256: (ec.SECP256R1(), "secp256r1"),
    KeySpec.EC_P384: (ec.SECP384R1(), "secp384r1"),
    KeySpec.EC_P521: (ec.SECP521R1(), "secp521r1"),
}


def _asn1_named_curve(name: str) -> bytes:
    return bytes(keys.ECDomainParameters(name="named", value=name).dump())


@pytest.mark.parametrize("spec", sorted(EC_SPECS, key=lambda s: s.value))
def test_named_curve_oids_match_asn1crypto(spec: KeySpec) -> None:
    der = _asn1_named_curve(EC_SPECS[spec][1])
    assert spec_from_ec_params(der) is spec
    assert ec_params_for_spec(spec) == der


def test_ed25519_params_as_oid_and_as_printable_string() -> None:
    oid = bytes(core.ObjectIdentifier("1.3.101.112").dump())
    assert ec_params_for_spec(KeySpec.ED25519) == oid
    assert spec_from_ec_params(oid) is KeySpec.ED25519
    assert spec_from_ec_params(bytes(core.PrintableString("edwards25519").dump())) is KeySpec.ED25519
    gnupg = bytes(core.ObjectIdentifier("1.3.6.1.4.1.11591.15.1").dump())
    assert spec_from_ec_params(gnupg) is KeySpec.ED25519


@pytest.mark.parametrize(
    ("name", "spec"),
    [("prime256v1", KeySpec.EC_P256), ("secp384r1", KeySpec.EC_P384), ("P-521", KeySpec.EC_P521)],
)
def test_printable_string_curve_names(name: str, spec: KeySpec) -> None:
    assert spec_from_ec_params(bytes(core.PrintableString(name).dump())) is spec


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (bytes(core.ObjectIdentifier("1.3.101.110").dump()), "X25519"),
        (bytes(core.ObjectIdentifier("1.3.101.113").dump()), "Ed448"),
        (bytes(core.ObjectIdentifier("1.3.132.0.10").dump()), "secp256k1"),
        (bytes(core.ObjectIdentifier("1.2.840.10045.3.1.1").dump()), "1.2.840.10045.3.1.1"),
        (bytes(core.PrintableString("curve25519").dump()), "curve25519"),
        (bytes(core.Null().dump()), "implicitlyCA"),
        (bytes.fromhex("3003020101"), "explicit"),
        (bytes.fromhex("0403010203"), "tag"),
        (bytes.fromhex("06082a8648ce3d03010700"), "unexpected bytes"),
        (bytes.fromhex("06092a8648ce3d030107"), "only"),
        (b"", "truncated"),
    ],
)
def test_unsupported_or_malformed_params_name_the_problem(params: bytes, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        spec_from_ec_params(params)


def _point_forms(public: ec.EllipticCurvePublicKey) -> dict[str, bytes]:
    uncompressed = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    compressed = public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    return {
        "der": bytes(core.OctetString(uncompressed).dump()),
        "raw": uncompressed,
        "der-compressed": bytes(core.OctetString(compressed).dump()),
        "raw-compressed": compressed,
    }


@pytest.mark.parametrize("spec", sorted(EC_SPECS, key=lambda s: s.value))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_point_form_gives_the_same_key(spec: KeySpec, data: st.DataObject) -> None:
    curve = EC_SPECS[spec][0]
    scalar = data.draw(st.integers(1, (1 << (curve.key_size - 1)) - 1), label="scalar")
    public = ec.derive_private_key(scalar, curve).public_key()
    expected = public_key_to_jwk(public)
    for form, point in _point_forms(public).items():
        for params in (spec, ec_params_for_spec(spec)):
            key = public_key_from_ec_point(point, params)
            assert public_key_to_jwk(key) == expected, form


def test_p521_der_point_uses_a_long_form_length() -> None:
    public = ec.generate_private_key(ec.SECP521R1()).public_key()
    der = _point_forms(public)["der"]
    assert der[:3] == b"\x04\x81\x85"
    assert ec_point_bytes(der, KeySpec.EC_P521) == der[3:]


def test_a_bare_point_that_also_parses_as_der_is_still_read_right() -> None:
    # A raw P-256 point whose x starts with 0x3f looks like an OCTET STRING of 63 bytes.
    for scalar in range(1, 5000):
        public = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
        raw = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        if raw[1] == 0x3F:
            break
    else:  # pragma: no cover - 1 in 256 chance per key
        pytest.fail("no key with x starting 0x3f found")
    assert public_key_to_jwk(public_key_from_ec_point(raw, KeySpec.EC_P256)) == public_key_to_jwk(public)


@pytest.mark.parametrize("spec", [KeySpec.EC_P384, KeySpec.EC_P521])
def test_a_point_of_another_curve_is_an_error_not_a_wrong_key(spec: KeySpec) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    for point in _point_forms(p256).values():
        with pytest.raises(EncodingError, match=str(spec.curve)):
            public_key_from_ec_point(point, spec)


def test_off_curve_points_are_rejected() -> None:
    point = b"\x04" + (1).to_bytes(32, "big") + (1).to_bytes(32, "big")
    with pytest.raises(EncodingError, match="not on P-256"):
        public_key_from_ec_point(point, KeySpec.EC_P256)


def test_ed25519_raw_octet_string_and_bit_string() -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    forms = [
        raw,
        bytes(core.OctetString(raw).dump()),
        bytes(core.BitString.load(b"\x03\x21\x00" + raw).dump()),
    ]
    params = bytes(core.PrintableString("edwards25519").dump())
    for point in forms:
        for spec_or_params in (KeySpec.ED25519, params):
            key = public_key_from_ec_point(point, spec_or_params)
            assert isinstance(key, ed25519.Ed25519PublicKey)
            assert key.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw


@pytest.mark.parametrize(
    "point",
    [b"\x01" * 31, b"\x01" * 33, b"\x04\x1f" + b"\x01" * 31, b"\x03\x21\x01" + b"\x01" * 32],
)
def test_malformed_ed25519_points_are_rejected(point: bytes) -> None:
    with pytest.raises(EncodingError, match="Ed25519"):
        public_key_from_ec_point(point, KeySpec.ED25519)


def test_rsa_attributes() -> None:
    public = rsa.generate_private_key(65537, 2048).public_key()
    numbers = public.public_numbers()
    key = rsa_public_key_from_attributes(numbers.n.to_bytes(256, "big"), b"\x01\x00\x01")
    assert key.public_numbers() == numbers
    assert rsa_public_key_from_attributes(numbers.n, 65537).public_numbers() == numbers
    assert spec_of_public_key(key) is KeySpec.RSA_2048
    with pytest.raises(EncodingError, match="RSA"):
        rsa_public_key_from_attributes(numbers.n.to_bytes(256, "big"), b"\x02")
    with pytest.raises(EncodingError, match="positive"):
        rsa_public_key_from_attributes(-5, 3)
    with pytest.raises(EncodingError, match="positive"):
        rsa_public_key_from_attributes(numbers.n, 0)


def test_spec_must_be_a_key_spec() -> None:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    )
    with pytest.raises(EncodingError, match="KeySpec"):
        ec_point_bytes(point, "EC_P256")  # type: ignore[arg-type]


def test_spec_of_public_key() -> None:
    assert spec_of_public_key(ed25519.Ed25519PrivateKey.generate().public_key()) is KeySpec.ED25519
    assert spec_of_public_key(ec.generate_private_key(ec.SECP384R1()).public_key()) is KeySpec.EC_P384
    with pytest.raises(EncodingError, match="secp256k1"):
        spec_of_public_key(ec.generate_private_key(ec.SECP256K1()).public_key())
    with pytest.raises(EncodingError, match="1024"):
        spec_of_public_key(rsa.generate_private_key(65537, 1024).public_key())


def test_rsa_spec_cannot_read_an_ec_point() -> None:
    with pytest.raises(EncodingError, match="not a NIST"):
        ec_point_bytes(b"\x04" * 65, KeySpec.RSA_2048)
