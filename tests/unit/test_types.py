"""Binding, KeySpec and SignatureAlgorithm validation."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsm_keys.errors import HsmKeysError, InvalidBindingError, UnsupportedAlgorithmError
from hsm_keys.types import STAFF_MAX, Binding, KeySpec, SignatureAlgorithm

STAFF_ALPHABET = string.ascii_letters + string.digits + "+=,.@_-"
ACCOUNT = "123456789012"


@given(
    st.text(alphabet=STAFF_ALPHABET, min_size=1, max_size=STAFF_MAX).filter(lambda s: s not in (".", ".."))
)
def test_valid_staff_ids_make_valid_role_names(staff: str) -> None:
    binding = Binding(staff, ACCOUNT)
    assert binding.role_name == "DoiT-Support-" + staff
    assert len(binding.role_name) <= 64


@given(st.text(alphabet=STAFF_ALPHABET, min_size=STAFF_MAX + 1, max_size=STAFF_MAX + 40))
def test_staff_ids_making_role_names_over_64_characters_are_rejected(staff: str) -> None:
    with pytest.raises(InvalidBindingError, match="at most"):
        Binding(staff, ACCOUNT)


@given(st.text(min_size=1, max_size=STAFF_MAX).filter(lambda s: any(c not in STAFF_ALPHABET for c in s)))
def test_staff_ids_with_characters_iam_refuses_are_rejected(staff: str) -> None:
    with pytest.raises(InvalidBindingError) as info:
        Binding(staff, ACCOUNT)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, HsmKeysError)


@given(st.text(max_size=20).filter(lambda s: not (len(s) == 12 and s.isascii() and s.isdigit())))
def test_account_ids_that_are_not_twelve_digits_are_rejected(account: str) -> None:
    with pytest.raises(InvalidBindingError):
        Binding("alice", account)


@pytest.mark.parametrize("account", [123456789012, None, b"123456789012", "٠١٢٣٤٥٦٧٨٩٠١"])
def test_account_ids_of_the_wrong_type_or_non_ascii_digits_are_rejected(account: object) -> None:
    with pytest.raises(InvalidBindingError):
        Binding("alice", account)  # type: ignore[arg-type]


@pytest.mark.parametrize("staff", ["", ".", ".."])
def test_empty_or_path_like_staff_ids_rejected(staff: str) -> None:
    with pytest.raises(InvalidBindingError):
        Binding(staff, ACCOUNT)


def test_binding_identity_folds_case_like_iam() -> None:
    assert Binding("Alice", ACCOUNT).same_as(Binding("alice", ACCOUNT))
    assert not Binding("alice", ACCOUNT).same_as(Binding("alice", "000000000001"))


@pytest.mark.parametrize(
    ("alg", "spec", "ok"),
    [
        ("RS256", KeySpec.RSA_2048, True),
        ("PS512", KeySpec.RSA_4096, True),
        ("ES256", KeySpec.EC_P256, True),
        ("ES256", KeySpec.EC_P384, False),
        ("ES512", KeySpec.EC_P521, True),
        ("EdDSA", KeySpec.ED25519, True),
        ("EdDSA", KeySpec.EC_P256, False),
        ("RS256", KeySpec.EC_P256, False),
        ("ES384", KeySpec.RSA_2048, False),
    ],
)
def test_algorithm_and_spec_pairs(alg: str, spec: KeySpec, ok: bool) -> None:
    algorithm = SignatureAlgorithm.parse(alg)
    assert algorithm.allows(spec) is ok
    if not ok:
        with pytest.raises(UnsupportedAlgorithmError, match=spec.value):
            algorithm.check_spec(spec)


@pytest.mark.parametrize("name", ["", "-", "?", "   ", "ü", "RSA", "P-224"])
def test_key_spec_garbage_is_rejected(name: str) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        KeySpec.parse(name)


@pytest.mark.parametrize("name", ["HS256", "none", "", "ES256K"])
def test_unknown_algorithms_rejected(name: str) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        SignatureAlgorithm.parse(name)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("ec-p256", KeySpec.EC_P256),
        ("P-521", KeySpec.EC_P521),
        ("rsa3072", KeySpec.RSA_3072),
        ("Ed25519", KeySpec.ED25519),
    ],
)
def test_key_spec_spellings(text: str, spec: KeySpec) -> None:
    assert KeySpec.parse(text) is spec
