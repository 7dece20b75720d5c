"""base64url (RFC 7515 section 2) against the standard library's codec."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsm_keys.encoding import b64url_decode, b64url_encode
from hsm_keys.errors import EncodingError


@given(st.binary(max_size=300))
def test_round_trip_and_agreement_with_stdlib(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert b64url_decode(text) == data
    assert b64url_decode(text.encode()) == data


@pytest.mark.parametrize(
    "text",
    ["AQ==", "a+b/", "ab cd", "A", "AB\n", "AR", "AAE=", "é"],
)
def test_padding_standard_alphabet_whitespace_and_non_canonical_text_are_rejected(text: str) -> None:
    with pytest.raises(EncodingError):
        b64url_decode(text)


def test_bytes_like_input_is_accepted_and_other_types_are_encoding_errors() -> None:
    assert b64url_decode(bytearray(b"QQ")) == b64url_decode(memoryview(b"QQ")) == b"A"
    for bad in (None, 42, ["QQ"]):
        with pytest.raises(EncodingError, match="str or bytes"):
            b64url_decode(bad)  # type: ignore[arg-type]


def test_non_ascii_bytes_are_rejected() -> None:
    with pytest.raises(EncodingError, match="ASCII"):
        b64url_decode(b"\xff\xfe")
