"""The ``store`` fixture: every contract test runs once per key-store backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsm_keys.keystore import KeyStore, MemoryKeyStore

BACKENDS = ["memory", "softhsm"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    if request.param == "memory":
        with MemoryKeyStore() as memory:
            yield memory
    else:
        yield request.getfixturevalue("softhsm_store")
