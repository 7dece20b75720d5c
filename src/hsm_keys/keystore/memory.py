"""Software key store on ``cryptography``: the reference implementation and the test double.

CMP services use it in their own tests the way httpx users use its mock transport: same interface,
same errors, no HSM. Keys live in process memory only and vanish on ``close``.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm_keys.encoding.jwk import jwk_thumbprint
from hsm_keys.errors import HsmKeysError
from hsm_keys.keystore.base import KeyStore
from hsm_keys.keystore.software import PrivateKey, software_sign
from hsm_keys.types import Binding, KeyInfo, KeySpec, KeyType, SignatureAlgorithm

_EC_CURVES: dict[KeySpec, type[ec.EllipticCurve]] = {
    KeySpec.EC_P256: ec.SECP256R1,
    KeySpec.EC_P384: ec.SECP384R1,
    KeySpec.EC_P521: ec.SECP521R1,
}


def generate_private_key(spec: KeySpec) -> PrivateKey:
    if spec.key_type is KeyType.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.size)
    if spec.key_type is KeyType.EC:
        return ec.generate_private_key(_EC_CURVES[spec]())
    return ed25519.Ed25519PrivateKey.generate()


class MemoryKeyStore(KeyStore):
    """In-process keys; behaves like the PKCS#11 store in every observable way except persistence."""

    backend_name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._keys: dict[str, tuple[KeyInfo, PrivateKey]] = {}
        self._lock = threading.Lock()

    def _generate(self, spec: KeySpec, binding: Binding, label: str, created_at: dt.datetime) -> KeyInfo:
        private_key = generate_private_key(spec)
        public_key = private_key.public_key()
        info = KeyInfo(
            kid=jwk_thumbprint(public_key),
            spec=spec,
            binding=binding,
            label=label,
            created_at=created_at,
            public_key=public_key,
        )
        with self._lock:
            self._keys[info.kid] = (info, private_key)
        return info

    def _load(self, kid: str) -> KeyInfo | None:
        with self._lock:
            entry = self._keys.get(kid)
        return entry[0] if entry else None

    def _all(self) -> list[KeyInfo]:
        with self._lock:
            return [info for info, _ in self._keys.values()]

    def _sign_batch(
        self, info: KeyInfo, messages: Sequence[bytes], alg: SignatureAlgorithm, workers: int | None
    ) -> list[bytes | HsmKeysError]:
        with self._lock:
            private_key = self._keys[info.kid][1]
        return [software_sign(private_key, message, alg) for message in messages]

    def _destroy(self, info: KeyInfo) -> None:
        with self._lock:
            self._keys.pop(info.kid, None)

    def _close(self) -> None:
        with self._lock:
            self._keys.clear()

    def __repr__(self) -> str:
        return f"MemoryKeyStore(keys={len(self._keys)})"
