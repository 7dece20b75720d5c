"""hsm_keys: HSM-backed keys for per-engineer, per-account read-only AWS support access."""

from hsm_keys.errors import HsmKeysError
from hsm_keys.keystore import KeyStore, MemoryKeyStore, Pkcs11KeyStore, SignResult
from hsm_keys.types import Binding, KeyInfo, KeySpec, SignatureAlgorithm

__version__ = "0.1.0"

__all__ = [
    "Binding",
    "HsmKeysError",
    "KeyInfo",
    "KeySpec",
    "KeyStore",
    "MemoryKeyStore",
    "Pkcs11KeyStore",
    "SignResult",
    "SignatureAlgorithm",
    "__version__",
]
