"""``hsm-keys``: a thin command line over the library.

Human-readable tables by default, ``--json`` for scripts. Exit codes tell failures apart:

    0  success                      4  HSM / PKCS#11 error
    1  checks failed (doctor)       5  AWS error (other than access denied)
    2  bad input or configuration   6  not found (key, grant, account)
    3  access denied / not owned    7  TLS or network error
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from hsm_keys import __version__
from hsm_keys.errors import (
    AccessDeniedError,
    AwsError,
    ConfigurationError,
    EncodingError,
    HsmKeysError,
    InvalidInputError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreError,
    LoginError,
    NotOwnedError,
    OnboardingError,
    TlsError,
)
from hsm_keys.types import Binding, KeyInfo, KeySpec, SignatureAlgorithm

EXIT_OK, EXIT_CHECKS_FAILED, EXIT_BAD_INPUT, EXIT_DENIED, EXIT_HSM, EXIT_AWS, EXIT_NOT_FOUND, EXIT_TLS = (
    range(8)
)

_TTL_RE = re.compile(r"(\d+)\s*([smhd])")
_TTL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_ttl(text: str) -> dt.timedelta:
    """``90m``, ``4h``, ``1d12h`` or plain seconds."""
    text = text.strip().lower()
    if text.isdigit():
        try:
            return dt.timedelta(seconds=int(text))
        except OverflowError:
            raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from None
    parts = _TTL_RE.findall(text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 30m, 4h, 1d)")
    try:
        return dt.timedelta(**{_TTL_UNITS[u]: int(n) for n, u in parts})
    except OverflowError:
        raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from None


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (AccessDeniedError, NotOwnedError, LoginError)):
        return EXIT_DENIED
    if isinstance(exc, (InvalidInputError, KeyExistsError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyNotFoundError) or (
        isinstance(exc, OnboardingError) and exc.code == "NotRegistered"
    ):
        return EXIT_NOT_FOUND
    if isinstance(exc, KeyStoreError):
        return EXIT_HSM
    if isinstance(exc, AwsError):
        return EXIT_AWS
    if isinstance(exc, TlsError):
        return EXIT_TLS
    return EXIT_HSM if isinstance(exc, HsmKeysError) else 1


# -- output ---------------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: TextIO) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out
        )
        if index == 0:
            print("  ".join("-" * width for width in widths), file=out)
    if not rows:
        print("(none)", file=out)


def key_json(info: KeyInfo) -> dict[str, Any]:
    from hsm_keys.encoding.jwk import public_key_to_jwk

    return {
        "kid": info.kid,
        "spec": info.spec.value,
        "staff": info.binding.staff,
        "account": info.binding.account,
        "label": info.label,
        "created_at": info.created_at.isoformat(),
        "jwk": public_key_to_jwk(info.public_key) | {"kid": info.kid},
    }


def emit(args: argparse.Namespace, data: Any, human: Callable[[TextIO], None]) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        human(sys.stdout)


def emit_actions(args: argparse.Namespace, actions: Sequence[Any]) -> None:
    """What revoke / reconcile / expire did, one row per action."""
    emit(
        args,
        [vars(a) for a in actions],
        lambda out: table(
            [[a.account, a.action, a.target, a.detail] for a in actions],
            ["ACCOUNT", "ACTION", "TARGET", "DETAIL"],
            out,
        ),
    )


def progress(done: int, total: int, label: str) -> None:
    """A one-line progress indicator on stderr (only when stderr is a terminal)."""
    if sys.stderr.isatty() and total > 1:
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# -- wiring ---------------------------------------------------------------------------------------


SETUP_HINT = (
    "configure the HSM with HSM_KEYS_PKCS11_MODULE, HSM_KEYS_TOKEN_LABEL and "
    "HSM_KEYS_PIN or HSM_KEYS_PIN_FILE "
    '(for the development token: eval "$(bash softhsm/setup-token.sh --dev)")'
)


def open_store(args: argparse.Namespace) -> Any:
    from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore

    try:
        return Pkcs11KeyStore.from_env()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}; {SETUP_HINT}") from exc


def _resolve_option(values: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``HOST=ADDRESS:PORT``: reach HOST's HTTPS at ADDRESS:PORT (SNI and certificate checks keep HOST)."""
    mapping: dict[str, tuple[str, int]] = {}
    for value in values:
        host, _, target = value.partition("=")
        address, _, port = target.rpartition(":")
        if not host or not address or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInputError(f"--resolve {value!r} must look like HOST=ADDRESS:PORT")
        mapping[host.lower()] = (address.strip("[]"), int(port))
    return mapping


