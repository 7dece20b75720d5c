"""The KeyStore contract, run over every backend: what CMP services may rely on, whatever the store."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from hsm_keys.encoding import jwk_thumbprint, public_key_to_jwk
from hsm_keys.errors import (
    HsmKeysError,
    InvalidInputError,
    KeyExistsError,
    KeyNotFoundError,
    UnsupportedAlgorithmError,
)
from hsm_keys.keystore import KeyStore
from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm

ACCOUNT = "111122223333"
HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
SIGNATURE_LENGTH = {KeySpec.EC_P256: 64, KeySpec.EC_P384: 96, KeySpec.EC_P521: 132, KeySpec.ED25519: 64}


def independent_verify(public_key: object, signature: bytes, message: bytes, alg: SignatureAlgorithm) -> None:
    """Verify with cryptography directly from the RFC 7518 definitions (not our software module)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, message)
        return
    digest = HASHES[alg.hash_name or ""]
    if isinstance(public_key, rsa.RSAPublicKey):
        assert len(signature) == public_key.key_size // 8
        if alg.value.startswith("PS"):
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(digest), salt_length=digest.digest_size
            )
        else:
            pad = padding.PKCS1v15()
        public_key.verify(signature, message, pad, digest)
        return
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    half = len(signature) // 2
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )
    public_key.verify(der, message, ec.ECDSA(digest))


@pytest.mark.parametrize("spec", list(KeySpec), ids=lambda s: s.value)
def test_every_spec_signs_with_every_allowed_algorithm(store: KeyStore, spec: KeySpec) -> None:
    binding = Binding(f"staff-{spec.value.lower()}", ACCOUNT)
    info = store.generate(spec, binding)
    assert info.spec is spec and info.binding == binding
    assert info.kid == jwk_thumbprint(public_key_to_jwk(info.public_key))
    message = b"header.payload" * 20
    for alg in SignatureAlgorithm:
        if not alg.allows(spec):
            with pytest.raises(UnsupportedAlgorithmError):
                store.sign(info.kid, message, alg)
            continue
        signature = store.sign(info.kid, message, alg)
        if spec in SIGNATURE_LENGTH:
            assert len(signature) == SIGNATURE_LENGTH[spec]
        independent_verify(info.public_key, signature, message, alg)
        with pytest.raises(InvalidSignature):
            independent_verify(info.public_key, signature, message + b"!", alg)


def test_sign_many_keeps_order_and_verifies(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("batch", ACCOUNT))
    messages = [f"message {i}".encode() * (i % 7 + 1) for i in range(40)]
    signatures = store.sign_many(info.kid, messages, "ES256", workers=3, verify=True)
    assert len(signatures) == len(messages)
    for message, signature in zip(messages, signatures, strict=True):
        independent_verify(info.public_key, signature, message, SignatureAlgorithm.ES256)
    results = store.sign_many_results(info.kid, messages[:3], SignatureAlgorithm.ES256)
    assert [r.index for r in results] == [0, 1, 2] and all(r.ok for r in results)
    assert store.sign_many(info.kid, [], "ES256") == []


def test_async_faces_sign(store: KeyStore) -> None:
    info = store.generate(KeySpec.ED25519, Binding("async", ACCOUNT))

    async def both() -> tuple[bytes, list[bytes]]:
        return await store.asign(info.kid, b"one", "EdDSA"), await store.asign_many(
            info.kid, [b"a", b"b"], "EdDSA"
        )

    single, many = asyncio.run(both())
    independent_verify(info.public_key, single, b"one", SignatureAlgorithm.EdDSA)
    independent_verify(info.public_key, many[1], b"b", SignatureAlgorithm.EdDSA)


def test_bad_messages_and_arguments_are_rejected(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("inputs", ACCOUNT))
    with pytest.raises(InvalidInputError):
        store.sign(info.kid, "text, not bytes", "ES256")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        store.sign_many(info.kid, b"not a list", "ES256")
    with pytest.raises(InvalidInputError):
        store.sign_many(info.kid, [b"x"], "ES256", workers=0)
    with pytest.raises(UnsupportedAlgorithmError):
        store.sign(info.kid, b"x", "HS256")


def test_one_key_per_binding_case_insensitively(store: KeyStore) -> None:
    store.generate(KeySpec.EC_P256, Binding("Alice", ACCOUNT))
    with pytest.raises(KeyExistsError):
        store.generate(KeySpec.EC_P384, Binding("Alice", ACCOUNT))
    with pytest.raises(KeyExistsError):
        store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    other_account = store.generate(KeySpec.EC_P256, Binding("alice", "444455556666"))
    assert other_account.binding.account == "444455556666"


def test_find_get_list_and_destroy(store: KeyStore) -> None:
    created = [store.generate(KeySpec.EC_P256, Binding(f"user{i}", ACCOUNT)) for i in range(3)]
    listed = {k.kid for k in store.list_keys()}
    assert {k.kid for k in created} <= listed
    found = store.find(Binding("USER1", ACCOUNT))
    assert found is not None and found.kid == created[1].kid
    assert store.get(created[2].kid).binding == created[2].binding
    assert store.public_key(created[0].kid).public_numbers() == created[0].public_key.public_numbers()
    assert store.find(Binding("nobody", ACCOUNT)) is None

    store.destroy(created[1].kid)
    assert store.find(Binding("user1", ACCOUNT)) is None
    assert created[1].kid not in {k.kid for k in store.list_keys()}
    with pytest.raises(KeyNotFoundError):
        store.get(created[1].kid)
    with pytest.raises(KeyNotFoundError):
        store.sign(created[1].kid, b"x", "ES256")
    with pytest.raises(KeyNotFoundError):
        store.destroy(created[1].kid)
    # the binding is free again
    again = store.generate(KeySpec.EC_P256, Binding("user1", ACCOUNT))
    assert again.kid != created[1].kid


@pytest.mark.parametrize("kid", ["", "not-a-kid", "A" * 43, "!!"])
def test_unknown_kids_raise_key_not_found(store: KeyStore, kid: str) -> None:
    with pytest.raises(KeyNotFoundError):
        store.get(kid)
    with pytest.raises(KeyNotFoundError):
        store.sign(kid, b"x", "ES256")


def test_created_at_and_label_carry_the_binding(store: KeyStore) -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC)
    info = store.generate(KeySpec.EC_P256, Binding("label.test", ACCOUNT), now=now)
    assert info.created_at == now.replace(microsecond=0)
    assert ACCOUNT in info.label and "label.test" in info.label
    assert store.get(info.kid).created_at == info.created_at


def test_closed_store_refuses_work(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("closing", ACCOUNT))
    store.destroy(info.kid)
    store.close()
    store.close()  # idempotent
    with pytest.raises(HsmKeysError):
        store.list_keys()


def test_a_non_bytes_item_fails_the_whole_batch_before_signing(store: KeyStore) -> None:
    info = store.generate(KeySpec.EC_P256, Binding("results", ACCOUNT))
    with pytest.raises(InvalidInputError, match="message 1 is str"):
        store.sign_many(info.kid, [b"ok", "bad", b"ok"], "ES256")  # type: ignore[list-item]
