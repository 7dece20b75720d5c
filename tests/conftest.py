"""Shared fixtures: a throwaway SoftHSM token for the whole run, and key stores over it.

The token lives in a private temporary directory with random PINs; SOFTHSM2_CONF is set before
any test loads the module (SoftHSM reads it once per process), and subprocesses inherit it.
``HSM_KEYS_TEST_PKCS11_MODULE`` / ``_TOKEN_LABEL`` / ``_PIN`` point the same suite at another module
(e.g. CloudHSM) instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsm_keys.keystore.pkcs11 import find_softhsm_module

ROOT = Path(__file__).resolve().parent.parent
TEST_TOKEN_LABEL = "hsm-keys-test"
_state: dict[str, str] = {}


def _make_softhsm_token() -> dict[str, str]:
    module = find_softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        return {}
    workdir = Path(tempfile.mkdtemp(prefix="hsm-keys-test-"))
    (workdir / "tokens").mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {workdir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            TEST_TOKEN_LABEL,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return {
        "SOFTHSM2_CONF": str(conf),
        "HSM_KEYS_PKCS11_MODULE": module,
        "HSM_KEYS_TOKEN_LABEL": TEST_TOKEN_LABEL,
        "HSM_KEYS_PIN": pin,
        "workdir": str(workdir),
    }


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("HSM_KEYS_TEST_PKCS11_MODULE"):
        _state.update(
            HSM_KEYS_PKCS11_MODULE=os.environ["HSM_KEYS_TEST_PKCS11_MODULE"],
            HSM_KEYS_TOKEN_LABEL=os.environ["HSM_KEYS_TEST_TOKEN_LABEL"],
            HSM_KEYS_PIN=os.environ["HSM_KEYS_TEST_PIN"],
        )
    else:
        _state.update(_make_softhsm_token())
    os.environ.pop("HSM_KEYS_PIN_FILE", None)
    os.environ.pop("HSM_KEYS_PKCS11_URI", None)
    for name, value in _state.items():
        if name != "workdir":
            os.environ[name] = value


def pytest_unconfigure(config: pytest.Config) -> None:
    workdir = _state.get("workdir")
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pkcs11_env() -> dict[str, str]:
    """Environment of the test token (module, label, PIN, SOFTHSM2_CONF)."""
    if not _state:
        pytest.fail("SoftHSM2 is not installed: run `make test`, which installs it")
    return {k: v for k, v in _state.items() if k != "workdir"}


@pytest.fixture
def softhsm_store(pkcs11_env: dict[str, str]) -> Iterator[object]:
    """A PKCS#11 store on the test token; keys it created are destroyed afterwards."""
    from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore()
    before = {k.kid for k in store.list_keys()}
    try:
        yield store
    finally:
        if not store.closed:
            for info in store.list_keys():
                if info.kid not in before:
                    store.destroy(info.kid)
            store.close()
