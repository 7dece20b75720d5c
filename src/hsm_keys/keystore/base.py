"""The ``KeyStore`` interface every backend implements, and the parts all backends share.

Shape taken from Vault transit: a single signature is a batch of one, the key is resolved once per
batch, and each item carries its own outcome. Backends implement a handful of primitives
(``_generate``, ``_load``, ``_all``, ``_sign_batch``, ``_destroy``); validation, the one-key-per-binding
rule, result handling and software verification live here once.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from hsm_keys.errors import (
    HsmKeysError,
    InvalidInputError,
    KeyExistsError,
    KeyNotFoundError,
    SigningError,
)
from hsm_keys.keystore.software import verify_signature
from hsm_keys.types import Binding, KeyInfo, KeySpec, PublicKey, SignatureAlgorithm

LABEL_PREFIX = "hsm-keys"


def make_label(binding: Binding, spec: KeySpec, created_at: dt.datetime) -> str:
    """``hsm-keys/<account>/<staff>/<spec>/<created epoch>``; '/' cannot occur in a valid staff id."""
    epoch = int(created_at.timestamp())
    return f"{LABEL_PREFIX}/{binding.account}/{binding.staff}/{spec.value}/{epoch}"


def parse_label(label: str) -> tuple[Binding, KeySpec, dt.datetime] | None:
    """Inverse of ``make_label``; None for objects this library did not create."""
    parts = label.split("/")
    if len(parts) != 5 or parts[0] != LABEL_PREFIX:
        return None
    try:
        binding = Binding(staff=parts[2], account=parts[1])
        spec = KeySpec(parts[3])
        created = dt.datetime.fromtimestamp(int(parts[4]), tz=dt.UTC)
    except (HsmKeysError, ValueError, OverflowError, OSError):
        return None
    return binding, spec, created


@dataclass(frozen=True)
class SignResult:
    """One item's outcome in a batch: exactly one of ``signature`` and ``error`` is set."""

    index: int
    signature: bytes | None = None
    error: HsmKeysError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_ALGORITHMS_BY_NAME = {alg.value.lower(): alg for alg in SignatureAlgorithm}
_ALLOWED_PAIRS: set[tuple[SignatureAlgorithm, KeySpec]] = set()


def _parse_algorithm(alg: SignatureAlgorithm | str) -> SignatureAlgorithm:
    """``SignatureAlgorithm.parse`` with a dictionary in front: it runs once per signature."""
    if isinstance(alg, SignatureAlgorithm):
        return alg
    found = _ALGORITHMS_BY_NAME.get(alg.lower()) if isinstance(alg, str) else None
    return found if found is not None else SignatureAlgorithm.parse(alg)


def _check_spec(alg: SignatureAlgorithm, spec: KeySpec) -> None:
    """``alg.check_spec(spec)``, remembering the pairs that passed."""
    if (alg, spec) not in _ALLOWED_PAIRS:
        alg.check_spec(spec)
        _ALLOWED_PAIRS.add((alg, spec))


def _check_message(message: object, index: int) -> bytes:
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise InvalidInputError(f"message {index} is {type(message).__name__}, expected bytes")


