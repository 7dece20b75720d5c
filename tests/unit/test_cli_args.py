"""``hsm-keys`` input handling that needs neither the HSM nor AWS: every problem is caught, worded in
the command line's own terms and reported at once, before anything is opened."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from hsm_keys.cli import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    ResolveRule,
    _host_port,
    build_parser,
    format_duration,
    main,
    parse_resolve,
    resolve_mapping,
)
from hsm_keys.errors import InvalidInputError
from hsm_keys.local.pki import make_pki
from hsm_keys.types import Binding

ACCOUNT = "222233334444"
BAD_ACCOUNTS = ["1111222233334", "abc", "11112222333"]


@pytest.fixture(autouse=True)
def _no_provisioning_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "HSM_KEYS_REGISTRY",
        "HSM_KEYS_ISSUER_BASE",
        "HSM_KEYS_PUBLISH_DIR",
        "HSM_KEYS_AWS_ENDPOINT",
        "HSM_KEYS_CA_BUNDLE",
        "HSM_KEYS_RESOLVE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Complete provisioning flags over an existing registry (nothing is contacted in these tests)."""
    registry = tmp_path / "registry.json"
    code, _, err = run(
        capsys,
        "accounts",
        "add",
        "333344445555",
        "arn:aws:iam::333344445555:role/DoiT_Management_Role_DO-NOT-DELETE",
        "--stack-id",
        "arn:aws:cloudformation:us-east-1:333344445555:stack/support/0f0e5c1a-1111-2222-3333-444455556666",
        "--no-verify",
        "--registry",
        str(registry),
    )
    assert code == EXIT_OK, err
    return [
        "--registry",
        str(registry),
        "--issuer-base",
        "https://idp.example.com",
        "--publish-dir",
        str(tmp_path / "issuer"),
    ]


# -- account ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_ACCOUNTS)
def test_every_command_rejects_a_malformed_account_the_same_way(
    bad: str, settings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InvalidInputError) as raised:
        Binding("jane.doe", bad)
    expected = f"hsm-keys: error: {raised.value}\n"
    commands = [
        ["keys", "generate", "--staff", "jane.doe", "--account", bad],
        ["keys", "list", "--account", bad],
        ["grant", "jane.doe", bad, "--ticket", "CS-1", "--ttl", "1h", *settings],
        ["revoke", "jane.doe", bad, *settings],
        ["list", bad, *settings],
        ["doctor", "jane.doe", bad, *settings],
        ["reconcile", bad, *settings],
        ["reconcile", "333344445555", bad, *settings],
        [
            "accounts",
            "add",
            bad,
            f"arn:aws:iam::{ACCOUNT}:role/R",
            "--stack-id",
            f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/s/1",
            "--no-verify",
        ],
        ["accounts", "remove", bad, "--yes", "--registry", settings[1]],
        ["demo", "--account", bad, "--store", "memory"],
    ]
    for argv in commands:
        code, out, err = run(capsys, *argv)
        assert code == EXIT_BAD_INPUT, argv
        assert out == "" and err == expected, argv


# -- settings -------------------------------------------------------------------------------------


def test_every_missing_setting_is_reported_in_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "list", "111122223333")
    assert code == EXIT_BAD_INPUT and out == ""
    for name in ("--issuer-base", "--publish-dir", "accounts.json does not exist"):
        assert name in err
    assert "3 problems" in err
    code, _, err = run(capsys, "list", "111122223333", "--json")
    error = json.loads(err)
    assert error["exit_code"] == EXIT_BAD_INPUT and len(error["problems"]) == 3
    assert error["error"].startswith("3 problems")


def test_a_missing_registry_is_reported_and_not_created(
    tmp_path: Path, settings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "accounts.json"
    flags = [*settings[2:], "--registry", str(missing)]
    for argv in (["list", ACCOUNT], ["expire"], ["reconcile"], ["accounts", "list"]):
        code, _, err = run(capsys, *argv, *(flags if argv[0] != "accounts" else flags[-2:]))
        assert code == EXIT_BAD_INPUT and f"account registry {missing} does not exist" in err, argv
        assert "accounts add" in err
    assert not missing.parent.exists()


def test_ttl_messages_are_in_the_command_lines_terms(
    settings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for ttl in ("0m", "30s", "400d", "30d1s"):
        code, _, err = run(capsys, "grant", "jane.doe", ACCOUNT, "--ticket", "CS-1", "--ttl", ttl, *settings)
        assert code == EXIT_BAD_INPUT
        assert err == f"hsm-keys: error: --ttl must be between 1m and 30d, got {ttl}\n"
    code, _, err = run(capsys, "grant", "jane.doe", ACCOUNT, "--ticket", "CS-1", "--ttl", "soon", *settings)
    assert code == EXIT_BAD_INPUT and "--ttl 'soon' is not a duration" in err
    assert "timedelta" not in err and "datetime" not in err


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (dt.timedelta(days=400), "400d"),
        (dt.timedelta(days=1, hours=12), "1d12h"),
        (dt.timedelta(seconds=90), "1m30s"),
        (dt.timedelta(0), "0s"),
    ],
)
def test_format_duration(value: dt.timedelta, text: str) -> None:
    assert format_duration(value) == text


