"""PKCS#11 key store over python-pkcs11: SoftHSM by default, CloudHSM or any other module by path.

Facts we rely on (measured; see DESIGN.md): the module is initialised with OS locking so threads can
sign on separate sessions; the application logs in once (``C_Login`` through ctypes, already-logged-in
counts as success) and no session's close ever logs out the others; tokens are found by label;
key handles are cached per session; mechanisms are chosen from what the token reports.
PKCS#11 errors are translated into the ``hsm_keys.errors`` tree in exactly one place, ``_translate``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import logging
import os
import random
import secrets
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from hsm_keys.encoding.base64url import b64url_decode, b64url_encode
from hsm_keys.encoding.ec_points import (
    public_key_from_ec_point,
    rsa_public_key_from_attributes,
    spec_of_public_key,
)
from hsm_keys.encoding.jwk import jwk_thumbprint, jwk_thumbprint_bytes
from hsm_keys.errors import (
    ConfigurationError,
    EncodingError,
    HsmKeysError,
    InvalidInputError,
    KeyNotFoundError,
    KeyStoreError,
    LoginError,
    MechanismNotSupportedError,
    SessionError,
    TokenNotFoundError,
)
from hsm_keys.keystore import _cryptoki
from hsm_keys.keystore.base import LABEL_PREFIX, KeyStore, _parse_algorithm, parse_label
from hsm_keys.keystore.pool import PooledSession, SessionPool
from hsm_keys.keystore.workers import ProcessSigner, WorkerConfig
from hsm_keys.types import Binding, KeyInfo, KeySpec, KeyType, PublicKey, SignatureAlgorithm

T = TypeVar("T")
_log = logging.getLogger(__name__)

SOFTHSM_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

ENV_MODULE = "HSM_KEYS_PKCS11_MODULE"
ENV_TOKEN = "HSM_KEYS_TOKEN_LABEL"
ENV_PIN = "HSM_KEYS_PIN"
ENV_PIN_FILE = "HSM_KEYS_PIN_FILE"
ENV_URI = "HSM_KEYS_PKCS11_URI"

# -- templates and mechanisms as data -------------------------------------------------------------

# Token objects, private, sensitive, never extractable, sign-only; the public half verify-only.
PRIVATE_KEY_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.SIGN_RECOVER: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# No copy can be made (a copy could be given weaker attributes). PKCS#11 2.40; tokens that do not
# know the attribute generate without it. CKA_MODIFIABLE stays true, and cannot be cleared later:
# the CKA_ID (the thumbprint) is only known, and written, after generation. The token itself keeps
# SENSITIVE from being cleared and EXTRACTABLE from being set, so the key still never leaves it.
PRIVATE_KEY_HARDENING: Mapping[Attribute, Any] = {Attribute.COPYABLE: False}
PUBLIC_KEY_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.VERIFY_RECOVER: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}

# PKCS#11 3.0 names Ed25519 parameters either by the curve's OID or by the PrintableString
# "edwards25519"; tokens differ in which they accept, so both are tried in this order.
_ED25519_PARAMS = (
    bytes.fromhex("06032b6570"),  # OID 1.3.101.112
    bytes.fromhex("130c") + b"edwards25519",
)

_EC_CURVE_NAMES = {KeySpec.EC_P256: "secp256r1", KeySpec.EC_P384: "secp384r1", KeySpec.EC_P521: "secp521r1"}


@dataclass(frozen=True)
class MechanismChoice:
    """How to compute one JOSE algorithm on a token.

    ``prehash``: hash in software and give the token the digest (wrapped in a DigestInfo for
    RSA PKCS#1 v1.5), for tokens without the combined hash-and-sign mechanism.
    """

    mechanism: Mechanism
    prehash: bool
    param: Any = None


def _pss(hash_mech: Mechanism, mgf: Any, salt: int) -> tuple[Mechanism, Any, int]:
    return (hash_mech, mgf, salt)


# Preference order per algorithm: combined mechanism first, software hash + raw mechanism second.
_CANDIDATES: Mapping[SignatureAlgorithm, tuple[MechanismChoice, ...]] = {
    SignatureAlgorithm.RS256: (
        MechanismChoice(Mechanism.SHA256_RSA_PKCS, False),
        MechanismChoice(Mechanism.RSA_PKCS, True),
    ),
    SignatureAlgorithm.RS384: (
        MechanismChoice(Mechanism.SHA384_RSA_PKCS, False),
        MechanismChoice(Mechanism.RSA_PKCS, True),
    ),
    SignatureAlgorithm.RS512: (
        MechanismChoice(Mechanism.SHA512_RSA_PKCS, False),
        MechanismChoice(Mechanism.RSA_PKCS, True),
    ),
    SignatureAlgorithm.PS256: (
        MechanismChoice(Mechanism.SHA256_RSA_PKCS_PSS, False, _pss(Mechanism.SHA256, pkcs11.MGF.SHA256, 32)),
        MechanismChoice(Mechanism.RSA_PKCS_PSS, True, _pss(Mechanism.SHA256, pkcs11.MGF.SHA256, 32)),
    ),
    SignatureAlgorithm.PS384: (
        MechanismChoice(Mechanism.SHA384_RSA_PKCS_PSS, False, _pss(Mechanism.SHA384, pkcs11.MGF.SHA384, 48)),
        MechanismChoice(Mechanism.RSA_PKCS_PSS, True, _pss(Mechanism.SHA384, pkcs11.MGF.SHA384, 48)),
    ),
    SignatureAlgorithm.PS512: (
        MechanismChoice(Mechanism.SHA512_RSA_PKCS_PSS, False, _pss(Mechanism.SHA512, pkcs11.MGF.SHA512, 64)),
        MechanismChoice(Mechanism.RSA_PKCS_PSS, True, _pss(Mechanism.SHA512, pkcs11.MGF.SHA512, 64)),
    ),
    SignatureAlgorithm.ES256: (
        MechanismChoice(Mechanism.ECDSA_SHA256, False),
        MechanismChoice(Mechanism.ECDSA, True),
    ),
    SignatureAlgorithm.ES384: (
        MechanismChoice(Mechanism.ECDSA_SHA384, False),
        MechanismChoice(Mechanism.ECDSA, True),
    ),
    SignatureAlgorithm.ES512: (
        MechanismChoice(Mechanism.ECDSA_SHA512, False),
        MechanismChoice(Mechanism.ECDSA, True),
    ),
    SignatureAlgorithm.EdDSA: (MechanismChoice(Mechanism.EDDSA, False),),
}

# RFC 8017 section 9.2 note 1: DER DigestInfo prefixes, for RSA PKCS#1 v1.5 over a software digest.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _input_transform(choice: MechanismChoice, alg: SignatureAlgorithm) -> Callable[[bytes], bytes]:
    """What the token is given for a message: the message, its digest, or a DigestInfo.

    Built once per algorithm: ``hashlib.sha256`` is markedly faster per call than
    ``hashlib.new("sha256")``, and this runs once per signature.
    """
    if not choice.prehash or alg.hash_name is None:
        return _identity
    hash_function = getattr(hashlib, alg.hash_name)
    if choice.mechanism == Mechanism.RSA_PKCS:
        prefix = _DIGEST_INFO_PREFIX[alg.hash_name]
        return lambda message: prefix + hash_function(message).digest()
    return lambda message: hash_function(message).digest()


def _identity(message: bytes) -> bytes:
    return message


# -- retry policy: vendor behaviour as data (crypto11 style: quirks are settings, not subclasses) ---

# Return values after which a session is presumed dead: it is discarded, a fresh one (with the login
# re-established if the token lost it) is opened, and the item is retried.
DEFAULT_SESSION_ERRORS: tuple[str, ...] = (
    "CKR_SESSION_HANDLE_INVALID",
    "CKR_SESSION_CLOSED",
    "CKR_DEVICE_ERROR",
    "CKR_DEVICE_REMOVED",
    "CKR_DEVICE_MEMORY",
    "CKR_TOKEN_NOT_PRESENT",
    "CKR_SESSION_COUNT",
    "CKR_USER_NOT_LOGGED_IN",
)

# AWS CloudHSM reports "HSM busy" (throttling) as CKR_FUNCTION_FAILED (Client SDK 5) or
# CKR_OPERATION_ACTIVE (SDK 3). The session is fine: back off and retry on the same session.
CLOUDHSM_THROTTLE_ERRORS: tuple[str, ...] = ("CKR_FUNCTION_FAILED", "CKR_OPERATION_ACTIVE")

_UNMAPPED_PREFIX = "Unmapped error code "


def _exception_class(name: str) -> type[Exception]:
    """python-pkcs11's exception class for a ``CKR_*`` name (CKR_FUNCTION_FAILED -> FunctionFailed)."""
    if not name.startswith("CKR_"):
        raise ConfigurationError(f"retry settings name PKCS#11 return values (CKR_...), got {name!r}")
    camel = "".join(part.capitalize() for part in name[4:].split("_"))
    found = getattr(p11e, camel, None)
    if not (isinstance(found, type) and issubclass(found, p11e.PKCS11Error)):
        raise ConfigurationError(f"python-pkcs11 has no exception for {name}; give its numeric value")
    return found


@dataclass(frozen=True)
class ErrorSet:
    """A set of PKCS#11 failures, named by ``CKR_*`` name or numeric value (vendor-defined codes)."""

    classes: tuple[type[Exception], ...] = ()
    codes: frozenset[int] = frozenset()

    @classmethod
    def of(cls, values: Iterable[str | int]) -> ErrorSet:
        classes: list[type[Exception]] = []
        codes: set[int] = set()
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ConfigurationError(f"expected a CKR_* name or a number, got {value!r}")
            if isinstance(value, int):
                codes.add(value)
            else:
                classes.append(_exception_class(value))
        return cls(tuple(classes), frozenset(codes))

    def matches(self, exc: BaseException) -> bool:
        if isinstance(exc, self.classes):
            return True
        if self.codes and type(exc) is p11e.PKCS11Error and str(exc).startswith(_UNMAPPED_PREFIX):
            try:
                return int(str(exc)[len(_UNMAPPED_PREFIX) :], 16) in self.codes
            except ValueError:
                return False
        return False


@dataclass(frozen=True)
class Quirks:
    """How this token fails, as configuration.

    ``session_errors``: the session is dead; replace it and retry the item.
    ``throttle_errors``: the token is busy; wait (exponential backoff from ``throttle_backoff``
    seconds, with jitter) and retry on the same session.
    Both share the store's ``max_retries`` budget per item, so no failure loops for ever.
    """

    session_errors: tuple[str | int, ...] = DEFAULT_SESSION_ERRORS
    throttle_errors: tuple[str | int, ...] = ()
    throttle_backoff: float = 0.01

    def __post_init__(self) -> None:
        if self.throttle_backoff < 0:
            raise ConfigurationError(f"throttle_backoff must not be negative, got {self.throttle_backoff}")
        ErrorSet.of(self.session_errors)  # fail at construction on a misspelt name
        ErrorSet.of(self.throttle_errors)

    @classmethod
    def cloudhsm(cls) -> Quirks:
        """AWS CloudHSM: busy errors are throttling (see CLOUDHSM_THROTTLE_ERRORS)."""
        return cls(throttle_errors=CLOUDHSM_THROTTLE_ERRORS, throttle_backoff=0.05)


# What a failed item attempt means for the retry loop.
_SESSION, _THROTTLE, _STALE_HANDLE = "session", "throttle", "stale-handle"


@dataclass(frozen=True)
class _RetryPolicy:
    session: ErrorSet
    throttle: ErrorSet
    backoff: float
    max_retries: int

    @classmethod
    def of(cls, quirks: Quirks, max_retries: int) -> _RetryPolicy:
        return cls(
            ErrorSet.of(quirks.session_errors),
            ErrorSet.of(quirks.throttle_errors),
            quirks.throttle_backoff,
            max_retries,
        )

    def classify(self, exc: BaseException) -> str | None:
        """``_SESSION`` / ``_THROTTLE`` / ``_STALE_HANDLE`` for retryable failures, else None."""
        if isinstance(exc, SessionError) or self.session.matches(exc):
            return _SESSION
        if self.throttle.matches(exc):
            return _THROTTLE
        if isinstance(exc, (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid)):
            return _STALE_HANDLE
        return None

    def pause(self, attempt: int) -> None:
        """Exponential backoff with full jitter, so retrying workers do not stampede together."""
        if self.backoff > 0:
            time.sleep(random.uniform(0, self.backoff * (2 ** (attempt - 1))))  # noqa: S311


# -- error translation: the one place ------------------------------------------------------------

# Failures translated to ``SessionError`` (transient: the pool replaces the session).
RETRYABLE_SESSION_ERRORS: tuple[type[Exception], ...] = ErrorSet.of(DEFAULT_SESSION_ERRORS).classes

_ERROR_MAP: tuple[tuple[tuple[type[Exception], ...], type[HsmKeysError]], ...] = (
    (
        (
            p11e.PinIncorrect,
            p11e.PinInvalid,
            p11e.PinLenRange,
            p11e.PinExpired,
            p11e.PinLocked,
            p11e.UserPinNotInitialized,
            p11e.UserNotLoggedIn,
            p11e.AnotherUserAlreadyLoggedIn,
        ),
        LoginError,
    ),
    (RETRYABLE_SESSION_ERRORS, SessionError),
    (
        (
            p11e.MechanismInvalid,
            p11e.MechanismParamInvalid,
            p11e.KeyTypeInconsistent,
            p11e.FunctionNotSupported,
        ),
        MechanismNotSupportedError,
    ),
    ((p11e.NoSuchKey, p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid), KeyNotFoundError),
    ((p11e.NoSuchToken,), TokenNotFoundError),
)

_RV_MAP: dict[int, tuple[type[HsmKeysError], str]] = {
    _cryptoki.CKR_PIN_INCORRECT: (LoginError, "the token refused the PIN (incorrect PIN)"),
    _cryptoki.CKR_PIN_LOCKED: (LoginError, "the token's user PIN is locked"),
}


def _translate(exc: BaseException, doing: str) -> HsmKeysError:
    """Map a python-pkcs11 (or raw ctypes) failure to our tree. Messages never carry a PIN."""
    if isinstance(exc, HsmKeysError):
        return exc
    if isinstance(exc, _cryptoki.CryptokiCallError):
        rv_type, text = _RV_MAP.get(exc.rv, (KeyStoreError, str(exc)))
        return rv_type(f"{doing}: {text}")
    name = type(exc).__name__
    for classes, error_type in _ERROR_MAP:
        if isinstance(exc, classes):
            return error_type(f"{doing}: PKCS#11 {name}")
    detail = f" ({exc})" if str(exc) else ""
    return KeyStoreError(f"{doing}: PKCS#11 {name}{detail}")


# -- configuration --------------------------------------------------------------------------------


class Pin:
    """A PIN that never shows itself in reprs, logs or tracebacks' locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigurationError("the PIN must be a non-empty string")
        self._value = value

    def reveal(self) -> bytes:
        return self._value.encode("utf-8")

    def __repr__(self) -> str:
        return "Pin(***)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a PIN cannot be pickled")


class _LoginRegistry:
    """Which PIN last logged this process in to each token, as a keyed digest.

    PKCS#11 login belongs to the application: while any session of this process is logged in,
    ``C_Login`` answers USER_ALREADY_LOGGED_IN without looking at the PIN. Without this record a
    store built with a wrong PIN would work as long as another store held the login.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._digests: dict[tuple[str, int, bytes], bytes] = {}

    def _digest(self, pin: Pin) -> bytes:
        return hmac.new(self._secret, pin.reveal(), hashlib.sha256).digest()

    def check(self, token: tuple[str, int, bytes], pin: Pin, *, checked: bool) -> None:
        digest = self._digest(pin)
        with self._lock:
            if checked:
                self._digests[token] = digest
                return
            known = self._digests.get(token)
        # No record: the login was made outside hsm_keys, whose PIN we cannot compare.
        if known is not None and not hmac.compare_digest(known, digest):
            raise LoginError(
                "logging in: the token is already logged in by this process with a different PIN, "
                "so this store's PIN was not accepted"
            )


_LOGINS = _LoginRegistry()


def find_softhsm_module() -> str | None:
    return next((path for path in SOFTHSM_PATHS if os.path.exists(path)), None)


def _read_pin_source(source: str) -> str:
    path = source[len("file:") :] if source.startswith("file:") else source
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the PIN file {path!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 ``pkcs11:`` URI this store uses."""

    token: str | None = None
    serial: str | None = None
    module_path: str | None = None
    pin: Pin | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not isinstance(uri, str) or not uri.lower().startswith("pkcs11:"):
            raise ConfigurationError("a PKCS#11 URI must start with 'pkcs11:'")
        body = uri[len("pkcs11:") :]
        path, _, query = body.partition("?")
        path_attrs = _uri_attributes(path, ";")
        query_attrs = _uri_attributes(query, "&")
        for attrs, supported, where in (
            (path_attrs, _URI_PATH_ATTRIBUTES, "path"),
            (query_attrs, _URI_QUERY_ATTRIBUTES, "query"),
        ):
            unsupported = sorted(set(attrs) - supported - _URI_OBJECT_ATTRIBUTES)
            if unsupported:
                # Refused rather than ignored: a dropped selector could pick a different token.
                raise ConfigurationError(
                    f"PKCS#11 URI {where} attribute(s) {', '.join(map(repr, unsupported))} not "
                    f"supported; this store selects a token by {', '.join(sorted(supported))}"
                )
        pin: Pin | None = None
        if "pin-value" in query_attrs:
            pin = Pin(query_attrs["pin-value"])
        elif "pin-source" in query_attrs:
            pin = Pin(_read_pin_source(query_attrs["pin-source"]))
        return cls(
            token=path_attrs.get("token"),
            serial=path_attrs.get("serial"),
            module_path=query_attrs.get("module-path"),
            pin=pin,
        )


_URI_PATH_ATTRIBUTES = frozenset({"token", "serial"})
_URI_QUERY_ATTRIBUTES = frozenset({"module-path", "pin-value", "pin-source"})
# A key's URI may configure the store: the store serves every key of the token it names.
_URI_OBJECT_ATTRIBUTES = frozenset({"id", "object", "type"})


def _uri_attributes(part: str, separator: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for item in filter(None, part.split(separator)):
        name, eq, value = item.partition("=")
        if not eq or not name:
            # Never echo the text: a malformed 'pin-value' would carry the PIN.
            raise ConfigurationError(
                f"malformed PKCS#11 URI: attribute {len(attrs) + 1} of its "
                f"{'query' if separator == '&' else 'path'} is not name=value"
            )
        attrs[name.strip().lower()] = urllib.parse.unquote(value)
    return attrs


# -- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handle:
    """What the store remembers of one key pair between calls."""

    info: KeyInfo
    object_id: bytes


Parallelism = Literal["threads", "processes", "auto"]
PARALLELISM_CHOICES: tuple[str, ...] = ("threads", "processes", "auto")

# Modules whose signing runs on this machine's CPUs (manufacturer ID prefixes). For them "auto"
# signs large batches in worker processes: SoftHSM's ECDSA scales only 1.4-1.7x across threads
# (contention inside the module) but about 1.9x across processes on 2 cores. Network HSMs
# (CloudHSM) wait on I/O with the GIL released, so threads are right there.
CPU_BOUND_MANUFACTURERS: tuple[str, ...] = ("SoftHSM",)

# "auto" uses processes only for batches at least this long: below it, a round trip to the workers
# costs more than it can save.
AUTO_PROCESS_MIN_BATCH = 32

# Listing again after an object vanished mid-listing (another process destroyed it).
_SCAN_ATTEMPTS = 5

# A key pair is written with a temporary CKA_ID, replaced by its thumbprint once the public key is
# read back. Another writer's pending pair still claims its binding, unless it is old enough to be
# the leftover of a crashed process.
_PENDING_ID_PREFIX = b"hsm-keys-pending-"
_PENDING_CLAIM = dt.timedelta(minutes=5)


def _rescanning(listing: Callable[[], T]) -> T:
    """Run a listing of token objects again when an object vanished while it ran.

    Another process destroyed an object after C_FindObjects found it: python-pkcs11 reads each
    object's class while iterating, and SoftHSM answers FUNCTION_FAILED for an object whose file is
    gone. A failure that persists over ``_SCAN_ATTEMPTS`` listings is real.
    """
    for attempt in itertools.count(1):
        try:
            return listing()
        except (p11e.ObjectHandleInvalid, p11e.FunctionFailed):
            if attempt >= _SCAN_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


_LIVE_STORES: weakref.WeakSet[Pkcs11KeyStore] = weakref.WeakSet()

# Forks this process descends from (counted by the at-fork hook): the signing hot path compares it
# instead of calling os.getpid(), a system call per signature. Other paths still check the pid.
_forks_seen = [0]


def _after_fork_in_child() -> None:
    """Make every store in a forked child safe to use: fresh locks, no inherited sessions or workers.

    A lock held by a parent thread at the moment of the fork stays held for ever in the child, so
    nothing here waits on one. The module itself is re-initialised lazily (``_ensure_process``).
    """
    _forks_seen[0] += 1
    for store in list(_LIVE_STORES):
        store._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Pkcs11KeyStore(KeyStore):
    """Keys inside a PKCS#11 token. Thread-safe; fork-safe (a child re-initialises the module).

    ``parallelism`` chooses how ``sign_many`` spreads a batch: ``"threads"`` (one session per
    thread, the GIL released in every module call), ``"processes"`` (worker processes, each with
    its own module initialisation, login and session), or ``"auto"`` (the default: processes for
    large batches on CPU-bound software tokens, threads otherwise). A batch of one never leaves
    the calling thread.
    """

    backend_name = "pkcs11"

    def __init__(
        self,
        module: str | None = None,
        token_label: str | None = None,
        pin: str | Pin | None = None,
        *,
        uri: str | None = None,
        pool_size: int | None = None,
        wait_timeout: float = 30.0,
        open_interval: float = 0.0,
        max_retries: int = 2,
        default_workers: int | None = None,
        parallelism: Parallelism = "auto",
        max_processes: int | None = None,
        worker_timeout: float = 60.0,
        quirks: Quirks | None = None,
    ) -> None:
        super().__init__()
        parsed = Pkcs11Uri.parse(uri) if uri else Pkcs11Uri()
        module = module or parsed.module_path or os.environ.get(ENV_MODULE) or find_softhsm_module()
        if not module:
            raise ConfigurationError(
                f"no PKCS#11 module: pass module=..., set {ENV_MODULE}, or install SoftHSM2 (softhsm2)"
            )
        if not os.path.exists(module):
            raise ConfigurationError(f"PKCS#11 module {module!r} does not exist")
        label = token_label or parsed.token or os.environ.get(ENV_TOKEN)
        if not label and not parsed.serial:
            raise ConfigurationError(f"no token label: pass token_label=..., or set {ENV_TOKEN}")
        if pin is None:
            pin = parsed.pin
        if pin is None and os.environ.get(ENV_PIN):
            pin = os.environ[ENV_PIN]
        if pin is None and os.environ.get(ENV_PIN_FILE):
            pin = _read_pin_source(os.environ[ENV_PIN_FILE])
        if pin is None:
            raise ConfigurationError(
                f"no PIN: pass pin=..., set {ENV_PIN} or {ENV_PIN_FILE}, or use pin-value"
            )
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if parallelism not in PARALLELISM_CHOICES:
            raise ConfigurationError(
                f"parallelism must be one of {', '.join(PARALLELISM_CHOICES)}, got {parallelism!r}"
            )
        if max_processes is not None and (not isinstance(max_processes, int) or max_processes < 1):
            raise ConfigurationError(f"max_processes must be a positive integer, got {max_processes!r}")
        if worker_timeout <= 0:
            raise ConfigurationError(f"worker_timeout must be positive, got {worker_timeout}")
        self.module_path = module
        self.token_label = label or ""
        self._serial = parsed.serial
        self._pin = pin if isinstance(pin, Pin) else Pin(pin)
        self._requested_pool_size = pool_size
        self._wait_timeout = wait_timeout
        self._open_interval = open_interval
        self.max_retries = max_retries
        self.default_workers = default_workers
        self.parallelism: Parallelism = parallelism
        self.max_processes = max_processes or os.cpu_count() or 1
        self.worker_timeout = worker_timeout
        self.quirks = quirks or Quirks()
        self._retry = _RetryPolicy.of(self.quirks, max_retries)
        self._state_lock = threading.RLock()
        self._handles: dict[str, _Handle] = {}
        self._mechanisms: dict[SignatureAlgorithm, MechanismChoice] = {}
        # (kid, alg as given) -> what a checked ``sign`` learnt: the hot path skips the checks.
        self._signers: dict[tuple[str, Any], tuple[SignatureAlgorithm, MechanismChoice]] = {}
        self._transforms: dict[SignatureAlgorithm, Callable[[bytes], bytes]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._processes: ProcessSigner | None = None
        self._pid = -1
        self._start()
        _LIVE_STORES.add(self)

    @classmethod
    def from_env(cls, **options: Any) -> Pkcs11KeyStore:
        """Configured by ``HSM_KEYS_PKCS11_URI`` or the separate ``HSM_KEYS_*`` variables."""
        return cls(uri=os.environ.get(ENV_URI) or None, **options)

    # -- start-up, fork safety --------------------------------------------------------------------

    def _start(self) -> None:
        """Load the module for this process, find the token, size the pool, log in."""
        try:
            self._lib = _cryptoki.load_module(self.module_path)
            self._token = self._find_token()
        except HsmKeysError:
            raise
        except Exception as exc:
            raise _translate(exc, f"loading PKCS#11 module {self.module_path}") from exc
        self._slot_id = int(self._token.slot.slot_id)
        self._login_key = (self.module_path, self._slot_id, bytes(self._token.serial))
        manufacturer = str(getattr(self._lib, "manufacturer_id", "") or "")
        self.cpu_bound = manufacturer.startswith(CPU_BOUND_MANUFACTURERS)
        max_sessions = self.token_session_limit()
        size = self._requested_pool_size or min(8, max(2, (os.cpu_count() or 2) * 2))
        if max_sessions is not None:
            size = min(size, max_sessions)
        self._pid = os.getpid()
        self._forks = _forks_seen[0]
        self._signers.clear()
        self._handles.clear()  # object handles belong to the previous process's module state
        self._pool: SessionPool[Any] = SessionPool(
            self._open_session,
            self._close_session,
            max_size=size,
            wait_timeout=self._wait_timeout,
            open_interval=self._open_interval,
        )
        # Log in now so a bad PIN fails at construction, and keep this session idle in the pool:
        # the login lasts as long as one session of the application stays open. (PKCS#11 login is
        # per application: while another store in this process is logged in to the same token, the
        # token answers USER_ALREADY_LOGGED_IN without checking this store's PIN.)
        self._with_session(f"logging in to token {self.token_label or self._serial!r}", lambda pooled: None)

    def _ensure_process(self) -> None:
        """After a fork, start afresh in this process; the parent's sessions are never touched."""
        if self._pid != os.getpid():
            with self._state_lock:
                if self._pid != os.getpid():
                    self._reset_after_fork()
                    self._start()

    def _reset_after_fork(self) -> None:
        """Drop what belongs to the parent without closing it: closing a session handle here could
        close (or log out) a session the child's own re-initialised module has since given the same
        number, and the workers and thread pool are the parent's to stop. Takes no lock."""
        self._state_lock = threading.RLock()
        self._generate_lock = threading.Lock()
        self._pool.abandon()
        self._executor = None
        if self._processes is not None:
            self._processes.abandon()
            self._processes = None

    def _find_token(self) -> Any:
        seen: list[str] = []
        for attempt in range(_cryptoki.START_ATTEMPTS):
            seen = []
            for slot in self._lib.get_slots(token_present=True):
                token = slot.get_token()
                serial = token.serial.decode("ascii", "replace").strip()
                if self._serial and serial != self._serial:
                    seen.append(token.label or "<uninitialised>")
                    continue
                if not self.token_label or token.label == self.token_label:
                    return token
                seen.append(token.label or "<uninitialised>")
            if attempt + 1 < _cryptoki.START_ATTEMPTS:
                # Another process initialising the same token store can briefly hide it.
                threading.Event().wait(_cryptoki.START_BACKOFF_SECONDS * (attempt + 1))
        conf = os.environ.get("SOFTHSM2_CONF", "<unset>")
        wanted = f"label {self.token_label!r}" if self.token_label else f"serial {self._serial!r}"
        raise TokenNotFoundError(
            f"no token with {wanted} in {self.module_path}; tokens seen: "
            f"{', '.join(repr(s) for s in seen) or 'none'}; SOFTHSM2_CONF={conf}"
        )

    def token_session_limit(self) -> int | None:
        info = self._lib.token_info(int(self._token.slot.slot_id))
        limit = int(info.ulMaxRwSessionCount)
        if limit in (_cryptoki.CK_EFFECTIVELY_INFINITE, _cryptoki.CK_UNAVAILABLE_INFORMATION):
            return None
        return limit

    def token_session_count(self) -> int:
        """Sessions open on the token, by every application (for leak checks)."""
        return int(self._lib.token_info(self._slot_id).ulSessionCount)

    def _open_session(self) -> Any:
        try:
            session = self._token.open(rw=True)
        except Exception as exc:
            raise _translate(exc, "opening a session") from exc
        try:
            checked = self._lib.login(session.handle, self._pin.reveal())
            _LOGINS.check(self._login_key, self._pin, checked=checked)
        except Exception as exc:
            self._close_session(session)
            raise _translate(exc, "logging in") from exc
        return session

    @staticmethod
    def _close_session(session: Any) -> None:
        # Sessions are opened without a PIN, so python-pkcs11's close() never logs out.
        session.close()

    @property
    def pool(self) -> SessionPool[Any]:
        return self._pool

    # -- sessions and retries ---------------------------------------------------------------------

    def _with_session(self, doing: str, work: Callable[[PooledSession[Any]], T]) -> T:
        """Run ``work`` on a borrowed session; replace a broken session (or wait out throttling)
        and retry, at most ``max_retries`` times."""
        attempt = 0
        while True:
            self._ensure_process()
            pooled = self._pool.acquire()
            try:
                result = work(pooled)
            except Exception as exc:
                kind = self._retry.classify(exc)
                self._pool.release(pooled, broken=kind == _SESSION)
                if kind in (_SESSION, _THROTTLE) and attempt < self.max_retries:
                    attempt += 1
                    if kind == _THROTTLE:
                        self._retry.pause(attempt)
                    continue
                raise _translate(exc, doing) from exc
            except BaseException:
                self._pool.release(pooled, broken=True)  # interrupted mid-call: state unknown
                raise
            self._pool.release(pooled)
            return result

    # -- KeyStore primitives ----------------------------------------------------------------------

    def _generate(self, spec: KeySpec, binding: Binding, label: str, created_at: dt.datetime) -> KeyInfo:
        def work(pooled: PooledSession[Any]) -> KeyInfo:
            session = pooled.session
            temporary_id = _PENDING_ID_PREFIX + secrets.token_bytes(8)
            public, private = self._generate_pair(session, spec, label, temporary_id)
            try:
                public_key = self._public_key_of(public, spec)
                object_id = jwk_thumbprint_bytes(public_key)
                public[Attribute.ID] = object_id
                private[Attribute.ID] = object_id
            except BaseException:
                # Nothing half-made stays behind.
                for obj in (private, public):
                    try:
                        obj.destroy()
                    except Exception:  # noqa: S112 - best effort; the original error matters
                        continue
                raise
            info = KeyInfo(
                kid=jwk_thumbprint(public_key),
                spec=spec,
                binding=binding,
                label=label,
                created_at=created_at,
                public_key=public_key,
            )
            with self._state_lock:
                self._handles[info.kid] = _Handle(info, object_id)
            pooled.keys[info.kid] = private
            return info

        return self._with_session(f"generating a {spec.value} key for {binding}", work)

    @staticmethod
    def _generate_pair(session: Any, spec: KeySpec, label: str, object_id: bytes) -> tuple[Any, Any]:
        try:
            return Pkcs11KeyStore._generate_pair_with(session, spec, label, object_id, PRIVATE_KEY_HARDENING)
        except p11e.AttributeTypeInvalid:
            return Pkcs11KeyStore._generate_pair_with(session, spec, label, object_id, {})

    @staticmethod
    def _generate_pair_with(
        session: Any, spec: KeySpec, label: str, object_id: bytes, hardening: Mapping[Attribute, Any]
    ) -> tuple[Any, Any]:
        common = {Attribute.LABEL: label, Attribute.ID: object_id}
        public_template = {**PUBLIC_KEY_TEMPLATE, **common}
        private_template = {**PRIVATE_KEY_TEMPLATE, **hardening, **common}
        flags = MechanismFlag.SIGN | MechanismFlag.VERIFY
        if spec.key_type is KeyType.RSA:
            public_template[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
            return tuple(
                session.generate_keypair(
                    P11KeyType.RSA,
                    spec.size,
                    store=True,
                    capabilities=flags,
                    public_template=public_template,
                    private_template=private_template,
                )
            )
        if spec.key_type is KeyType.EC:
            params_options: Iterable[bytes] = (encode_named_curve_parameters(_EC_CURVE_NAMES[spec]),)
            key_type, mechanism = P11KeyType.EC, Mechanism.EC_KEY_PAIR_GEN
        else:
            params_options = _ED25519_PARAMS
            key_type, mechanism = P11KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        last: Exception | None = None
        for params in params_options:
            try:
                domain = session.create_domain_parameters(key_type, {Attribute.EC_PARAMS: params}, local=True)
                return tuple(
                    domain.generate_keypair(
                        store=True,
                        capabilities=flags,
                        mechanism=mechanism,
                        public_template=public_template,
                        private_template=private_template,
                    )
                )
            except (p11e.DomainParamsInvalid, p11e.AttributeValueInvalid, p11e.TemplateInconsistent) as exc:
                last = exc
        assert last is not None
        raise last

    @staticmethod
    def _public_key_of(public: Any, spec: KeySpec) -> PublicKey:
        """The public key a token object holds, which must be of the spec its label names."""
        if spec.key_type is KeyType.RSA:
            key: PublicKey = rsa_public_key_from_attributes(
                public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
            )
        else:
            key = public_key_from_ec_point(public[Attribute.EC_POINT], public[Attribute.EC_PARAMS])
        actual = spec_of_public_key(key)
        if actual is not spec:
            raise EncodingError(f"the object's label says {spec.value} but it holds a {actual.value} key")
        return key

    def _scan(self, session: Any, object_id: bytes | None = None) -> list[_Handle]:
        """Read this library's public-key objects; reuse what is already known by object id."""
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TOKEN: True}
        if object_id is not None:
            template[Attribute.ID] = object_id
        return _rescanning(lambda: self._scan_once(session, template))

    def _scan_once(self, session: Any, template: Mapping[Attribute, Any]) -> list[_Handle]:
        with self._state_lock:
            known = {h.object_id: h for h in self._handles.values()}
        found: list[_Handle] = []
        for obj in session.get_objects(template):
            label = obj[Attribute.LABEL]
            if not label.startswith(LABEL_PREFIX + "/"):
                continue
            oid = bytes(obj[Attribute.ID])
            parsed = parse_label(label)
            if parsed is None:
                continue
            handle = known.get(oid)
            if handle is None or handle.info.label != label:
                binding, spec, created = parsed
                try:
                    public_key = self._public_key_of(obj, spec)
                except EncodingError as exc:
                    # Another tool's object under our label prefix must not break every listing.
                    _log.warning("skipping public-key object %r: %s", label, exc)
                    continue
                if oid != jwk_thumbprint_bytes(public_key):
                    # Signing finds the private key by CKA_ID: an ID that is not this key's
                    # thumbprint would make the kid name another key.
                    _log.warning("skipping public-key object %r: its CKA_ID is not its thumbprint", label)
                    continue
                kid = jwk_thumbprint(public_key)
                info = KeyInfo(kid, spec, binding, label, created, public_key)
                handle = _Handle(info, oid)
            found.append(handle)
        return found

    def _rivals(self, info: KeyInfo) -> list[str]:
        def work(pooled: PooledSession[Any]) -> list[tuple[str, bytes]]:
            template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TOKEN: True}
            return _rescanning(
                lambda: [
                    (o[Attribute.LABEL], bytes(o[Attribute.ID])) for o in pooled.session.get_objects(template)
                ]
            )

        own_id = jwk_thumbprint_bytes(info.public_key)
        cutoff = dt.datetime.now(dt.UTC) - _PENDING_CLAIM
        rivals: list[str] = []
        for label, object_id in self._with_session("checking for concurrent writers", work):
            parsed = parse_label(label) if label.startswith(LABEL_PREFIX + "/") else None
            if parsed is None or object_id == own_id or not parsed[0].same_as(info.binding):
                continue
            if object_id.startswith(_PENDING_ID_PREFIX):
                if parsed[2] >= cutoff:
                    rivals.append(f"(being written: {label})")
            else:
                rivals.append(b64url_encode(object_id))
        return rivals

    def _all(self) -> list[KeyInfo]:
        def work(pooled: PooledSession[Any]) -> list[_Handle]:
            return self._scan(pooled.session)

        handles = self._with_session("listing keys", work)
        with self._state_lock:
            self._handles = {h.info.kid: h for h in handles}
        return [h.info for h in handles]

    def _load(self, kid: str) -> KeyInfo | None:
        with self._state_lock:
            handle = self._handles.get(kid)
        if handle is not None:
            return handle.info
        try:
            object_id = _kid_bytes(kid)
        except InvalidInputError:
            return None

        def work(pooled: PooledSession[Any]) -> list[_Handle]:
            return self._scan(pooled.session, object_id)

        matches = [h for h in self._with_session(f"looking up key {kid}", work) if h.info.kid == kid]
        if not matches:
            return None
        with self._state_lock:
            self._handles[kid] = matches[0]
        return matches[0].info

    def _mechanism_for(self, alg: SignatureAlgorithm) -> MechanismChoice:
        choice = self._mechanisms.get(alg)
        if choice is not None:
            return choice
        try:
            available = set(self._token.slot.get_mechanisms())
        except Exception as exc:
            raise _translate(exc, "reading the token's mechanisms") from exc
        for candidate in _CANDIDATES[alg]:
            if candidate.mechanism in available:
                self._transforms[alg] = _input_transform(candidate, alg)
                self._mechanisms[alg] = candidate
                return candidate
        names = ", ".join(c.mechanism.name for c in _CANDIDATES[alg])
        raise MechanismNotSupportedError(
            f"the token offers none of the mechanisms {alg.value} needs ({names})"
        )

    def _private_key(self, pooled: PooledSession[Any], info: KeyInfo) -> Any:
        return self._key_for(pooled, info.kid)

    def _key_for(self, pooled: PooledSession[Any], kid: str) -> Any:
        """The session's handle for the key, looked up once per session (C_FindObjects scans every
        object file in SoftHSM: tens of milliseconds on a token with thousands of objects)."""
        key = pooled.keys.get(kid)
        if key is None:
            with self._state_lock:
                handle = self._handles.get(kid)
            object_id = handle.object_id if handle else _kid_bytes(kid)
            try:
                key = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
            except p11e.NoSuchKey:
                self._forget(kid)
                raise KeyNotFoundError(f"key {kid} is no longer on the token") from None
            pooled.keys[kid] = key
        return key

    def _sign_with(
        self,
        pooled: PooledSession[Any],
        kid: str,
        choice: MechanismChoice,
        alg: SignatureAlgorithm,
        message: bytes,
    ) -> bytes:
        key = pooled.keys.get(kid) or self._key_for(pooled, kid)
        data = self._transforms[alg](message)
        try:
            return bytes(key.sign(data, mechanism=choice.mechanism, mechanism_param=choice.param))
        except (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid):
            pooled.keys.pop(kid, None)  # stale handle: look the key up again on the retry
            raise

    def _sign_items(
        self,
        kid: str,
        messages: Sequence[bytes],
        alg: SignatureAlgorithm,
        indices: Sequence[int],
        *,
        attempt: int = 0,
    ) -> list[tuple[int, bytes | HsmKeysError]]:
        """Sign a run of items, on one borrowed session at a time.

        Each item has ``max_retries`` retries: a dead session is discarded and the item retried on
        a fresh one, throttling is waited out on the same session, a stale key handle is looked up
        again. A retried item is signed again from scratch, so a failure never yields a partial or
        foreign signature. Any other failure is that item's own outcome; the run goes on.
        """
        outcomes: list[tuple[int, bytes | HsmKeysError]] = []
        choice = self._mechanism_for(alg)
        retry = self._retry
        count = len(indices)
        position = 0
        while position < count:
            try:
                pooled = self._pool.acquire()
            except HsmKeysError as exc:
                # No session: the wait timed out, or the token refused to open one.
                if isinstance(exc, SessionError) and attempt < retry.max_retries:
                    attempt += 1
                    retry.pause(attempt)
                    continue
                outcomes.extend((index, exc) for index in indices[position:])
                break
            broken = True  # unless the loop below runs to its end
            try:
                while position < count:
                    index = indices[position]
                    try:
                        outcomes.append((index, self._sign_with(pooled, kid, choice, alg, messages[index])))
                    except Exception as exc:
                        kind = retry.classify(exc)
                        if kind is not None and attempt < retry.max_retries:
                            attempt += 1
                            if kind == _SESSION:
                                break  # discard this session, retry the item on a fresh one
                            if kind == _THROTTLE:
                                retry.pause(attempt)
                            continue
                        gave_up = f" (gave up after {attempt} retries)" if attempt else ""
                        outcomes.append((index, _translate(exc, f"signing with key {kid}{gave_up}")))
                        if kind == _SESSION:
                            position, attempt = position + 1, 0
                            break
                    position, attempt = position + 1, 0
                else:
                    broken = False
            finally:
                self._pool.release(pooled, broken=broken)
        return outcomes

    def sign(self, kid: str, message: bytes, alg: SignatureAlgorithm | str, *, verify: bool = False) -> bytes:
        """``KeyStore.sign``; once a (kid, alg) pair has passed its checks, later calls go straight
        to the session (the checks' outcome cannot change until the key is forgotten)."""
        signer = self._signers.get((kid, alg)) if not verify else None
        if signer is None or self._closed or self._forks != _forks_seen[0] or type(message) is not bytes:
            signature = super().sign(kid, message, alg, verify=verify)
            if not verify and isinstance(kid, str):
                algorithm = _parse_algorithm(alg)
                with contextlib.suppress(TypeError):  # an unhashable alg simply is not remembered
                    self._signers[(kid, alg)] = (algorithm, self._mechanisms[algorithm])
            return signature
        outcome = self._sign_one(kid, message, signer[0], signer[1])
        if isinstance(outcome, HsmKeysError):
            raise outcome
        return outcome

    def _sign_batch(
        self, info: KeyInfo, messages: Sequence[bytes], alg: SignatureAlgorithm, workers: int | None
    ) -> list[bytes | HsmKeysError]:
        if self._pid != os.getpid():
            self._ensure_process()
        total = len(messages)
        if total == 1:  # ``sign``: stay on the calling thread, no executor, no workers
            return [self._sign_one(info.kid, messages[0], alg, self._mechanism_for(alg))]
        self._mechanism_for(alg)  # a token without the mechanism fails the whole batch up front
        wanted = workers or self.default_workers or max(self._pool.max_size, self.max_processes)
        if self._use_processes(total, wanted):
            count = min(wanted, self.max_processes, total)
            return self._process_signer().sign(info.kid, alg, messages, count)
        count = max(1, min(wanted, self._pool.max_size, total))
        if count == 1:
            return _in_order(total, self._sign_items(info.kid, messages, alg, range(total)))
        return self._sign_threads(info.kid, messages, alg, count)

    def _sign_one(
        self, kid: str, message: bytes, alg: SignatureAlgorithm, choice: MechanismChoice
    ) -> bytes | HsmKeysError:
        """The first attempt of ``_sign_items`` for one item, without its bookkeeping (the hot path
        of token minting); any failure continues there as its attempt 1, with the same budget."""
        try:
            pooled = self._pool.acquire()
        except HsmKeysError:
            return self._sign_items(kid, (message,), alg, (0,))[0][1]
        try:
            signature = self._sign_with(pooled, kid, choice, alg, message)
        except Exception as exc:
            kind = self._retry.classify(exc)
            self._pool.release(pooled, broken=kind == _SESSION)
            if kind is None or self._retry.max_retries < 1:
                return _translate(exc, f"signing with key {kid}")
            if kind == _THROTTLE:
                self._retry.pause(1)
            return self._sign_items(kid, (message,), alg, (0,), attempt=1)[0][1]
        except BaseException:
            self._pool.release(pooled, broken=True)  # interrupted mid-call: state unknown
            raise
        self._pool.release(pooled)
        return signature

    def _sign_threads(
        self, kid: str, messages: Sequence[bytes], alg: SignatureAlgorithm, count: int
    ) -> list[bytes | HsmKeysError]:
        """``count`` threads, each signing on its own session, pulling small chunks from a shared
        counter so that a slow or retrying thread does not leave the others idle at the end."""
        total = len(messages)
        chunk = max(1, min(64, total // (count * 8)))
        chunks = itertools.count()  # next() on it is atomic under the GIL

        def run() -> list[tuple[int, bytes | HsmKeysError]]:
            done: list[tuple[int, bytes | HsmKeysError]] = []
            while (start := next(chunks) * chunk) < total:
                done.extend(self._sign_items(kid, messages, alg, range(start, min(start + chunk, total))))
            return done

        executor = self._thread_pool()
        futures = [executor.submit(run) for _ in range(count)]
        outcomes: list[tuple[int, bytes | HsmKeysError]] = []
        for future in futures:
            outcomes.extend(future.result())
        return _in_order(total, outcomes)

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """One executor per store and process, as large as the session pool, made on first use."""
        executor = self._executor
        if executor is None:
            with self._state_lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max(self._pool.max_size, 2), thread_name_prefix="hsm-keys-sign"
                    )
                executor = self._executor
        return executor

    def _use_processes(self, total: int, wanted: int) -> bool:
        if total < 2 or wanted < 2 or self.max_processes < 2 or self.parallelism == "threads":
            return False
        if self.parallelism == "processes":
            return True
        if not self.cpu_bound or total < AUTO_PROCESS_MIN_BATCH:
            return False
        # "auto": workers start in the background; until two are ready, threads do the work.
        return self._process_signer().ready(min(2, self.max_processes), start=True)

    def _process_signer(self) -> ProcessSigner:
        signer = self._processes
        if signer is None:
            with self._state_lock:
                if self._processes is None:
                    self._processes = ProcessSigner(
                        self._worker_config(),
                        self._pin,
                        max_workers=self.max_processes,
                        wait_timeout=self._wait_timeout,
                        call_timeout=self.worker_timeout,
                        max_retries=self.max_retries,
                    )
                signer = self._processes
        return signer

    def _worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            module=self.module_path,
            token_label=self.token_label,
            serial=self._serial,
            max_retries=self.max_retries,
            open_interval=self._open_interval,
            wait_timeout=self._wait_timeout,
            quirks=self.quirks,
        )

    def start_workers(self, count: int | None = None) -> int:
        """Start the signing worker processes now rather than on first use; returns how many are
        idle. Lets a service pay the start-up (about a second) before its first request."""
        self._check_open()
        self._ensure_process()
        return self._process_signer().start(count or self.max_processes)

    @property
    def workers(self) -> ProcessSigner | None:
        """The worker processes, once started (for monitoring and tests)."""
        return self._processes

    def _destroy(self, info: KeyInfo) -> None:
        def work(pooled: PooledSession[Any]) -> None:
            with self._state_lock:
                handle = self._handles.get(info.kid)
            object_id = handle.object_id if handle else _kid_bytes(info.kid)
            objects = list(pooled.session.get_objects({Attribute.ID: object_id, Attribute.TOKEN: True}))
            for obj in objects:
                if obj[Attribute.LABEL] == info.label:
                    obj.destroy()

        self._with_session(f"destroying key {info.kid}", work)
        self._forget(info.kid)

    def _forget(self, kid: str) -> None:
        with self._state_lock:
            self._handles.pop(kid, None)
            for pair in [pair for pair in self._signers if pair[0] == kid]:
                self._signers.pop(pair, None)
        self._pool.forget_key(kid)

    def _close(self) -> None:
        if self._pid != os.getpid():
            self._reset_after_fork()  # the parent's sessions and workers: leave them alone
            return
        if self._processes is not None:
            self._processes.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._pool.close()

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyStore(module={self.module_path!r}, token_label={self.token_label!r}, "
            f"pool_size={self._pool.max_size}, parallelism={self.parallelism!r})"
        )


def _in_order(total: int, outcomes: Iterable[tuple[int, bytes | HsmKeysError]]) -> list[bytes | HsmKeysError]:
    results: list[bytes | HsmKeysError | None] = [None] * total
    for index, outcome in outcomes:
        results[index] = outcome
    return [r if r is not None else KeyStoreError(f"item {i} was not signed") for i, r in enumerate(results)]


def _kid_bytes(kid: str) -> bytes:
    raw = b64url_decode(kid)
    if len(raw) != 32:
        raise InvalidInputError(f"kid {kid!r} is not a SHA-256 JWK thumbprint")
    return raw
