"""Key stores: the ``KeyStore`` interface and its backends (PKCS#11, memory)."""

from hsm_keys.keystore.base import KeyStore, SignResult
from hsm_keys.keystore.memory import MemoryKeyStore
from hsm_keys.keystore.pkcs11 import Pin, Pkcs11KeyStore

__all__ = ["KeyStore", "MemoryKeyStore", "Pin", "Pkcs11KeyStore", "SignResult"]
