"""Loading a PKCS#11 module the way concurrent signing needs: ``C_Initialize`` with OS locking.

Why this is hand-written: python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``, which tells SoftHSM the
application is single-threaded; SoftHSM then drops its own mutexes and two threads signing on two
sessions crash the process. python-pkcs11 takes no initialisation arguments and refuses a module that
is already initialised, but its ``lib.initialize`` is a ``cpdef`` method a Python subclass can
override. So we call the module's ``C_Initialize`` ourselves through ctypes with
``CK_C_INITIALIZE_ARGS{flags=CKF_OS_LOCKING_OK}`` from that override. ctypes also gives us ``C_Login``
on a session handle, so no python-pkcs11 ``Session`` ever records a login it would undo on close
(its ``Session.close()`` logs out, which would log out every other session of the application).

One loaded module per (path, process): a forked child must initialise its own copy of the module
state and never reuse the parent's sessions or login.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

from pkcs11 import _pkcs11

CKR_OK = 0x000
CKR_GENERAL_ERROR = 0x005
CKR_FUNCTION_FAILED = 0x006
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_LOCKED = 0x0A4
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x00000002
CKU_USER = 1

CK_RV = ctypes.c_ulong
CK_ULONG = ctypes.c_ulong
_fn = ctypes.c_void_p


class CK_VERSION(ctypes.Structure):  # noqa: N801 - PKCS#11 names
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class CK_C_INITIALIZE_ARGS(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("CreateMutex", _fn),
        ("DestroyMutex", _fn),
        ("LockMutex", _fn),
        ("UnlockMutex", _fn),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    )


# The function list's order is fixed by the PKCS#11 specification; we only need its first 20 entries.
_FUNCTION_NAMES = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
)


class CK_FUNCTION_LIST(ctypes.Structure):  # noqa: N801
    _fields_ = (("version", CK_VERSION), *((name, _fn) for name in _FUNCTION_NAMES))


class CK_TOKEN_INFO(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", ctypes.c_char * 16),
    )


# ulMaxSessionCount special values (PKCS#11 2.40 section 3.2)
CK_EFFECTIVELY_INFINITE = 0
CK_UNAVAILABLE_INFORMATION = ctypes.c_ulong(-1).value


class CK_SESSION_INFO(ctypes.Structure):  # noqa: N801
    _fields_ = (("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG), ("ulDeviceError", CK_ULONG))


CKS_RO_USER_FUNCTIONS = 1
CKS_RW_USER_FUNCTIONS = 3
CKR_SESSION_HANDLE_INVALID = 0x0B3


class CryptokiCallError(Exception):
    """A raw PKCS#11 return value from a ctypes call; translated by the key store."""

    def __init__(self, function: str, rv: int) -> None:
        super().__init__(f"{function} returned CKR 0x{rv:08X}")
        self.function = function
        self.rv = rv


class _Functions:
    """The few module functions we call through ctypes."""

    def __init__(self, path: str) -> None:
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = CK_RV
        get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST)),)
        table = ctypes.POINTER(CK_FUNCTION_LIST)()
        rv = get_list(ctypes.byref(table))
        if rv != CKR_OK:
            raise CryptokiCallError("C_GetFunctionList", rv)
        functions = table.contents
        self.initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)(functions.C_Initialize)
        self.finalize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)(functions.C_Finalize)
        self.login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)(functions.C_Login)
        self.get_token_info = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(CK_TOKEN_INFO))(
            functions.C_GetTokenInfo
        )
        self.get_session_info = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(CK_SESSION_INFO))(
            functions.C_GetSessionInfo
        )
        self._table = table  # keep the function table's owner alive


def _initialize_with_os_locking(functions: _Functions) -> None:
    args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
    rv = functions.initialize(ctypes.byref(args))
    if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
        # Inherited across fork by a module that does not detect forks: start this process afresh.
        functions.finalize(None)
        rv = functions.initialize(ctypes.byref(args))
    if rv != CKR_OK:
        raise CryptokiCallError("C_Initialize", rv)


class OsLockingLib(_pkcs11.lib):
    """python-pkcs11's ``lib`` whose initialisation passes ``CKF_OS_LOCKING_OK``."""

    _functions: _Functions

    def initialize(self) -> None:
        # Called by ``lib.__init__`` after it has set ``so``, before any other module call.
        self._functions = _Functions(self.so)
        _initialize_with_os_locking(self._functions)

    def login(self, session_handle: int, pin: bytes) -> bool:
        """Log the application in; already being logged in counts as success.

        Returns False when the token was already logged in: it then did not check ``pin``.
        """
        rv = self._functions.login(session_handle, CKU_USER, pin, len(pin))
        if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            raise CryptokiCallError("C_Login", rv)
        return bool(rv == CKR_OK)

    def token_info(self, slot_id: int) -> CK_TOKEN_INFO:
        """Fields python-pkcs11 does not expose: session limits and counts."""
        info = CK_TOKEN_INFO()
        rv = self._functions.get_token_info(slot_id, ctypes.byref(info))
        if rv != CKR_OK:
            raise CryptokiCallError("C_GetTokenInfo", rv)
        return info

    def session_state(self, session_handle: int) -> int | None:
        """The session's CKS_* state, or None when the handle is not an open session."""
        info = CK_SESSION_INFO()
        rv = self._functions.get_session_info(session_handle, ctypes.byref(info))
        if rv == CKR_SESSION_HANDLE_INVALID:
            return None
        if rv != CKR_OK:
            raise CryptokiCallError("C_GetSessionInfo", rv)
        return int(info.state)


_LOAD_LOCK = threading.Lock()
_LOADED: dict[tuple[str, int], OsLockingLib] = {}


def _reset_load_lock_in_child() -> None:
    """A lock some parent thread held at fork time would stay held for ever in the child."""
    global _LOAD_LOCK  # noqa: PLW0603 - replaced, never shared with the parent again
    _LOAD_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_load_lock_in_child)

# Several processes starting SoftHSM at once occasionally fail with GeneralError or see no token:
# retry start-up, briefly and boundedly.
START_ATTEMPTS = 5
START_BACKOFF_SECONDS = 0.05


def load_module(path: str) -> OsLockingLib:
    """The process's initialised module at ``path`` (loaded once per process, again after a fork)."""
    key = (os.path.realpath(path), os.getpid())
    with _LOAD_LOCK:
        lib = _LOADED.get(key)
        if lib is not None:
            return lib
        for stale in [k for k in _LOADED if k[1] != key[1]]:
            # The parent's module state: never finalise or close it from here, just forget it.
            _LOADED.pop(stale)
        last_error: Exception | None = None
        for attempt in range(START_ATTEMPTS):
            try:
                lib = OsLockingLib(path)
            except CryptokiCallError as exc:
                last_error = exc
                if exc.rv not in (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED):
                    raise
                time.sleep(START_BACKOFF_SECONDS * (attempt + 1))
                continue
            _LOADED[key] = lib
            # Keep the module loaded for the life of the process: python-pkcs11's deallocator would
            # otherwise run during interpreter shutdown, when its own methods are already gone.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
            return lib
        assert last_error is not None
        raise last_error


def loaded_module_count() -> int:
    """For tests: how many modules this process holds."""
    return sum(1 for _, pid in _LOADED if pid == os.getpid())


def forget_all() -> None:
    """Drop every cached module (tests only; the modules stay initialised in C)."""
    with _LOAD_LOCK:
        _LOADED.clear()


__all__ = ["CryptokiCallError", "OsLockingLib", "load_module"]