def open_access(args: argparse.Namespace, store: Any) -> Any:
    """SupportAccess from flags / environment: the operations account's default AWS credentials."""
    from hsm_keys.provisioning.aws import AwsEnvironment
    from hsm_keys.provisioning.grants import GrantSettings, SupportAccess
    from hsm_keys.provisioning.issuer import DirectoryPublisher, HttpsOptions, IssuerScheme
    from hsm_keys.provisioning.registry import FileAccountRegistry

    if not args.issuer_base:
        raise InvalidInputError("set --issuer-base or HSM_KEYS_ISSUER_BASE (e.g. https://idp.example.com)")
    if not args.publish_dir:
        raise InvalidInputError(
            "set --publish-dir or HSM_KEYS_PUBLISH_DIR (where issuer documents are written)"
        )
    https = HttpsOptions(resolve=_resolve_option(args.resolve or []), ca_bundle=args.ca_bundle)
    settings = GrantSettings(issuer=IssuerScheme(args.issuer_base), https=https)
    aws = AwsEnvironment(region=args.region, endpoint_url=args.aws_endpoint)
    return SupportAccess(
        store, FileAccountRegistry(args.registry), aws, DirectoryPublisher(args.publish_dir), settings
    )


# -- commands -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from hsm_keys.demo import run_demo, throwaway_softhsm_store
    from hsm_keys.keystore.memory import MemoryKeyStore

    factories: dict[str, Callable[[Path], Any]] = {
        "softhsm": throwaway_softhsm_store,
        "configured": lambda _: open_store(args),
        "memory": lambda _: MemoryKeyStore(),
    }
    return run_demo(
        factories[args.store], out=sys.stdout, staff=args.staff, account=args.account, ticket=args.ticket
    )


def cmd_keys_generate(args: argparse.Namespace) -> int:
    binding = Binding(args.staff, args.account)
    spec = KeySpec.parse(args.spec)
    with open_store(args) as store:
        info = store.generate(spec, binding)
    emit(
        args,
        key_json(info),
        lambda out: table(
            [
                [
                    info.kid,
                    info.spec.value,
                    info.binding.staff,
                    info.binding.account,
                    info.created_at.isoformat(),
                ]
            ],
            ["KID", "SPEC", "STAFF", "ACCOUNT", "CREATED"],
            out,
        ),
    )
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        keys = store.list_keys()
    if args.account:
        keys = [k for k in keys if k.binding.account == args.account]
    emit(
        args,
        [key_json(k) for k in keys],
        lambda out: table(
            [
                [k.kid, k.spec.value, k.binding.staff, k.binding.account, k.created_at.isoformat()]
                for k in keys
            ],
            ["KID", "SPEC", "STAFF", "ACCOUNT", "CREATED"],
            out,
        ),
    )
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    with open_store(args) as store:
        info = store.get(args.kid)
    pem = info.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    data = key_json(info) | {"public_key_pem": pem}

    def human(out: TextIO) -> None:
        for name in ("kid", "spec", "staff", "account", "label", "created_at"):
            print(f"{name:<11} {data[name]}", file=out)
        print(f"{'jwk':<11} {json.dumps(data['jwk'], sort_keys=True)}", file=out)
        print(pem, end="", file=out)

    emit(args, data, human)
    return EXIT_OK


def cmd_keys_destroy(args: argparse.Namespace) -> int:
    if not args.yes:
        raise InvalidInputError("destroying a key cannot be undone: add --yes")
    with open_store(args) as store:
        store.destroy(args.kid)
    emit(args, {"destroyed": args.kid}, lambda out: print(f"destroyed {args.kid}", file=out))
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    with open_store(args) as store:
        info = store.get(args.kid)
        alg = SignatureAlgorithm.parse(args.alg) if args.alg else info.default_algorithm
        signature = store.sign(info.kid, data, alg, verify=True)
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    emit(
        args, {"kid": info.kid, "alg": alg.value, "signature": encoded}, lambda out: print(encoded, file=out)
    )
    return EXIT_OK


def _host_port(target: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest.removeprefix(":") or "443"
    elif target.count(":") == 1:
        host, _, port = target.partition(":")
    else:
        host, port = target, "443"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"{target!r} is neither an existing file nor HOST[:PORT]")
    return host, int(port)


