"""Key stores: the ``KeyStore`` interface and its backends (PKCS#11, memory)."""

from hsm_keys.keystore.base import KeyStore, SignResult
from hsm_keys.keystore.memory import MemoryKeyStore

__all__ = ["KeyStore", "MemoryKeyStore", "SignResult"]
