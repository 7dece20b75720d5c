"""PKCS#11 key store over python-pkcs11: SoftHSM by default, CloudHSM or any other module by path.

Facts we rely on (measured; see DESIGN.md): the module is initialised with OS locking so threads can
sign on separate sessions; the application logs in once (``C_Login`` through ctypes, already-logged-in
counts as success) and no session's close ever logs out the others; tokens are found by label;
key handles are cached per session; mechanisms are chosen from what the token reports.
PKCS#11 errors are translated into the ``hsm_keys.errors`` tree in exactly one place, ``_translate``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import os
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from hsm_keys.encoding.base64url import b64url_decode
from hsm_keys.encoding.jwk import jwk_thumbprint, jwk_thumbprint_bytes
from hsm_keys.errors import (
    ConfigurationError,
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
from hsm_keys.keystore._attributes import public_key_from_ec_attributes, public_key_from_rsa_attributes
from hsm_keys.keystore.base import LABEL_PREFIX, KeyStore, parse_label
from hsm_keys.keystore.pool import PooledSession, SessionPool
from hsm_keys.types import Binding, KeyInfo, KeySpec, KeyType, SignatureAlgorithm

T = TypeVar("T")

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
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_KEY_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
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


def _token_input(choice: MechanismChoice, alg: SignatureAlgorithm, message: bytes) -> bytes:
    if not choice.prehash or alg.hash_name is None:
        return message
    digest = hashlib.new(alg.hash_name, message).digest()
    if choice.mechanism == Mechanism.RSA_PKCS:
        return _DIGEST_INFO_PREFIX[alg.hash_name] + digest
    return digest


# -- error translation: the one place ------------------------------------------------------------

# Failures after which the session is replaced and the item retried.
RETRYABLE_SESSION_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.SessionCount,
    p11e.DeviceMemory,
)

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


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (*RETRYABLE_SESSION_ERRORS, SessionError))


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


def _uri_attributes(part: str, separator: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for item in filter(None, part.split(separator)):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigurationError(f"malformed PKCS#11 URI attribute {name or item[:20]!r}")
        attrs[name.strip().lower()] = urllib.parse.unquote(value)
    return attrs


# -- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handle:
    """What the store remembers of one key pair between calls."""

    info: KeyInfo
    object_id: bytes


class Pkcs11KeyStore(KeyStore):
    """Keys inside a PKCS#11 token. Thread-safe; fork-safe (a child re-initialises the module)."""

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
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must not be negative, got {max_retries}")
        self.module_path = module
        self.token_label = label or ""
        self._serial = parsed.serial
        self._pin = pin if isinstance(pin, Pin) else Pin(pin)
        self._requested_pool_size = pool_size
        self._wait_timeout = wait_timeout
        self._open_interval = open_interval
        self.max_retries = max_retries
        self.default_workers = default_workers
        self._state_lock = threading.RLock()
        self._handles: dict[str, _Handle] = {}
        self._mechanisms: dict[SignatureAlgorithm, MechanismChoice] = {}
        self._pid = -1
        self._start()

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
        max_sessions = self.token_session_limit()
        size = self._requested_pool_size or min(8, max(2, (os.cpu_count() or 2) * 2))
        if max_sessions is not None:
            size = min(size, max_sessions)
        self._pid = os.getpid()
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
        if self._pid != os.getpid():
            with self._state_lock:
                if self._pid != os.getpid():
                    self._pool.abandon()
                    self._start()

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
            self._lib.login(session.handle, self._pin.reveal())
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
        """Run ``work`` on a borrowed session; replace a broken session and retry, boundedly."""
        attempt = 0
        while True:
            self._ensure_process()
            pooled = self._pool.acquire()
            try:
                result = work(pooled)
            except BaseException as exc:
                broken = _retryable(exc)
                self._pool.release(pooled, broken=broken or not isinstance(exc, Exception))
                if broken and attempt < self.max_retries:
                    attempt += 1
                    continue
                if isinstance(exc, Exception):
                    raise _translate(exc, doing) from exc
                raise
            self._pool.release(pooled)
            return result

    # -- KeyStore primitives ----------------------------------------------------------------------

    def _generate(self, spec: KeySpec, binding: Binding, label: str, created_at: dt.datetime) -> KeyInfo:
        def work(pooled: PooledSession[Any]) -> KeyInfo:
            session = pooled.session
            temporary_id = b"hsm-keys-pending-" + secrets.token_bytes(8)
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
        common = {Attribute.LABEL: label, Attribute.ID: object_id}
        public_template = {**PUBLIC_KEY_TEMPLATE, **common}
        private_template = {**PRIVATE_KEY_TEMPLATE, **common}
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
    def _public_key_of(public: Any, spec: KeySpec) -> Any:
        if spec.key_type is KeyType.RSA:
            return public_key_from_rsa_attributes(
                public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT]
            )
        return public_key_from_ec_attributes(public[Attribute.EC_PARAMS], public[Attribute.EC_POINT])

    def _scan(self, session: Any, object_id: bytes | None = None) -> list[_Handle]:
        """Read this library's public-key objects; reuse what is already known by object id."""
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TOKEN: True}
        if object_id is not None:
            template[Attribute.ID] = object_id
        with self._state_lock:
            known = {h.object_id: h for h in self._handles.values()}
        found: list[_Handle] = []
        for obj in session.get_objects(template):
            label = obj[Attribute.LABEL]
            if not label.startswith(LABEL_PREFIX + "/"):
                continue
            parsed = parse_label(label)
            if parsed is None:
                continue
            oid = bytes(obj[Attribute.ID])
            handle = known.get(oid)
            if handle is None or handle.info.label != label:
                binding, spec, created = parsed
                public_key = self._public_key_of(obj, spec)
                kid = jwk_thumbprint(public_key)
                info = KeyInfo(kid, spec, binding, label, created, public_key)
                handle = _Handle(info, oid)
            found.append(handle)
        return found

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
                self._mechanisms[alg] = candidate
                return candidate
        names = ", ".join(c.mechanism.name for c in _CANDIDATES[alg])
        raise MechanismNotSupportedError(
            f"the token offers none of the mechanisms {alg.value} needs ({names})"
        )

    def _private_key(self, pooled: PooledSession[Any], info: KeyInfo) -> Any:
        key = pooled.keys.get(info.kid)
        if key is None:
            with self._state_lock:
                handle = self._handles.get(info.kid)
            object_id = handle.object_id if handle else _kid_bytes(info.kid)
            try:
                key = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
            except p11e.NoSuchKey:
                self._forget(info.kid)
                raise KeyNotFoundError(f"key {info.kid} is no longer on the token") from None
            pooled.keys[info.kid] = key
        return key

    def _sign_with(
        self, pooled: PooledSession[Any], info: KeyInfo, message: bytes, alg: SignatureAlgorithm
    ) -> bytes:
        choice = self._mechanism_for(alg)
        key = self._private_key(pooled, info)
        data = _token_input(choice, alg, message)
        try:
            return bytes(key.sign(data, mechanism=choice.mechanism, mechanism_param=choice.param))
        except (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid):
            pooled.keys.pop(info.kid, None)
            raise

    def _sign_items(
        self, info: KeyInfo, messages: Sequence[bytes], alg: SignatureAlgorithm, indices: Sequence[int]
    ) -> list[tuple[int, bytes | HsmKeysError]]:
        """Sign a run of items on one borrowed session; a session that breaks is replaced and the
        item retried up to ``max_retries`` times. Other failures belong to their item only."""
        outcomes: list[tuple[int, bytes | HsmKeysError]] = []
        doing = f"signing with key {info.kid}"
        position, retries = 0, 0
        while position < len(indices):
            self._ensure_process()
            try:
                pooled = self._pool.acquire()
            except HsmKeysError as exc:
                outcomes.extend((i, exc) for i in indices[position:])
                break
            broken = False
            try:
                while position < len(indices):
                    index = indices[position]
                    try:
                        signature = self._sign_with(pooled, info, messages[index], alg)
                    except Exception as exc:
                        if _retryable(exc) and retries < self.max_retries:
                            retries += 1
                            broken = True
                            break  # replace the session, retry this item
                        outcomes.append((index, _translate(exc, doing)))
                        if _retryable(exc):
                            broken = True
                            position, retries = position + 1, 0
                            break
                    else:
                        outcomes.append((index, signature))
                    position, retries = position + 1, 0
            finally:
                self._pool.release(pooled, broken=broken)
        return outcomes

    def _sign_batch(
        self, info: KeyInfo, messages: Sequence[bytes], alg: SignatureAlgorithm, workers: int | None
    ) -> list[bytes | HsmKeysError]:
        self._mechanism_for(alg)  # a token without the mechanism fails the whole batch up front
        wanted = workers or self.default_workers or self._pool.max_size
        count = max(1, min(wanted, self._pool.max_size, len(messages)))
        results: list[bytes | HsmKeysError | None] = [None] * len(messages)
        if count == 1:
            for index, outcome in self._sign_items(info, messages, alg, range(len(messages))):
                results[index] = outcome
        else:
            # Contiguous chunks, one per worker; each worker keeps one session for its whole chunk.
            bounds = [len(messages) * w // count for w in range(count + 1)]

            def run(worker: int) -> list[tuple[int, bytes | HsmKeysError]]:
                return self._sign_items(info, messages, alg, range(bounds[worker], bounds[worker + 1]))

            with concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="hsm-keys-sign") as executor:
                for chunk in executor.map(run, range(count)):
                    for index, outcome in chunk:
                        results[index] = outcome
        return [r if r is not None else KeyStoreError("item was not signed") for r in results]

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
        self._pool.forget_key(kid)

    def _close(self) -> None:
        if self._pid == os.getpid():
            self._pool.close()
        else:
            self._pool.abandon()

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyStore(module={self.module_path!r}, token_label={self.token_label!r}, "
            f"pool_size={self._pool.max_size})"
        )


def _kid_bytes(kid: str) -> bytes:
    raw = b64url_decode(kid)
    if len(raw) != 32:
        raise InvalidInputError(f"kid {kid!r} is not a SHA-256 JWK thumbprint")
    return raw
