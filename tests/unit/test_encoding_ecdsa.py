"""ECDSA raw r||s <-> DER, checked against cryptography's own DER codec and real signatures."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import given
from hypothesis import strategies as st

from hsm_keys.encoding import ecdsa_der_to_raw, ecdsa_raw_to_der
from hsm_keys.errors import EncodingError, InvalidInputError
from hsm_keys.types import KeySpec

SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}
CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
HASHES = {"P-256": hashes.SHA256(), "P-384": hashes.SHA384(), "P-521": hashes.SHA512()}


def _values(size: int) -> st.SearchStrategy[int]:
    # Small values on purpose: r or s with leading zero octets is where fixed-width bugs hide.
    top = (1 << (8 * size)) - 1
    return st.one_of(st.integers(1, 255), st.integers(1, 1 << (8 * size - 9)), st.integers(1, top))


@pytest.mark.parametrize("curve", sorted(SIZES))
@given(data=st.data())
def test_raw_der_round_trip_matches_cryptography(curve: str, data: st.DataObject) -> None:
    size = SIZES[curve]
    r = data.draw(_values(size), label="r")
    s = data.draw(_values(size), label="s")
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    der = ecdsa_raw_to_der(raw)
    assert der == utils.encode_dss_signature(r, s)
    back = ecdsa_der_to_raw(der, curve)
    assert back == raw
    assert len(back) == 2 * size


@pytest.mark.parametrize("curve", sorted(SIZES))
def test_thousands_of_real_signatures_convert_to_exact_width(curve: str) -> None:
    key = ec.generate_private_key(CURVES[curve])
    public = key.public_key()
    size = SIZES[curve]
    short = 0
    for i in range(1000):
        message = i.to_bytes(4, "big")
        der = key.sign(message, ec.ECDSA(HASHES[curve]))
        raw = ecdsa_der_to_raw(der, CURVES[curve])
        assert len(raw) == 2 * size
        short += raw[0] == 0 or raw[size] == 0
        assert ecdsa_raw_to_der(raw) == der
        public.verify(ecdsa_raw_to_der(raw), message, ec.ECDSA(HASHES[curve]))
    if curve != "P-521":  # P-521's top octet only has one bit, so it is almost always short
        assert short > 0, "1000 signatures should include some with a short r or s"


@pytest.mark.parametrize("curve_or_size", [32, KeySpec.EC_P256, "P-256", "ec-p256", ec.SECP256R1()])
def test_every_way_to_name_the_curve(curve_or_size: object) -> None:
    raw = bytes(31) + b"\x01" + bytes(31) + b"\x02"
    assert ecdsa_der_to_raw(ecdsa_raw_to_der(raw), curve_or_size) == raw  # type: ignore[arg-type]


@pytest.mark.parametrize("curve_or_size", [31, 64, True, "P-224", KeySpec.ED25519, KeySpec.RSA_2048])
def test_unknown_curves_and_sizes_are_rejected(curve_or_size: object) -> None:
    with pytest.raises(InvalidInputError):
        ecdsa_der_to_raw(utils.encode_dss_signature(1, 1), curve_or_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [0, 63, 65, 66, 128, 133])
def test_raw_signatures_of_other_lengths_are_rejected(length: int) -> None:
    with pytest.raises(EncodingError, match="expected 64"):
        ecdsa_raw_to_der(b"\x01" * length)


def test_zero_r_or_s_is_rejected() -> None:
    with pytest.raises(EncodingError, match="zero"):
        ecdsa_raw_to_der(bytes(32) + b"\x01" * 32)


@pytest.mark.parametrize(
    "der_hex",
    [
        "",
        "3006020101020101ff",  # trailing bytes
        "300702020001020101",  # non-minimal INTEGER
        "3081060201010201 01",  # non-minimal length
        "3006020100020101",  # r = 0
        "3006020181020101",  # negative r
        "3003020101",  # s missing
    ],
)
def test_malformed_der_is_rejected(der_hex: str) -> None:
    with pytest.raises(EncodingError):
        ecdsa_der_to_raw(bytes.fromhex(der_hex.replace(" ", "")), 32)


def test_values_too_large_for_the_curve_are_rejected() -> None:
    der = utils.encode_dss_signature(1 << 256, 1)
    with pytest.raises(EncodingError, match="32-byte"):
        ecdsa_der_to_raw(der, "P-256")
    assert len(ecdsa_der_to_raw(der, "P-384")) == 96


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(EncodingError):
        ecdsa_raw_to_der("00" * 64)  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        ecdsa_der_to_raw("3006020101020101", 32)  # type: ignore[arg-type]
