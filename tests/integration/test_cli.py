"""The ``hsm-keys`` command: output, --json, exit codes, and the main job (``hsm-keys demo``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from hsm_keys.cli import EXIT_BAD_INPUT, EXIT_DENIED, EXIT_HSM, EXIT_NOT_FOUND, EXIT_OK, main, parse_ttl
from hsm_keys.encoding import b64url_decode, jwk_to_public_key
from hsm_keys.keystore import MemoryKeyStore
from hsm_keys.keystore.software import verify_signature
from hsm_keys.local.environment import LocalEnvironment
from hsm_keys.local.pki import make_pki
from hsm_keys.types import SignatureAlgorithm

ACCOUNT = "222233334444"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hsm_keys.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in (
        "demo",
        "grant",
        "revoke",
        "list",
        "reconcile",
        "expire",
        "doctor",
        "keys",
        "sign",
        "thumbprint",
    ):
        assert command in result.stdout
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", dt.timedelta(minutes=30)),
        ("4h", dt.timedelta(hours=4)),
        ("1d12h", dt.timedelta(days=1, hours=12)),
        ("90", dt.timedelta(seconds=90)),
    ],
)
def test_ttl_parsing(text: str, expected: dt.timedelta) -> None:
    assert parse_ttl(text) == expected


@pytest.mark.softhsm
def test_keys_lifecycle_and_sign_on_softhsm(
    pkcs11_env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys, "keys", "generate", "--staff", "cli.user", "--account", ACCOUNT, "--spec", "EC_P384", "--json"
    )
    assert code == EXIT_OK
    created = json.loads(out)
    kid = created["kid"]
    assert created["spec"] == "EC_P384" and created["jwk"]["crv"] == "P-384"

    code, out, _ = run(capsys, "keys", "list", "--account", ACCOUNT)
    assert code == EXIT_OK and kid in out and "cli.user" in out

    code, out, _ = run(capsys, "keys", "show", kid)
    assert code == EXIT_OK and "BEGIN PUBLIC KEY" in out

    message = tmp_path / "message.bin"
    message.write_bytes(b"sign me with the HSM")
    code, out, _ = run(capsys, "sign", kid, str(message), "--json")
    assert code == EXIT_OK
    signed = json.loads(out)
    assert signed["alg"] == "ES384"
    public_key = jwk_to_public_key(created["jwk"])
    assert verify_signature(
        public_key, b64url_decode(signed["signature"]), message.read_bytes(), SignatureAlgorithm.ES384
    )

    code, _, err = run(capsys, "keys", "generate", "--staff", "CLI.USER", "--account", ACCOUNT)
    assert code == EXIT_BAD_INPUT and "already has key" in err

    code, _, err = run(capsys, "keys", "destroy", kid)
    assert code == EXIT_BAD_INPUT and "--yes" in err
    code, _, _ = run(capsys, "keys", "destroy", kid, "--yes")
    assert code == EXIT_OK
    code, _, err = run(capsys, "keys", "show", kid)
    assert code == EXIT_NOT_FOUND and kid in err


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "generate", "--staff", "x", "--account", "123")
    assert code == EXIT_BAD_INPUT and "12 digits" in err
    for spec in ("DSA", "", "-"):
        code, _, err = run(capsys, "keys", "generate", "--staff", "x", "--account", ACCOUNT, "--spec", spec)
        assert code == EXIT_BAD_INPUT and "key spec" in err
    code, _, err = run(capsys, "thumbprint", "missing-chain.pem")
    assert code == EXIT_BAD_INPUT and "missing-chain.pem" in err
    code, _, err = run(
        capsys, "grant", "alice", ACCOUNT, "--ticket", "T-1", "--ttl", "1h", "--issuer-base", ""
    )
    assert code == EXIT_BAD_INPUT and "issuer-base" in err
    for ttl in ("soon", "99999999999d", "99999999999999999999"):
        code, _, err = run(capsys, "grant", "alice", ACCOUNT, "--ticket", "T-1", "--ttl", ttl)
        assert code == EXIT_BAD_INPUT and "--ttl" in err


@pytest.mark.softhsm
def test_hsm_errors_exit_4_without_showing_the_pin(
    pkcs11_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSM_KEYS_TOKEN_LABEL", "no-such-token")
    code, _, err = run(capsys, "keys", "list")
    assert code == EXIT_HSM and "no-such-token" in err
    assert pkcs11_env["HSM_KEYS_PIN"] not in err
    monkeypatch.delenv("HSM_KEYS_TOKEN_LABEL")
    code, _, err = run(capsys, "keys", "list")
    assert code == EXIT_BAD_INPUT and "setup-token.sh" in err


@pytest.mark.softhsm
def test_a_wrong_pin_is_access_denied(
    pkcs11_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSM_KEYS_PIN", "not-the-pin-4711")
    code, _, err = run(capsys, "keys", "list")
    assert code == EXIT_DENIED and "PIN" in err and "not-the-pin-4711" not in err


def test_thumbprint_of_a_pem_chain_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pki = make_pki("idp.example.test", tmp_path)
    chain = tmp_path / "served.pem"
    pem = serialization.Encoding.PEM
    chain.write_bytes(
        pki.leaf.public_bytes(pem) + pki.intermediate.public_bytes(pem) + pki.root.public_bytes(pem)
    )
    code, out, _ = run(capsys, "thumbprint", str(chain), "--json")
    assert code == EXIT_OK
    assert json.loads(out)["thumbprint"] == pki.intermediate.fingerprint(hashes.SHA1()).hex()


@pytest.fixture
def cli_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LocalEnvironment, list[str]]]:
    """A local environment the CLI reaches through flags, as an operator would configure it."""
    with MemoryKeyStore() as store, LocalEnvironment(tmp_path, store) as env:
        env.onboard(ACCOUNT)
        session = env.aws.operations_session().get_credentials()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", session.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", session.secret_key)
        flags = [
            "--registry",
            str(env.registry.path),
            "--issuer-base",
            f"https://{env.issuer_host}",
            "--publish-dir",
            str(env.issuer_server.root),
            "--aws-endpoint",
            env.aws.endpoint_url,
            "--ca-bundle",
            str(env.pki.ca_file),
            "--resolve",
            f"{env.issuer_host}=127.0.0.1:{env.issuer_server.port}",
        ]
        yield env, flags


@pytest.mark.softhsm
def test_grant_list_doctor_revoke_through_the_cli(
    pkcs11_env: dict[str, str],
    cli_environment: tuple[LocalEnvironment, list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env, flags = cli_environment
    code, out, err = run(
        capsys, "grant", "cli.staff", ACCOUNT, "--ticket", "CS-77", "--ttl", "2h", "--json", *flags
    )
    assert code == EXIT_OK, err
    grant: dict[str, Any] = json.loads(out)
    assert grant["role_arn"].endswith(":role/DoiT-Support-cli.staff") and grant["ticket"] == "CS-77"

    code, out, _ = run(capsys, "list", ACCOUNT, *flags)
    assert code == EXIT_OK and "cli.staff" in out and "CS-77" in out

    code, out, _ = run(capsys, "doctor", "cli.staff", ACCOUNT, *flags)
    assert code == EXIT_OK and out.count("PASS") == 9 and "9 passed, 0 failed, 0 skipped" in out

    code, out, _ = run(capsys, "revoke", "cli.staff", ACCOUNT, "--json", *flags)
    assert code == EXIT_OK
    assert {a["action"] for a in json.loads(out)} >= {"deleted role", "deleted provider", "destroyed key"}

    admin = env.aws.client("iam", env.aws.session_in(ACCOUNT))
    assert "DoiT-Support-cli.staff" not in [r["RoleName"] for r in admin.list_roles()["Roles"]]
    assert admin.list_open_id_connect_providers()["OpenIDConnectProviderList"] == []

    # Checks that need the deleted role are not run: SKIP, counted apart from the failures.
    code, out, _ = run(capsys, "doctor", "cli.staff", ACCOUNT, *flags)
    assert code == 1 and "FAIL  role" in out and "SKIP  key" in out and "not checked" in out
    assert "FAIL  key" not in out
    code, out, _ = run(capsys, "doctor", "cli.staff", ACCOUNT, "--json", *flags)
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["failed"] >= 1 and report["skipped"] >= 1
    assert report["passed"] + report["failed"] + report["skipped"] == len(report["checks"]) == 9
    assert {c["status"] for c in report["checks"] if c["detail"].startswith("not checked")} == {"SKIP"}


@pytest.mark.softhsm
@pytest.mark.slow
def test_demo_runs_the_main_job_end_to_end(pkcs11_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hsm_keys.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for expected in (
        "SUCCESS",
        "PASS  token",
        "assumed-role/DoiT-Support-jane.doe",
        "PyJWT verified",
        "deleted role",
        "destroyed key",
        "Demo complete",
    ):
        assert expected in out
    assert "FAIL" not in out
    assert pkcs11_env["HSM_KEYS_PIN"] not in out + result.stderr