class KeyStore(abc.ABC):
    """Keys bound to (staff, account) pairs, signing in JOSE form. Thread-safe."""

    #: Short name used in CLIs, logs and the contract tests.
    backend_name: str = "abstract"

    def __init__(self) -> None:
        self._generate_lock = threading.Lock()
        self._closed = False

    # -- primitives each backend provides -------------------------------------------------------

    @abc.abstractmethod
    def _generate(self, spec: KeySpec, binding: Binding, label: str, created_at: dt.datetime) -> KeyInfo:
        """Create the key pair; the caller has checked the binding has none."""

    @abc.abstractmethod
    def _load(self, kid: str) -> KeyInfo | None:
        """The key with this kid, or None."""

    @abc.abstractmethod
    def _all(self) -> list[KeyInfo]:
        """Every key this library created in the store."""

    @abc.abstractmethod
    def _sign_batch(
        self, info: KeyInfo, messages: Sequence[bytes], alg: SignatureAlgorithm, workers: int | None
    ) -> list[bytes | HsmKeysError]:
        """Sign each message; return a signature or the item's own error, in order."""

    @abc.abstractmethod
    def _destroy(self, info: KeyInfo) -> None:
        """Delete both halves of the key."""

    def _rivals(self, info: KeyInfo) -> list[str]:
        """Other keys of ``info``'s binding (kids, or labels of keys still being written)."""
        return [
            other.kid
            for other in self._all()
            if other.binding.same_as(info.binding) and other.kid != info.kid
        ]

    def _close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release backend resources (sessions, handles)."""

    # -- public API -----------------------------------------------------------------------------

    def generate(self, spec: KeySpec, binding: Binding, *, now: dt.datetime | None = None) -> KeyInfo:
        """Generate the binding's key inside the store. One key per binding (case-insensitive staff)."""
        if not isinstance(spec, KeySpec):
            raise InvalidInputError(f"spec must be a KeySpec, got {spec!r}")
        if not isinstance(binding, Binding):
            raise InvalidInputError(f"binding must be a Binding, got {binding!r}")
        self._check_open()
        created_at = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        with self._generate_lock:
            existing = self.find(binding)
            if existing is not None:
                raise KeyExistsError(
                    f"{binding} already has key {existing.kid} (label {existing.label!r}); "
                    "destroy it first (hsm-keys keys destroy KID --yes) or revoke the grant"
                )
            info = self._generate(spec, binding, make_label(binding, spec, created_at), created_at)
            # Another process (or store object) on the same token may have generated for the same
            # binding between our check and our write; nothing in PKCS#11 locks across them. Every
            # writer checks again after writing and withdraws its own key if it sees another, so
            # two keys never both stand (at worst both withdraw and the caller retries).
            rivals = self._rivals(info)
            if rivals:
                self._destroy(info)
                raise KeyExistsError(
                    f"{binding} got key {rivals[0]} from another writer while this one was "
                    "generating; this attempt's key was destroyed (retry if that key is gone too)"
                )
            return info

    def get(self, kid: str) -> KeyInfo:
        self._check_open()
        info = self._load(kid) if isinstance(kid, str) and kid else None
        if info is None:
            raise KeyNotFoundError(f"no key with kid {kid!r} in the {self.backend_name} store")
        return info

    def find(self, binding: Binding) -> KeyInfo | None:
        """The binding's key, matching the staff id case-insensitively as IAM does."""
        self._check_open()
        matches = [info for info in self._all() if info.binding.same_as(binding)]
        return min(matches, key=lambda info: (info.created_at, info.kid)) if matches else None

    def list_keys(self) -> list[KeyInfo]:
        self._check_open()
        return sorted(self._all(), key=lambda info: (info.binding.key, info.created_at, info.kid))

    def public_key(self, kid: str) -> PublicKey:
        return self.get(kid).public_key

    def sign(self, kid: str, message: bytes, alg: SignatureAlgorithm | str, *, verify: bool = False) -> bytes:
        """A batch of one: same checks and outcome as ``sign_many(kid, [message], alg)[0]``.

        Written out rather than delegated because it is the hot path of token minting: no
        ``SignResult``, and backends never hop to another thread or process for a batch of one.
        """
        algorithm = _parse_algorithm(alg)
        payload = _check_message(message, 0)
        info = self.get(kid)
        _check_spec(algorithm, info.spec)
        outcome = self._sign_batch(info, (payload,), algorithm, 1)[0]
        if isinstance(outcome, HsmKeysError):
            raise outcome
        if verify and not verify_signature(info.public_key, outcome, payload, algorithm):
            raise SigningError("item 0: the store returned a signature that does not verify")
        return outcome

    def sign_many(
        self,
        kid: str,
        messages: Sequence[bytes],
        alg: SignatureAlgorithm | str,
        *,
        workers: int | None = None,
        verify: bool = False,
    ) -> list[bytes]:
        """Signatures in the order of ``messages``; raises ``SigningError`` (with every item's outcome)
        if any item failed."""
        results = self.sign_many_results(kid, messages, alg, workers=workers, verify=verify)
        failures = [r for r in results if r.error is not None]
        if failures:
            first = failures[0]
            if len(results) == 1 and first.error is not None:
                raise first.error
            raise SigningError(
                f"{len(failures)} of {len(results)} signatures failed; "
                f"first (item {first.index}): {first.error}",
                results,
            ) from first.error
        return [r.signature for r in results if r.signature is not None]

    def sign_many_results(
        self,
        kid: str,
        messages: Sequence[bytes],
        alg: SignatureAlgorithm | str,
        *,
        workers: int | None = None,
        verify: bool = False,
    ) -> list[SignResult]:
        """One ``SignResult`` per message, in order; never raises for a single item's failure.

        Errors that concern the whole batch (unknown kid, wrong algorithm for the key, closed store)
        are raised before anything is signed.
        """
        algorithm = _parse_algorithm(alg)
        if isinstance(messages, (bytes, bytearray, str)):
            raise InvalidInputError("messages must be a sequence of bytes objects, not a single message")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise InvalidInputError(f"workers must be a positive integer, got {workers!r}")
        payloads = [_check_message(m, i) for i, m in enumerate(messages)]
        info = self.get(kid)
        _check_spec(algorithm, info.spec)
        if not payloads:
            return []
        outcomes = self._sign_batch(info, payloads, algorithm, workers)
        results: list[SignResult] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, HsmKeysError):
                results.append(SignResult(index, error=outcome))
            elif verify and not verify_signature(info.public_key, outcome, payloads[index], algorithm):
                results.append(
                    SignResult(
                        index,
                        error=SigningError(
                            f"item {index}: the store returned a signature that does not verify"
                        ),
                    )
                )
            else:
                results.append(SignResult(index, signature=outcome))
        return results

    async def asign(
        self, kid: str, message: bytes, alg: SignatureAlgorithm | str, *, verify: bool = False
    ) -> bytes:
        """``sign`` without blocking the event loop (runs in the default executor)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, functools.partial(self.sign, kid, message, alg, verify=verify)
        )

    async def asign_many(
        self,
        kid: str,
        messages: Sequence[bytes],
        alg: SignatureAlgorithm | str,
        *,
        workers: int | None = None,
        verify: bool = False,
    ) -> list[bytes]:
        loop = asyncio.get_running_loop()
        call = functools.partial(self.sign_many, kid, messages, alg, workers=workers, verify=verify)
        return await loop.run_in_executor(None, call)

    def destroy(self, kid: str) -> None:
        """Destroy the key; a kid that is already gone raises ``KeyNotFoundError``."""
        info = self.get(kid)
        with self._generate_lock:
            self._destroy(info)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError(f"the {self.backend_name} key store is closed")

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        self.close()
        return False