def test_a_missing_or_unusable_ca_bundle_names_the_file(
    tmp_path: Path, settings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    not_pem = tmp_path / "not-a-bundle.pem"
    not_pem.write_text("hello\n")
    for bundle, reason in (
        ("/nonexistent/ca.pem", "no such file"),
        (str(tmp_path), "not a file"),
        (str(not_pem), "holds no PEM certificate"),
    ):
        code, _, err = run(capsys, "list", ACCOUNT, "--ca-bundle", bundle, *settings)
        assert code == EXIT_BAD_INPUT
        assert err == f"hsm-keys: error: --ca-bundle {bundle}: {reason}\n"
    code, _, err = run(capsys, "thumbprint", "idp.example.com", "--ca-bundle", "/nonexistent/ca.pem")
    assert code == EXIT_BAD_INPUT and "--ca-bundle /nonexistent/ca.pem: no such file" in err


# -- --resolve ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (
            "idp.test:18443:127.0.0.1",
            ResolveRule("idp.test:18443:127.0.0.1", "idp.test", 18443, "127.0.0.1", 18443),
        ),
        ("IdP.Test:443:[::1]", ResolveRule("IdP.Test:443:[::1]", "idp.test", 443, "::1", 443)),
        ("idp.test:443:::1", ResolveRule("idp.test:443:::1", "idp.test", 443, "::1", 443)),
        (
            "idp.test=127.0.0.1:18443",
            ResolveRule("idp.test=127.0.0.1:18443", "idp.test", None, "127.0.0.1", 18443),
        ),
        ("idp.test=[::1]:18443", ResolveRule("idp.test=[::1]:18443", "idp.test", None, "::1", 18443)),
    ],
)
def test_resolve_takes_curls_form_and_the_port_changing_form(value: str, rule: ResolveRule) -> None:
    assert parse_resolve(value) == rule


@pytest.mark.parametrize(
    "value",
    [
        "idp.test",
        "idp.test:18443",
        "idp.test:18443:",
        ":18443:127.0.0.1",
        "idp.test:abc:127.0.0.1",
        "idp.test:0:127.0.0.1",
        "idp.test:65536:127.0.0.1",
        "idp.test:443:not-an-address",
        "idp.test:443:127.0.0.1,127.0.0.2",
        "idp test:443:127.0.0.1",
        "=127.0.0.1:443",
        "idp.test=127.0.0.1",
        "idp.test=::1:443",
        "idp.test=[::1]",
        "idp.test=localhost:443",
    ],
)
def test_a_malformed_resolve_is_refused(value: str) -> None:
    with pytest.raises(InvalidInputError, match="--resolve"):
        parse_resolve(value)


def test_a_resolve_that_would_never_be_used_is_refused() -> None:
    curl = parse_resolve("idp.test:18443:127.0.0.1")
    assert resolve_mapping([curl], "idp.test", 18443) == {"idp.test": ("127.0.0.1", 18443)}
    with pytest.raises(InvalidInputError, match=r"never used.*idp\.test=127\.0\.0\.1:18443"):
        resolve_mapping([curl], "idp.test", 443)  # an issuer is reached on 443
    with pytest.raises(InvalidInputError, match="never used"):
        resolve_mapping([parse_resolve("other.test=127.0.0.1:1")], "idp.test", 443)
    rules = [parse_resolve("idp.test=127.0.0.1:1"), parse_resolve("idp.test=127.0.0.1:2")]
    with pytest.raises(InvalidInputError, match="2 times"):
        resolve_mapping(rules, "idp.test", 443)


def test_the_cli_refuses_malformed_or_unused_resolves(
    settings: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "list", ACCOUNT, "--resolve", "idp.example.com", *settings)
    assert code == EXIT_BAD_INPUT and "must be HOST:PORT:ADDRESS" in err
    code, _, err = run(capsys, "list", ACCOUNT, "--resolve", "idp.example.com:18443:127.0.0.1", *settings)
    assert code == EXIT_BAD_INPUT and "is never used" in err
    code, _, err = run(capsys, "thumbprint", "idp.test:18443", "--resolve", "idp.test:443:127.0.0.1")
    assert code == EXIT_BAD_INPUT and "is never used" in err
    code, _, err = run(capsys, "thumbprint", "idp.test:18443", "--resolve", "idp.test:18443:nope")
    assert code == EXIT_BAD_INPUT and "not an IP address" in err