def cmd_thumbprint(args: argparse.Namespace) -> int:
    from hsm_keys.encoding.certificates import load_certificates
    from hsm_keys.encoding.iam import iam_thumbprint_certificate, oidc_thumbprint

    target = args.target
    path = Path(target)
    if path.exists() or "/" in target or path.suffix.lower() in {".pem", ".crt", ".cer", ".der"}:
        try:
            chain = load_certificates(path.read_bytes())
        except EncodingError:
            raise InvalidInputError(f"no X.509 certificate found in {target} (PEM or DER expected)") from None
        source = target
    else:
        from hsm_keys.tls import fetch_chain

        host, port = _host_port(target)
        chain = fetch_chain(host, port, resolve=_resolve_option(args.resolve or []), ca_bundle=args.ca_bundle)
        source = f"{host}:{port}"
    thumbprint = oidc_thumbprint(chain)
    subject = iam_thumbprint_certificate(chain).subject.rfc4514_string()
    emit(
        args,
        {"source": source, "thumbprint": thumbprint, "certificate": subject, "chain_length": len(chain)},
        lambda out: print(f"{thumbprint}  ({subject}; {len(chain)} certificate(s) from {source})", file=out),
    )
    return EXIT_OK


def cmd_grant(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        grant = open_access(args, store).grant(
            args.staff, args.account, ticket=args.ticket, ttl=args.ttl, alg=args.alg
        )
    emit(
        args,
        grant.to_json(),
        lambda out: table([[k, v] for k, v in grant.to_json().items()], ["FIELD", "VALUE"], out),
    )
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        actions = open_access(args, store).revoke(args.staff, args.account)
    emit_actions(args, actions)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        grants = open_access(args, store).list_grants(args.account)
    emit(
        args,
        [g.to_json() for g in grants],
        lambda out: table(
            [[g.staff, g.ticket, g.expires_at.isoformat(), g.alg.value, g.kid] for g in grants],
            ["STAFF", "TICKET", "EXPIRES", "ALG", "KID"],
            out,
        ),
    )
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        access = open_access(args, store)
        accounts = args.account or [r.account_id for r in access.registry.accounts()]
        actions = []
        for index, account in enumerate(accounts, 1):
            actions += access.reconcile(account)
            progress(index, len(accounts), "reconciling")
    emit_actions(args, actions)
    return EXIT_OK if all(a.ok for a in actions) else EXIT_CHECKS_FAILED


def cmd_expire(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        actions = open_access(args, store).expire()
    emit_actions(args, actions)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        report = open_access(args, store).verify(args.staff, args.account)
    emit(
        args,
        {"ok": report.ok, "checks": [vars(c) for c in report.checks]},
        lambda out: print(str(report), file=out),
    )
    return EXIT_OK if report.ok else EXIT_CHECKS_FAILED


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsm-keys",
        description="HSM-backed keys and read-only AWS support access per (staff, account).",
        epilog="PKCS#11 settings: HSM_KEYS_PKCS11_URI, or HSM_KEYS_PKCS11_MODULE + HSM_KEYS_TOKEN_LABEL +\n"
        "  HSM_KEYS_PIN or HSM_KEYS_PIN_FILE (SoftHSM also reads SOFTHSM2_CONF).\n"
        "Exit codes: 0 ok, 1 checks failed, 2 bad input, 3 access denied, 4 HSM error,\n"
        "  5 AWS error, 6 not found, 7 TLS error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hsm-keys {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    aws = argparse.ArgumentParser(add_help=False, parents=[common])
    env = os.environ.get
    aws.add_argument(
        "--registry",
        default=env("HSM_KEYS_REGISTRY", "accounts.json"),
        help="account registry file (HSM_KEYS_REGISTRY)",
    )
    aws.add_argument(
        "--issuer-base",
        default=env("HSM_KEYS_ISSUER_BASE"),
        help="https base of every issuer (HSM_KEYS_ISSUER_BASE)",
    )
    aws.add_argument(
        "--publish-dir",
        default=env("HSM_KEYS_PUBLISH_DIR"),
        help="where issuer documents are written (HSM_KEYS_PUBLISH_DIR)",
    )
    aws.add_argument(
        "--aws-endpoint",
        default=env("HSM_KEYS_AWS_ENDPOINT"),
        help="send AWS calls to this endpoint, e.g. a local moto server (HSM_KEYS_AWS_ENDPOINT)",
    )
    aws.add_argument("--region", default=env("AWS_REGION", "us-east-1"))
    aws.add_argument("--ca-bundle", default=env("HSM_KEYS_CA_BUNDLE"), help="CA file to trust for issuers")
    aws.add_argument(
        "--resolve",
        action="append",
        metavar="HOST=ADDRESS:PORT",
        help="connect to ADDRESS for HOST:PORT (like curl --resolve)",
    )

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the main job on the embedded defaults")
    demo.add_argument(
        "--store",
        choices=["softhsm", "configured", "memory"],
        default="softhsm",
        help="keys in a throwaway SoftHSM token (default), the configured HSM, or memory",
    )
    demo.add_argument("--staff", default="jane.doe")
    demo.add_argument("--account", default="111122223333")
    demo.add_argument("--ticket", default="CS-1042")
    demo.set_defaults(func=cmd_demo)

    grant = commands.add_parser("grant", parents=[aws], help="grant read-only access to a staff member")
    grant.add_argument("staff")
    grant.add_argument("account")
    grant.add_argument("--ticket", required=True)
    grant.add_argument("--ttl", type=parse_ttl, required=True, help="e.g. 30m, 4h, 1d")
    grant.add_argument(
        "--alg", default="ES256", choices=["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]
    )
    grant.set_defaults(func=cmd_grant)

    revoke = commands.add_parser("revoke", parents=[aws], help="remove a staff member's access")
    revoke.add_argument("staff")
    revoke.add_argument("account")
    revoke.set_defaults(func=cmd_revoke)

    listing = commands.add_parser("list", parents=[aws], help="list the grants in an account")
    listing.add_argument("account")
    listing.set_defaults(func=cmd_list)

    reconcile = commands.add_parser("reconcile", parents=[aws], help="repair drift between HSM and IAM")
    reconcile.add_argument("account", nargs="*", help="accounts (default: every registered account)")
    reconcile.set_defaults(func=cmd_reconcile)

    expire = commands.add_parser("expire", parents=[aws], help="revoke every grant past its expiry")
    expire.set_defaults(func=cmd_expire)

    doctor = commands.add_parser("doctor", parents=[aws], help="check a grant the way STS will")
    doctor.add_argument("staff")
    doctor.add_argument("account")
    doctor.set_defaults(func=cmd_doctor)

    keys = commands.add_parser("keys", help="manage keys in the HSM")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = key_commands.add_parser("generate", parents=[common], help="generate a binding's key")
    generate.add_argument("--staff", required=True)
    generate.add_argument("--account", required=True)
    generate.add_argument("--spec", default="EC_P256", help=", ".join(s.value for s in KeySpec))
    generate.set_defaults(func=cmd_keys_generate)
    key_list = key_commands.add_parser("list", parents=[common], help="list keys")
    key_list.add_argument("--account")
    key_list.set_defaults(func=cmd_keys_list)
    show = key_commands.add_parser("show", parents=[common], help="show a key's public half")
    show.add_argument("kid")
    show.set_defaults(func=cmd_keys_show)
    destroy = key_commands.add_parser("destroy", parents=[common], help="destroy a key")
    destroy.add_argument("kid")
    destroy.add_argument("--yes", action="store_true", help="confirm")
    destroy.set_defaults(func=cmd_keys_destroy)

    sign = commands.add_parser("sign", parents=[common], help="sign a file (or stdin) with a key")
    sign.add_argument("kid")
    sign.add_argument("input", help="file to sign, or - for standard input")
    sign.add_argument("--alg", choices=[a.value for a in SignatureAlgorithm], help="default: the key's")
    sign.set_defaults(func=cmd_sign)

    thumbprint = commands.add_parser(
        "thumbprint", parents=[common], help="IAM OIDC thumbprint of a PEM chain file or a live HOST[:PORT]"
    )
    thumbprint.add_argument("target")
    thumbprint.add_argument("--ca-bundle")
    thumbprint.add_argument("--resolve", action="append", metavar="HOST=ADDRESS:PORT")
    thumbprint.set_defaults(func=cmd_thumbprint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except HsmKeysError as exc:
        print(f"hsm-keys: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except OSError as exc:
        print(
            f"hsm-keys: error: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hsm-keys: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last guard: one line, never a traceback (unless asked for)
        if os.environ.get("HSM_KEYS_DEBUG"):
            raise
        print(
            f"hsm-keys: unexpected error: {type(exc).__name__} (set HSM_KEYS_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
