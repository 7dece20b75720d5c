"""``hsm-keys`` outside the demo: registering accounts by hand, provisioning against a local AWS,
``demo --serve`` and ``demo --json``, live thumbprints, and the exit codes of the edge cases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from hsm_keys.cli import (
    EXIT_BAD_INPUT,
    EXIT_CHECKS_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    main,
)
from hsm_keys.keystore import MemoryKeyStore
from hsm_keys.local.environment import CustomerAccount, LocalEnvironment
from hsm_keys.local.pki import make_pki
from hsm_keys.local.server import LoopbackIssuerServer

# moto keeps its state per process and other test modules deploy stacks too: accounts of our own.
ACCOUNT = "565656565656"
DEMO_ACCOUNT = "575757575757"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/DoiT_Management_Role_DO-NOT-DELETE"
STACK = (
    f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/support-access/6a1b2c3d-0000-1111-2222-333344445555"
)
OTHER_STACK = STACK.replace("6a1b2c3d", "7f7f7f7f")
SETTINGS = (
    "HSM_KEYS_REGISTRY",
    "HSM_KEYS_ISSUER_BASE",
    "HSM_KEYS_PUBLISH_DIR",
    "HSM_KEYS_AWS_ENDPOINT",
    "HSM_KEYS_CA_BUNDLE",
    "HSM_KEYS_RESOLVE",
)


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_accounts_add_list_remove_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = tmp_path / "state" / "accounts.json"
    flags = ["--registry", str(registry)]
    code, _, err = run(capsys, "accounts", "list", *flags)
    assert code == EXIT_BAD_INPUT and "does not exist" in err

    code, out, err = run(capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", STACK, "--no-verify", *flags)
    assert code == EXIT_OK, err
    assert out == f"registered account {ACCOUNT} with role {ROLE}\n"
    assert registry.is_file()
    code, out, _ = run(capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", STACK, "--no-verify", *flags)
    assert code == EXIT_OK and out.startswith("already registered")

    code, out, _ = run(capsys, "accounts", "list", *flags)
    assert code == EXIT_OK and ACCOUNT in out and ROLE in out and STACK in out
    code, out, _ = run(capsys, "accounts", "list", "--json", *flags)
    [entry] = json.loads(out)
    assert entry["account_id"] == ACCOUNT and entry["role_arn"] == ROLE and "role_id" not in entry

    # Another stack's registration is replaced only when asked.
    code, _, err = run(
        capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", OTHER_STACK, "--no-verify", *flags
    )
    assert code == EXIT_BAD_INPUT and "registered by another stack" in err and "--replace" in err
    code, out, err = run(
        capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", OTHER_STACK, "--no-verify", "--replace",
        "--json", *flags,
    )  # fmt: skip
    assert code == EXIT_OK, err
    assert json.loads(out)["stack_id"] == OTHER_STACK and json.loads(out)["changed"] is True

    # Input the registry refuses: a role in another account, a stack that is not a stack ARN.
    code, _, err = run(
        capsys, "accounts", "add", ACCOUNT, ROLE.replace(ACCOUNT, "111122223333"), "--stack-id", STACK,
        "--no-verify", *flags,
    )  # fmt: skip
    assert code == EXIT_BAD_INPUT and f"not in {ACCOUNT}" in err
    code, _, err = run(capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", "stack", "--no-verify", *flags)
    assert code == EXIT_BAD_INPUT and "not a CloudFormation stack id" in err

    # remove: a missing account is "not found" before --yes is asked for.
    code, _, err = run(capsys, "accounts", "remove", "999988887777", *flags)
    assert code == EXIT_NOT_FOUND and "not onboarded" in err
    code, _, err = run(capsys, "accounts", "remove", ACCOUNT, *flags)
    assert code == EXIT_BAD_INPUT and "--yes" in err and "does not revoke" in err
    code, out, _ = run(capsys, "accounts", "remove", ACCOUNT, "--yes", *flags)
    assert code == EXIT_OK and "removed account" in out
    code, out, _ = run(capsys, "accounts", "list", *flags)
    assert code == EXIT_OK and "(none)" in out
    # The removed registration's stack is retired: a late notification cannot bring it back.
    code, _, err = run(
        capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", OTHER_STACK, "--no-verify", *flags
    )
    assert code == EXIT_BAD_INPUT and "was deleted" in err


@pytest.fixture
def local_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LocalEnvironment, CustomerAccount]]:
    """A customer stack deployed into a local AWS, its onboarding notification never delivered."""
    with MemoryKeyStore() as store, LocalEnvironment(tmp_path / "env", store) as env:
        customer = env.deploy_stack(ACCOUNT)
        credentials = env.aws.operations_session().get_credentials()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key)
        monkeypatch.setenv("HSM_KEYS_REGISTRY", str(tmp_path / "accounts.json"))
        monkeypatch.setenv("HSM_KEYS_ISSUER_BASE", f"https://{env.issuer_host}")
        monkeypatch.setenv("HSM_KEYS_PUBLISH_DIR", str(env.issuer_server.root))
        monkeypatch.setenv("HSM_KEYS_AWS_ENDPOINT", env.aws.endpoint_url)
        monkeypatch.setenv("HSM_KEYS_CA_BUNDLE", str(env.pki.ca_file))
        monkeypatch.setenv("HSM_KEYS_RESOLVE", f"{env.issuer_host}=127.0.0.1:{env.issuer_server.port}")
        yield env, customer


@pytest.mark.softhsm
@pytest.mark.aws
def test_an_account_registered_by_hand_can_be_granted_checked_and_revoked(
    pkcs11_env: dict[str, str],
    local_env: tuple[LocalEnvironment, CustomerAccount],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, customer = local_env
    code, _, err = run(capsys, "list", ACCOUNT)
    assert code == EXIT_BAD_INPUT and "does not exist" in err  # nothing registered yet, no registry file

    code, out, err = run(
        capsys, "accounts", "add", ACCOUNT, customer.role_arn, "--stack-id", customer.stack_id
    )
    assert code == EXIT_OK, err
    code, out, _ = run(capsys, "accounts", "list", "--json")
    [entry] = json.loads(out)
    assert re.fullmatch(r"[A-Z0-9]{8,}", entry["role_id"])  # learnt by assuming the role, as onboarding does

    code, _, err = run(capsys, "doctor", "cli.hand", "999988887777")
    assert code == EXIT_NOT_FOUND and "not onboarded" in err and "accounts add" in err

    code, out, err = run(capsys, "grant", "cli.hand", ACCOUNT, "--ticket", "CS-9", "--ttl", "1h", "--json")
    assert code == EXIT_OK, err
    kid = json.loads(out)["kid"]
    code, out, _ = run(capsys, "doctor", "cli.hand", ACCOUNT)
    assert code == EXIT_OK and "9 passed, 0 failed, 0 skipped" in out
    code, out, _ = run(capsys, "list", ACCOUNT)
    assert code == EXIT_OK and "cli.hand" in out and kid in out
    code, out, _ = run(capsys, "reconcile", ACCOUNT)
    assert code == EXIT_OK

    code, _, err = run(capsys, "keys", "destroy", "no-such-kid")
    assert code == EXIT_NOT_FOUND and "no-such-kid" in err and "--yes" not in err
    code, _, err = run(capsys, "keys", "destroy", kid)
    assert code == EXIT_BAD_INPUT and "--yes" in err

    code, out, err = run(capsys, "revoke", "cli.hand", ACCOUNT, "--json")
    assert code == EXIT_OK, err
    assert "destroyed key" in {a["action"] for a in json.loads(out)}
    code, out, _ = run(capsys, "keys", "list", "--account", ACCOUNT)
    assert code == EXIT_OK and kid not in out

    # An account whose AWS cannot be reached: expire reports it and says so in its exit code.
    code, out, _ = run(capsys, "expire", "--aws-endpoint", "http://127.0.0.1:9", "--json")
    assert code == EXIT_CHECKS_FAILED
    assert [a["action"] for a in json.loads(out)] == ["skipped account"]


@pytest.mark.aws
def test_the_error_for_an_unassumable_role_says_nothing_was_registered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    registry = tmp_path / "accounts.json"
    code, _, err = run(
        capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", STACK, "--registry", str(registry),
        "--aws-endpoint", "http://127.0.0.1:9", "--json",
    )  # fmt: skip
    error = json.loads(err)
    assert code == error["exit_code"] == 5
    assert "nothing was registered" in error["error"] and "--no-verify" in error["error"]
    assert "testing" not in err
    assert not registry.exists()


@pytest.mark.aws
def test_thumbprint_of_a_live_server_by_url_with_curl_style_resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki("idp.example.test", tmp_path)
    with LoopbackIssuerServer(tmp_path / "www", pki) as server:
        port = server.port
        expected = pki.intermediate.fingerprint(hashes.SHA1()).hex()
        for target, resolve in (
            (f"https://idp.example.test:{port}/", f"idp.example.test:{port}:127.0.0.1"),
            (f"idp.example.test:{port}", f"idp.example.test:{port}:[127.0.0.1]"),
            ("https://idp.example.test/", f"idp.example.test=127.0.0.1:{port}"),
        ):
            code, out, err = run(
                capsys, "thumbprint", target, "--resolve", resolve, "--ca-bundle", str(pki.ca_file), "--json"
            )
            assert code == EXIT_OK, err
            assert json.loads(out)["thumbprint"] == expected


@pytest.mark.aws
@pytest.mark.slow
def test_demo_json_prints_one_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "demo", "--store", "memory", "--json", "--staff", "json.demo", "--account", DEMO_ACCOUNT
    )
    assert code == EXIT_OK, err
    result = json.loads(out)  # stdout is the JSON document and nothing else
    assert result["ok"] is True
    titles = [step["title"] for step in result["steps"]]
    assert titles[0] == "Start the embedded defaults" and any("Revoke" in t for t in titles)
    verify = next(s for s in result["steps"] if s["title"] == "Verify what STS will check")
    assert verify["details"]["checks"]["passed"] == 9
    revoked = next(s for s in result["steps"] if s["title"].startswith("Revoke"))
    assert any(r.startswith("destroyed key") for r in revoked["details"]["revoked"])


@pytest.mark.softhsm
@pytest.mark.aws
@pytest.mark.slow
def test_demo_serve_lets_the_provisioning_commands_run_outside_the_demo(
    pkcs11_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "hsm_keys.cli", "demo", "--serve", "--account", ACCOUNT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in SETTINGS},
    )
    try:
        assert server.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line, server.stderr.read() if server.stderr else "demo --serve exited"
            lines.append(line.rstrip("\n"))
            if line.startswith("hsm-keys revoke"):
                break
        exports = dict(re.findall(r"^export (\w+)=(.*)$", "\n".join(lines), re.MULTILINE))
        assert set(SETTINGS) <= set(exports)
        for name, value in exports.items():
            monkeypatch.setenv(name, value)
        commands = [line.split()[1:] for line in lines if line.startswith("hsm-keys ")]
        assert [c[0] for c in commands] == ["accounts", "grant", "doctor", "list", "revoke"]
        for argv in commands:
            code, out, err = run(capsys, *argv)
            assert code == EXIT_OK, (argv, out, err)
            if argv[0] == "doctor":
                assert "9 passed" in out
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert not Path(exports["HSM_KEYS_REGISTRY"]).parent.exists()  # its temporary files are gone


@pytest.mark.softhsm
def test_reconcile_cleans_an_unregistered_account_only_when_asked(
    pkcs11_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orphan = "585858585858"  # keys left behind for an account whose stack is gone
    monkeypatch.setenv("HSM_KEYS_REGISTRY", str(tmp_path / "accounts.json"))
    monkeypatch.setenv("HSM_KEYS_ISSUER_BASE", "https://idp.hsm-keys.test")
    monkeypatch.setenv("HSM_KEYS_PUBLISH_DIR", str(tmp_path / "issuers"))
    code, _, err = run(capsys, "accounts", "add", ACCOUNT, ROLE, "--stack-id", STACK, "--no-verify")
    assert code == EXIT_OK, err
    code, out, err = run(capsys, "keys", "generate", "--staff", "cli.orphan", "--account", orphan, "--json")
    assert code == EXIT_OK, err
    kid = json.loads(out)["kid"]
    try:
        code, _, err = run(capsys, "reconcile", orphan)
        assert code == EXIT_NOT_FOUND and "not onboarded" in err
        code, out, _ = run(capsys, "keys", "show", kid)
        assert code == EXIT_OK  # a mistyped account destroys nothing unasked

        # Named, so the registered account (whose AWS is not reachable here) is left alone.
        code, out, err = run(capsys, "reconcile", orphan, "--orphans", "--json")
        assert code == EXIT_OK, err
        assert (orphan, "destroyed key") in {(a["account"], a["action"]) for a in json.loads(out)}
        code, _, _ = run(capsys, "keys", "show", kid)
        assert code == EXIT_NOT_FOUND
    finally:
        run(capsys, "keys", "destroy", kid, "--yes")