# -- thumbprint targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("https://idp.test:18443/", ("idp.test", 18443)),
        ("https://IdP.test/some/path?q=1", ("idp.test", 443)),
        ("https://[::1]:8443/", ("::1", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::1]", ("::1", 443)),
        ("idp.test:8443", ("idp.test", 8443)),
        ("idp.test", ("idp.test", 443)),
    ],
)
def test_thumbprint_targets(target: str, expected: tuple[str, int]) -> None:
    assert _host_port(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://idp.test/", "give an https:// URL, not http://"),
        ("ftp://idp.test/", "not ftp://"),
        ("https://user:secret@idp.test/", "user name or password"),
        ("https://idp.test:99999/", "invalid port"),
        ("[::1]x", "[IPv6]:PORT"),
        ("idp.test:0", "HOST[:PORT]"),
    ],
)
def test_bad_thumbprint_targets(target: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "thumbprint", target)
    assert code == EXIT_BAD_INPUT and message in err
    assert "secret" not in err
    assert "No such file" not in err


def test_a_chain_file_out_of_order_is_refused_not_guessed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki("idp.example.test", tmp_path)
    pem = serialization.Encoding.PEM
    wrong = tmp_path / "wrong-order.pem"
    wrong.write_bytes(pki.intermediate.public_bytes(pem) + pki.leaf.public_bytes(pem))
    code, out, err = run(capsys, "thumbprint", str(wrong))
    assert code == EXIT_BAD_INPUT and out == ""
    assert "certificate 1" in err and "not issued by certificate 2" in err and "leaf first" in err
    gap = tmp_path / "missing-intermediate.pem"
    gap.write_bytes(pki.leaf.public_bytes(pem) + pki.root.public_bytes(pem))
    code, _, err = run(capsys, "thumbprint", str(gap))
    assert code == EXIT_BAD_INPUT and "not issued by" in err
    for good in ([pki.leaf], [pki.leaf, pki.intermediate], [pki.leaf, pki.intermediate, pki.root]):
        chain = tmp_path / "good.pem"
        chain.write_bytes(b"".join(c.public_bytes(pem) for c in good))
        code, _, err = run(capsys, "thumbprint", str(chain))
        assert code == EXIT_OK, err
    code, _, err = run(capsys, "thumbprint", str(chain), "--resolve", "a:1:127.0.0.1")
    assert code == EXIT_BAD_INPUT and "not to a file" in err


# -- --json errors, help --------------------------------------------------------------------------


def test_with_json_every_error_is_a_json_object_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, code in (
        (["keys", "list", "--account", "abc", "--json"], EXIT_BAD_INPUT),
        (["grant", "--json"], EXIT_BAD_INPUT),  # a usage error, found by argparse
        (["demo", "--json", "--store", "nope"], EXIT_BAD_INPUT),
        (["thumbprint", "http://x/", "--json"], EXIT_BAD_INPUT),
        (["accounts", "list", "--json"], EXIT_BAD_INPUT),
    ):
        result, out, err = run(capsys, *argv)
        assert result == code and out == ""
        error = json.loads(err)
        assert error["exit_code"] == code and isinstance(error["error"], str) and error["error"], argv
    _, _, err = run(capsys, "grant")
    assert err.startswith("usage: hsm-keys grant") and "error: the following arguments are required" in err


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        else:
            yield path, action
    yield path, parser


def test_every_command_and_option_has_help() -> None:
    for path, item in _walk(build_parser()):
        if isinstance(item, argparse.ArgumentParser):
            assert path == () or item.description, path
        elif not isinstance(item, argparse._HelpAction):
            assert item.help, (path, item.dest)


def _help(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hsm_keys.cli", *argv, "--help"], capture_output=True, text=True, check=True
    )
    return result.stdout


def test_help_texts() -> None:
    top = _help()
    assert "setup-token.sh --dev" in top and "SOFTHSM2_CONF" in top and "--aws-endpoint" in top
    assert "accounts" in top and "reconcile" in top
    for argv, needles in {
        ("demo",): ["--serve"],
        ("grant",): ["--region", "HOST:PORT:ADDRESS", "1m to 30d"],
        ("accounts", "add"): ["--stack-id", "ROLE_ARN", "--no-verify", "--replace"],
        ("keys", "generate"): ["(default: EC_P256)"],
        ("sign",): ["base64url", "r||s"],
        ("thumbprint",): ["https://", "[IPv6]:PORT", "--resolve", "--ca-bundle", "leaf first"],
    }.items():
        text = _help(*argv)
        for needle in needles:
            assert needle in text, (argv, needle)
