"""``hsm-keys``: a thin command line over the library.

Human-readable tables by default; every command takes ``--json`` for scripts, and with ``--json`` an
error is one JSON object on stderr, ``{"error": "...", "exit_code": N}``. Exit codes tell failures apart:

    0  success                      4  HSM / PKCS#11 error
    1  checks or repairs failed     5  AWS error (other than access denied)
    2  bad input or configuration   6  not found (key, grant, account)
    3  access denied / not owned    7  TLS or network error

Input and settings are checked before the HSM or AWS is touched, and every problem found is reported
in one run.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import functools
import ipaddress
import itertools
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

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
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_RE = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_URL_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: Registry codes that mean "this registration conflicts with what is recorded": the input is refused.
_REGISTRY_CONFLICTS = frozenset({"RegisteredByAnotherStack", "StackRetired"})
#: What STS accepts for web-identity tokens (the library checks again).
STS_ALGORITHM_NAMES = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]


# -- values ---------------------------------------------------------------------------------------


def parse_ttl(text: str) -> dt.timedelta:
    """``90m``, ``4h``, ``1d12h`` or plain seconds; :class:`InvalidInputError` for anything else."""
    text = text.strip().lower()
    if text.isascii() and text.isdigit():
        try:
            return dt.timedelta(seconds=int(text))
        except OverflowError:
            raise InvalidInputError(f"--ttl {text!r} is too long") from None
    parts = _TTL_RE.findall(text)
    if not text.isascii() or not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise InvalidInputError(f"--ttl {text!r} is not a duration (use e.g. 30m, 4h, 1d12h)")
    try:
        return dt.timedelta(**{_TTL_UNITS[u]: int(n) for n, u in parts})
    except OverflowError:
        raise InvalidInputError(f"--ttl {text!r} is too long") from None


def format_duration(value: dt.timedelta) -> str:
    """A duration the way ``--ttl`` takes it: ``400d``, ``1d12h``, ``90s``."""
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def ttl_bounds() -> tuple[dt.timedelta, dt.timedelta]:
    """The shortest and (by default) longest grant the library accepts."""
    from hsm_keys.provisioning.grants import MIN_TTL, GrantSettings

    defaults = {f.name: f.default for f in dataclasses.fields(GrantSettings)}
    maximum = defaults["max_ttl"]
    assert isinstance(maximum, dt.timedelta)
    return MIN_TTL, maximum


def check_ttl(text: str) -> dt.timedelta:
    """``--ttl`` parsed and within the library's bounds, worded in ``--ttl``'s own terms."""
    ttl = parse_ttl(text)
    low, high = ttl_bounds()
    if not low <= ttl <= high:
        raise InvalidInputError(
            f"--ttl must be between {format_duration(low)} and {format_duration(high)}, got {text.strip()}"
        )
    return ttl


def check_account(account: str) -> str:
    """One account-id rule and message for every command: the one :class:`Binding` applies."""
    Binding("x", account)
    return account


def check_binding(staff: str, account: str) -> Binding:
    return Binding(staff, account)


@dataclasses.dataclass(frozen=True)
class ResolveRule:
    """One ``--resolve``: connect to ``address:target_port`` instead of ``host`` (on ``port``, or any)."""

    text: str
    host: str
    port: int | None
    address: str
    target_port: int

    def applies(self, host: str, port: int) -> bool:
        return self.host == host.lower().rstrip(".") and self.port in (None, port)


def _port_of(text: str) -> int | None:
    return int(text) if _PORT_RE.fullmatch(text) and 0 < int(text) < 65536 else None


def _ip_address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_resolve(value: str) -> ResolveRule:
    """``HOST:PORT:ADDRESS`` (curl's ``--resolve``) or ``HOST=ADDRESS:PORT`` (any port of HOST).

    curl's form keeps the port: connections to HOST on PORT go to ADDRESS on PORT. The second form
    (what curl's ``--connect-to`` does) also changes the port, e.g. an issuer on 443 served by a
    loopback server on another port. ADDRESS is an IP address (IPv6 in brackets in the second form).
    """
    usage = f"--resolve {value!r} must be HOST:PORT:ADDRESS (as curl --resolve) or HOST=ADDRESS:PORT"
    if "=" in value:
        host, _, target = value.partition("=")
        if target.startswith("["):
            address, closed, rest = target[1:].partition("]")
            if not closed or not rest.startswith(":"):
                raise InvalidInputError(usage)
            port_text = rest[1:]
        else:
            address, colon, port_text = target.rpartition(":")
            if not colon or ":" in address:
                raise InvalidInputError(usage + " (put an IPv6 ADDRESS in brackets)" if colon else usage)
        target_port = _port_of(port_text)
        port = None
    else:
        host, first, rest = value.partition(":")
        port_text, second, address = rest.partition(":")
        if not first or not second:
            raise InvalidInputError(usage)
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        if "," in address:
            raise InvalidInputError(f"--resolve {value!r}: give one ADDRESS only")
        port = target_port = _port_of(port_text)
    if target_port is None:
        raise InvalidInputError(f"{usage}; PORT must be a number from 1 to 65535")
    if not _HOST_RE.fullmatch(host):
        raise InvalidInputError(f"{usage}; {host!r} is not a host name")
    ip = _ip_address(address)
    if ip is None:
        raise InvalidInputError(f"{usage}; ADDRESS {address!r} is not an IP address")
    return ResolveRule(value, host.lower().rstrip("."), port, ip, target_port)


def parse_resolve_all(values: Sequence[str] | None, problems: Problems) -> list[ResolveRule] | None:
    """Every ``--resolve`` parsed; None when any is malformed (each one reported to ``problems``)."""
    rules: list[ResolveRule] = []
    malformed = False
    for value in values or []:
        try:
            rules.append(parse_resolve(value))
        except InvalidInputError as exc:
            problems.add(str(exc))
            malformed = True
    return None if malformed else rules


def resolve_mapping(rules: Sequence[ResolveRule], host: str, port: int) -> dict[str, tuple[str, int]]:
    """The library's host -> (address, port) map for connections to ``host:port``.

    A rule that does not apply to ``host:port`` would silently do nothing, so it is refused.
    """
    unused = [r for r in rules if not r.applies(host, port)]
    if unused:
        rule = unused[0]
        hint = ""
        if rule.host == host.lower().rstrip(".") and rule.port is not None:
            hint = f" (to reach {host}:{port} at another port, use {host}={rule.address}:{rule.port})"
        raise InvalidInputError(
            f"--resolve {rule.text!r} is never used: connections go to {host}:{port}{hint}"
        )
    if len(rules) > 1:
        raise InvalidInputError(f"--resolve is given {len(rules)} times for {host}:{port}; give it once")
    return {rule.host: (rule.address, rule.target_port) for rule in rules}


def check_ca_bundle(path: str) -> str:
    """A readable PEM file with at least one certificate (what the TLS clients load)."""
    from cryptography import x509

    where = Path(path)
    if not where.exists():
        raise InvalidInputError(f"--ca-bundle {path}: no such file")
    if not where.is_file():
        raise InvalidInputError(f"--ca-bundle {path}: not a file")
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"--ca-bundle {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ValueError
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidInputError(f"--ca-bundle {path}: holds no PEM certificate") from None
    return path


class Problems:
    """Collects every input and settings problem, so one run reports them all."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, probe: Callable[[], Any]) -> Any:
        try:
            return probe()
        except InvalidInputError as exc:
            self.items.append(str(exc))
            return None

    def add(self, text: str) -> None:
        self.items.append(text)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigurationError(self.items[0])
        if self.items:
            raise ProblemsError(self.items)


class ProblemsError(ConfigurationError):
    """Several input or settings problems at once; ``problems`` lists them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


# -- errors and exit codes ------------------------------------------------------------------------


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (AccessDeniedError, NotOwnedError, LoginError)):
        return EXIT_DENIED
    if isinstance(exc, (InvalidInputError, KeyExistsError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, OnboardingError) and exc.code in _REGISTRY_CONFLICTS:
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


def error_message(exc: BaseException) -> str:
    message = str(exc)
    if isinstance(exc, OnboardingError) and exc.code == "NotRegistered":
        message += "; see `hsm-keys accounts list`, or register it by hand with `hsm-keys accounts add`"
    if isinstance(exc, OnboardingError) and exc.code == "RegisteredByAnotherStack":
        message += "; add --replace to replace that registration"
    return message


def report_error(message: str, code: int, *, as_json: bool, problems: Sequence[str] = ()) -> int:
    """One error on stderr: text, or with ``--json`` one JSON object (``problems`` when several)."""
    if as_json:
        data: dict[str, Any] = {"error": message, "exit_code": code}
        if problems:
            data["problems"] = list(problems)
        json.dump(data, sys.stderr, sort_keys=True)
        sys.stderr.write("\n")
    else:
        print(f"hsm-keys: error: {message}", file=sys.stderr)
    return code


class UsageError(Exception):
    """argparse refused the command line (reported by :func:`main`, exit code 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


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


def check_status(check: Any) -> str:
    """PASS, FAIL, or SKIP for a check ``verify`` did not run because one it needs failed."""
    return str(check.status)


def report_json(report: Any) -> dict[str, Any]:
    checks = [vars(c) | {"status": check_status(c)} for c in report.checks]
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in ("PASS", "FAIL", "SKIP")}
    return {
        "ok": report.ok,
        "passed": counts["PASS"],
        "failed": counts["FAIL"],
        "skipped": counts["SKIP"],
        "checks": checks,
    }


def report_lines(report: Any) -> list[str]:
    """``verify``'s report as ``doctor`` (and the demo) print it, with a summary line."""
    data = report_json(report)
    lines = [f"{c['status']}  {c['name']:<12} {c['detail']}" for c in data["checks"]]
    lines.append(f"{data['passed']} passed, {data['failed']} failed, {data['skipped']} skipped")
    return lines


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
    "the HSM is set by HSM_KEYS_PKCS11_MODULE, HSM_KEYS_TOKEN_LABEL and HSM_KEYS_PIN or HSM_KEYS_PIN_FILE "
    "(SoftHSM also needs SOFTHSM2_CONF); for the development token, run in the repository: "
    'eval "$(bash softhsm/setup-token.sh --dev)"'
)


def check_hsm_settings(problems: Problems) -> None:
    """The HSM settings that must be present (the key store checks the rest when it opens)."""
    env = os.environ.get
    if env("HSM_KEYS_PKCS11_URI"):
        return
    missing = []
    if not env("HSM_KEYS_TOKEN_LABEL"):
        missing.append("HSM_KEYS_TOKEN_LABEL")
    if not env("HSM_KEYS_PIN") and not env("HSM_KEYS_PIN_FILE"):
        missing.append("HSM_KEYS_PIN (or HSM_KEYS_PIN_FILE)")
    if missing:
        problems.add(f"the HSM is not configured: {' and '.join(missing)} not set; {SETUP_HINT}")


def open_store(args: argparse.Namespace) -> Any:
    from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore

    try:
        return Pkcs11KeyStore.from_env()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}; {SETUP_HINT}") from exc


def check_registry(args: argparse.Namespace, *, must_exist: bool = True) -> Path:
    path = Path(args.registry)
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"--registry {path}: not a file")
    if must_exist and not path.exists():
        raise InvalidInputError(
            f"account registry {path} does not exist: point --registry (or HSM_KEYS_REGISTRY) at the "
            "file onboarding writes, or register an account with `hsm-keys accounts add`"
        )
    return path


def check_provisioning(args: argparse.Namespace, problems: Problems) -> dict[str, Any]:
    """Every setting a provisioning command needs, each problem collected; the parsed values."""
    from hsm_keys.provisioning.issuer import IssuerScheme

    settings: dict[str, Any] = {}
    if not args.issuer_base:
        problems.add(
            "--issuer-base (or HSM_KEYS_ISSUER_BASE) is not set: the https base URL of every issuer, "
            "e.g. https://idp.example.com"
        )
    else:
        settings["issuer"] = problems.check(lambda: IssuerScheme(args.issuer_base))
    if not args.publish_dir:
        problems.add(
            "--publish-dir (or HSM_KEYS_PUBLISH_DIR) is not set: the directory issuer documents are "
            "written to (served at the issuer base)"
        )
    elif Path(args.publish_dir).exists() and not Path(args.publish_dir).is_dir():
        problems.add(f"--publish-dir {args.publish_dir}: not a directory")
    problems.check(lambda: check_registry(args))
    if args.ca_bundle:
        problems.check(lambda: check_ca_bundle(args.ca_bundle))
    rules = parse_resolve_all(resolve_values(args), problems)
    settings["resolve"] = {}
    if settings.get("issuer") is not None and rules is not None:
        host = settings["issuer"].host
        settings["resolve"] = problems.check(lambda: resolve_mapping(rules, host, 443)) or {}
    check_hsm_settings(problems)
    return settings


def resolve_values(args: argparse.Namespace) -> list[str]:
    """``--resolve`` values, or else the whitespace-separated ones in ``HSM_KEYS_RESOLVE``."""
    if args.resolve is not None:
        return list(args.resolve)
    return os.environ.get("HSM_KEYS_RESOLVE", "").split()


def open_access(args: argparse.Namespace, store: Any, settings: dict[str, Any]) -> Any:
    """SupportAccess from checked settings: the operations account's default AWS credentials."""
    from hsm_keys.provisioning.aws import AwsEnvironment
    from hsm_keys.provisioning.grants import GrantSettings, SupportAccess
    from hsm_keys.provisioning.issuer import DirectoryPublisher, HttpsOptions
    from hsm_keys.provisioning.registry import FileAccountRegistry

    https = HttpsOptions(resolve=settings["resolve"], ca_bundle=args.ca_bundle)
    grant_settings = GrantSettings(issuer=settings["issuer"], https=https)
    aws = AwsEnvironment(region=args.region, endpoint_url=args.aws_endpoint)
    return SupportAccess(
        store, FileAccountRegistry(args.registry), aws, DirectoryPublisher(args.publish_dir), grant_settings
    )


def provisioning(
    args: argparse.Namespace, checks: Callable[[Problems], Any] = lambda _: None
) -> tuple[Any, Any]:
    """Check the command's own input and every setting, then open the HSM and the access layer."""
    problems = Problems()
    checks(problems)
    settings = check_provisioning(args, problems)
    problems.raise_if_any()
    store = open_store(args)
    try:
        return store, open_access(args, store, settings)
    except BaseException:
        store.close()
        raise


# -- commands -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import io

    from hsm_keys.demo import run_demo, throwaway_softhsm_store
    from hsm_keys.keystore.memory import MemoryKeyStore

    problems = Problems()
    problems.check(lambda: check_binding(args.staff, args.account))
    if args.store == "configured" and not args.serve:
        check_hsm_settings(problems)
    problems.raise_if_any()
    if args.serve:
        import signal

        from hsm_keys.demo import serve_local

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)  # stop cleanly (temporary files removed) on SIGTERM too
        return serve_local(out=sys.stdout, account=args.account, as_json=args.json)
    factories: dict[str, Callable[[Path], Any]] = {
        "softhsm": throwaway_softhsm_store,
        "configured": lambda _: open_store(args),
        "memory": lambda _: MemoryKeyStore(),
    }
    transcript: list[dict[str, Any]] = []
    code = run_demo(
        factories[args.store],
        out=io.StringIO() if args.json else sys.stdout,
        staff=args.staff,
        account=args.account,
        ticket=args.ticket,
        transcript=transcript,
    )
    if args.json:
        emit(args, {"ok": code == EXIT_OK, "steps": transcript}, lambda out: None)
    return code


def _key_rows(keys: Sequence[KeyInfo]) -> list[list[str]]:
    return [[k.kid, k.spec.value, k.binding.staff, k.binding.account, k.created_at.isoformat()] for k in keys]


_KEY_HEADERS = ["KID", "SPEC", "STAFF", "ACCOUNT", "CREATED"]


def cmd_keys_generate(args: argparse.Namespace) -> int:
    problems = Problems()
    binding = problems.check(lambda: check_binding(args.staff, args.account))
    spec = problems.check(lambda: KeySpec.parse(args.spec))
    check_hsm_settings(problems)
    problems.raise_if_any()
    with open_store(args) as store:
        info = store.generate(spec, binding)
    emit(args, key_json(info), lambda out: table(_key_rows([info]), _KEY_HEADERS, out))
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    problems = Problems()
    if args.account is not None:
        problems.check(lambda: check_account(args.account))
    check_hsm_settings(problems)
    problems.raise_if_any()
    with open_store(args) as store:
        keys = store.list_keys()
    if args.account is not None:
        keys = [k for k in keys if k.binding.account == args.account]
    emit(args, [key_json(k) for k in keys], lambda out: table(_key_rows(keys), _KEY_HEADERS, out))
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    problems = Problems()
    check_hsm_settings(problems)
    problems.raise_if_any()
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
    problems = Problems()
    check_hsm_settings(problems)
    problems.raise_if_any()
    with open_store(args) as store:
        info = store.get(args.kid)  # a missing key is "not found" (6), whether or not --yes was given
        if not args.yes:
            raise InvalidInputError(f"destroying key {info.kid} ({info.binding}) cannot be undone: add --yes")
        store.destroy(info.kid)
    emit(args, {"destroyed": info.kid}, lambda out: print(f"destroyed {info.kid}", file=out))
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    problems = Problems()
    alg = problems.check(lambda: SignatureAlgorithm.parse(args.alg)) if args.alg else None
    check_hsm_settings(problems)
    problems.raise_if_any()
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    with open_store(args) as store:
        info = store.get(args.kid)
        alg = alg or info.default_algorithm
        signature = store.sign(info.kid, data, alg, verify=True)
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    emit(
        args, {"kid": info.kid, "alg": alg.value, "signature": encoded}, lambda out: print(encoded, file=out)
    )
    return EXIT_OK


def _host_port(target: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or ``https://host[:port][/path]``."""
    scheme = _URL_SCHEME_RE.match(target)
    if scheme:
        if scheme.group(1).lower() != "https":
            raise InvalidInputError(
                f"thumbprint reads the chain a TLS server sends: give an https:// URL, "
                f"not {scheme.group(1)}://"
            )
        parts = urllib.parse.urlsplit(target)
        if "@" in parts.netloc:
            raise InvalidInputError("the https:// URL must not carry a user name or password")
        try:
            url_port = parts.port or 443
        except ValueError:
            raise InvalidInputError(f"{target!r} has an invalid port") from None
        if not parts.hostname:
            raise InvalidInputError(f"{target!r} names no host")
        return parts.hostname, url_port
    if target.startswith("["):
        host, closed, rest = target[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise InvalidInputError(f"{target!r} is neither an existing file nor [IPv6]:PORT")
        port_text = rest[1:] if rest else "443"
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:
        host, port_text = target, "443"
    port = _port_of(port_text)
    if not host or port is None:
        raise InvalidInputError(f"{target!r} is neither an existing file nor HOST[:PORT]")
    return host, port


def check_chain_order(chain: Sequence[Any], source: str) -> None:
    """A bundle must run leaf first, each certificate followed by its issuer; never guess an order."""
    for index, (cert, issuer) in enumerate(itertools.pairwise(chain), 1):
        if cert.issuer != issuer.subject:
            raise InvalidInputError(
                f"{source}: certificate {index} ({cert.subject.rfc4514_string()}) is not issued by "
                f"certificate {index + 1} ({issuer.subject.rfc4514_string()}); put the leaf first, "
                "then each certificate's issuer"
            )


def cmd_thumbprint(args: argparse.Namespace) -> int:
    from hsm_keys.encoding.certificates import load_certificates
    from hsm_keys.encoding.iam import iam_thumbprint_certificate, oidc_thumbprint

    target = args.target
    path = Path(target)
    is_file = not _URL_SCHEME_RE.match(target) and (
        path.exists() or "/" in target or path.suffix.lower() in {".pem", ".crt", ".cer", ".der"}
    )
    if is_file:
        problems = Problems()
        if args.resolve or args.ca_bundle:
            problems.add("--resolve and --ca-bundle apply to a live HOST[:PORT] or URL, not to a file")
        problems.raise_if_any()
        try:
            chain = load_certificates(path.read_bytes())
        except EncodingError:
            raise InvalidInputError(f"no X.509 certificate found in {target} (PEM or DER expected)") from None
        check_chain_order(chain, target)
        source = target
    else:
        from hsm_keys.tls import fetch_chain

        problems = Problems()
        where = problems.check(lambda: _host_port(target))
        rules = parse_resolve_all(args.resolve, problems)
        resolve: dict[str, tuple[str, int]] = {}
        if where is not None and rules is not None:
            resolve = problems.check(lambda: resolve_mapping(rules, *where)) or {}
        if args.ca_bundle:
            problems.check(lambda: check_ca_bundle(args.ca_bundle))
        problems.raise_if_any()
        host, port = where
        chain = fetch_chain(host, port, resolve=resolve, ca_bundle=args.ca_bundle)
        source = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    thumbprint = oidc_thumbprint(chain)
    subject = iam_thumbprint_certificate(chain).subject.rfc4514_string()
    emit(
        args,
        {"source": source, "thumbprint": thumbprint, "certificate": subject, "chain_length": len(chain)},
        lambda out: print(f"{thumbprint}  ({subject}; {len(chain)} certificate(s) from {source})", file=out),
    )
    return EXIT_OK


def cmd_grant(args: argparse.Namespace) -> int:
    from hsm_keys.provisioning.grants import validate_ticket

    ttl: list[dt.timedelta] = []

    def checks(problems: Problems) -> None:
        problems.check(lambda: check_binding(args.staff, args.account))
        problems.check(lambda: validate_ticket(args.ticket))
        problems.check(lambda: ttl.append(check_ttl(args.ttl)))

    store, access = provisioning(args, checks)
    with store:
        grant = access.grant(args.staff, args.account, ticket=args.ticket, ttl=ttl[0], alg=args.alg)

    def human(out: TextIO) -> None:
        table([[k, v] for k, v in grant.to_json().items() if k != "notes"], ["FIELD", "VALUE"], out)
        for note in grant.notes:
            print(f"note: {note}", file=out)

    emit(args, grant.to_json(), human)
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    store, access = provisioning(args, lambda p: p.check(lambda: check_binding(args.staff, args.account)))
    with store:
        actions = access.revoke(args.staff, args.account)
    emit_actions(args, actions)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    store, access = provisioning(args, lambda p: p.check(lambda: check_account(args.account)))
    with store:
        grants = access.list_grants(args.account)
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
    def checks(problems: Problems) -> None:
        for account in args.account:
            problems.check(functools.partial(check_account, account))

    store, access = provisioning(args, checks)
    with store:
        accounts = list(args.account) or [r.account_id for r in access.registry.accounts()]
        if args.orphans and not args.account:
            accounts += access.orphaned_accounts()
        if not args.orphans:
            for account in args.account:
                # Unregistered: "not found" before any repair. Cleaning it destroys keys, which a
                # mistyped account id must not do unasked.
                access.registry.require(account)
        actions = []
        for index, account in enumerate(accounts, 1):
            actions += access.reconcile(account)
            progress(index, len(accounts), "reconciling")
    emit_actions(args, actions)
    return EXIT_OK if all(a.ok for a in actions) else EXIT_CHECKS_FAILED


def cmd_expire(args: argparse.Namespace) -> int:
    store, access = provisioning(args)
    with store:
        actions = access.expire()
    emit_actions(args, actions)
    return EXIT_OK if all(a.ok for a in actions) else EXIT_CHECKS_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    store, access = provisioning(args, lambda p: p.check(lambda: check_binding(args.staff, args.account)))
    with store:
        access.registry.require(args.account)  # not onboarded: "not found" (6), as list and revoke
        report = access.verify(args.staff, args.account)
    emit(args, report_json(report), lambda out: print("\n".join(report_lines(report)), file=out))
    return EXIT_OK if report.ok else EXIT_CHECKS_FAILED


def _registration_rows(registrations: Sequence[Any]) -> list[list[str]]:
    return [
        [r.account_id, r.role_arn, r.stack_id, r.registered_at.isoformat(), r.role_id or "-"]
        for r in registrations
    ]


_REGISTRATION_HEADERS = ["ACCOUNT", "ROLE", "STACK", "REGISTERED", "ROLE ID"]


def cmd_accounts_list(args: argparse.Namespace) -> int:
    from hsm_keys.provisioning.registry import FileAccountRegistry

    check_registry(args)
    registrations = FileAccountRegistry(args.registry).accounts()
    emit(
        args,
        [r.to_json() for r in registrations],
        lambda out: table(_registration_rows(registrations), _REGISTRATION_HEADERS, out),
    )
    return EXIT_OK


def cmd_accounts_add(args: argparse.Namespace) -> int:
    from hsm_keys.provisioning.registry import AccountRegistration, FileAccountRegistry

    problems = Problems()
    registration: Any = None
    if problems.check(lambda: check_account(args.account)) is not None:
        registration = problems.check(
            lambda: AccountRegistration(
                account_id=args.account,
                role_arn=args.role_arn,
                stack_id=args.stack_id,
                registered_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
            )
        )
    problems.check(lambda: check_registry(args, must_exist=False))
    problems.raise_if_any()
    registry = FileAccountRegistry(args.registry)
    current = registry.get(args.account)
    if args.verify:
        from hsm_keys.provisioning.aws import AwsEnvironment

        aws = AwsEnvironment(region=args.region, endpoint_url=args.aws_endpoint)
        try:
            role_id = aws.management_role_id(args.account, args.role_arn)
        except OnboardingError as exc:
            raise OnboardingError(
                f"{exc}; nothing was registered (--no-verify registers without this check)",
                operation=exc.operation,
                code=exc.code,
            ) from exc
        registration = dataclasses.replace(registration, role_id=role_id)
    replacing = current if args.replace and current is not None else None
    changed = registry.register(registration, replacing=replacing)
    stored = registry.require(args.account)
    verb = "registered" if changed else "already registered"
    emit(
        args,
        stored.to_json() | {"changed": changed},
        lambda out: print(f"{verb} account {stored.account_id} with role {stored.role_arn}", file=out),
    )
    return EXIT_OK


def cmd_accounts_remove(args: argparse.Namespace) -> int:
    from hsm_keys.provisioning.registry import FileAccountRegistry

    problems = Problems()
    problems.check(lambda: check_account(args.account))
    problems.check(lambda: check_registry(args))
    problems.raise_if_any()
    registry = FileAccountRegistry(args.registry)
    current = registry.require(args.account)  # not registered: "not found" (6), --yes or not
    if not args.yes:
        raise InvalidInputError(
            f"removing account {args.account} retires its stack ({current.stack_id}) and does not revoke "
            "its grants (revoke them first): add --yes"
        )
    registry.deregister(args.account, stack_id=current.stack_id)
    emit(
        args,
        current.to_json() | {"removed": True},
        lambda out: print(
            f"removed account {args.account} (stack {current.stack_id} retired; grants were not revoked)",
            file=out,
        ),
    )
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------

EPILOG = """\
HSM settings: HSM_KEYS_PKCS11_URI, or HSM_KEYS_PKCS11_MODULE + HSM_KEYS_TOKEN_LABEL +
  HSM_KEYS_PIN or HSM_KEYS_PIN_FILE; SoftHSM also needs SOFTHSM2_CONF. For the project's
  development token run, from the repository:  eval "$(bash softhsm/setup-token.sh --dev)"
Provisioning commands (grant, revoke, list, reconcile, expire, doctor) read the account registry
  (--registry; `accounts add` registers an account by hand) and use the operations account's AWS
  credentials from the usual boto3 sources (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...); --aws-endpoint
  sends every AWS call to one endpoint, e.g. a local moto server.
With --json, output is JSON and an error is {"error": ..., "exit_code": N} on stderr.
Exit codes: 0 ok, 1 checks or repairs failed (doctor, reconcile, expire), 2 bad input,
  3 access denied, 4 HSM error, 5 AWS error, 6 not found, 7 TLS error."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hsm-keys",
        description="HSM-backed keys and read-only AWS support access per (staff, account).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hsm-keys {__version__}")
    env = os.environ.get

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output (errors too)")

    registry_opts = _Parser(add_help=False)
    registry_opts.add_argument(
        "--registry",
        default=env("HSM_KEYS_REGISTRY", "accounts.json"),
        help="account registry file (HSM_KEYS_REGISTRY; default: %(default)s)",
    )

    aws_opts = _Parser(add_help=False)
    aws_opts.add_argument(
        "--region",
        default=env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1",
        help="AWS region for STS and IAM calls (AWS_REGION; default: %(default)s)",
    )
    aws_opts.add_argument(
        "--aws-endpoint",
        default=env("HSM_KEYS_AWS_ENDPOINT"),
        metavar="URL",
        help="send every AWS call to this endpoint, e.g. a local moto server http://127.0.0.1:5000 "
        "(HSM_KEYS_AWS_ENDPOINT)",
    )

    def tls_options(ca_bundle_env: str | None, resolve_env: str | None) -> argparse.ArgumentParser:
        options = _Parser(add_help=False)
        options.add_argument(
            "--ca-bundle",
            default=env(ca_bundle_env) if ca_bundle_env else None,
            metavar="PEM",
            help="PEM file of CA certificates to trust instead of the system store"
            + (f" ({ca_bundle_env})" if ca_bundle_env else ""),
        )
        options.add_argument(
            "--resolve",
            action="append",
            metavar="HOST:PORT:ADDRESS",
            help="connect to ADDRESS for HOST on PORT, as curl --resolve; HOST=ADDRESS:PORT also changes "
            "the port (certificate and SNI checks keep HOST); repeatable"
            + (f" (default: {resolve_env}, space-separated)" if resolve_env else ""),
        )
        return options

    tls_opts = tls_options("HSM_KEYS_CA_BUNDLE", "HSM_KEYS_RESOLVE")

    issuer_opts = _Parser(add_help=False)
    issuer_opts.add_argument(
        "--issuer-base",
        default=env("HSM_KEYS_ISSUER_BASE"),
        metavar="URL",
        help="https base URL of every issuer, no port (HSM_KEYS_ISSUER_BASE)",
    )
    issuer_opts.add_argument(
        "--publish-dir",
        default=env("HSM_KEYS_PUBLISH_DIR"),
        metavar="DIR",
        help="where issuer documents are written, to be served at the issuer base (HSM_KEYS_PUBLISH_DIR)",
    )

    provisioning_parents = [common, registry_opts, issuer_opts, aws_opts, tls_opts]
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        group: Any, name: str, summary: str, parents: Sequence[argparse.ArgumentParser], **kwargs: Any
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, help=summary, description=summary[:1].upper() + summary[1:] + ".", parents=parents, **kwargs
        )
        return sub

    def staff_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "staff", metavar="STAFF", help="staff id, e.g. jane.doe (letters, digits and +=,.@_-)"
        )

    def account_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("account", metavar="ACCOUNT", help="customer AWS account id (12 digits)")

    demo = add(commands, "demo", "run the main job end to end on a local AWS and issuer", [common])
    demo.add_argument(
        "--store",
        choices=["softhsm", "configured", "memory"],
        default="softhsm",
        help="keys in a throwaway SoftHSM token (default), the configured HSM, or memory",
    )
    demo.add_argument(
        "--serve",
        action="store_true",
        help="instead, keep a local AWS and issuer running and print the settings that point the "
        "provisioning commands at them (until Ctrl-C)",
    )
    demo.add_argument("--staff", default="jane.doe", help="staff id to grant (default: %(default)s)")
    demo.add_argument("--account", default="111122223333", help="customer account (default: %(default)s)")
    demo.add_argument("--ticket", default="CS-1042", help="support ticket (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    grant = add(
        commands, "grant", "grant a staff member read-only access to an account", provisioning_parents
    )
    staff_arg(grant)
    account_arg(grant)
    grant.add_argument("--ticket", required=True, help="support ticket the grant is for, e.g. CS-1042")
    grant.add_argument("--ttl", required=True, help="how long the grant lasts: 1m to 30d, e.g. 30m, 4h, 1d")
    grant.add_argument(
        "--alg", default="ES256", choices=STS_ALGORITHM_NAMES, help="token algorithm (default: %(default)s)"
    )
    grant.set_defaults(func=cmd_grant)

    revoke = add(commands, "revoke", "remove a staff member's access and key", provisioning_parents)
    staff_arg(revoke)
    account_arg(revoke)
    revoke.set_defaults(func=cmd_revoke)

    listing = add(commands, "list", "list the grants in an account", provisioning_parents)
    account_arg(listing)
    listing.set_defaults(func=cmd_list)

    reconcile = add(commands, "reconcile", "repair drift between the HSM and IAM", provisioning_parents)
    reconcile.add_argument(
        "account", nargs="*", metavar="ACCOUNT", help="accounts (default: every registered account)"
    )
    reconcile.add_argument(
        "--orphans",
        action="store_true",
        help="also clean accounts that are not registered (stack deleted): destroy their keys and "
        "unpublish their issuers; no AWS call is made for them",
    )
    reconcile.set_defaults(func=cmd_reconcile)

    expire = add(commands, "expire", "revoke every grant past its expiry", provisioning_parents)
    expire.set_defaults(func=cmd_expire)

    doctor = add(commands, "doctor", "check a grant the way STS will", provisioning_parents)
    staff_arg(doctor)
    account_arg(doctor)
    doctor.set_defaults(func=cmd_doctor)

    accounts = add(commands, "accounts", "show or change the registry of onboarded accounts", [])
    account_commands = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    accounts_list = add(account_commands, "list", "list the registered accounts", [common, registry_opts])
    accounts_list.set_defaults(func=cmd_accounts_list)
    accounts_add = add(
        account_commands,
        "add",
        "register an account by hand (e.g. when its stack's notification was lost)",
        [common, registry_opts, aws_opts],
    )
    account_arg(accounts_add)
    accounts_add.add_argument(
        "role_arn", metavar="ROLE_ARN", help="the stack's management role, arn:aws:iam::ACCOUNT:role/NAME"
    )
    accounts_add.add_argument(
        "--stack-id",
        required=True,
        metavar="STACK_ARN",
        help="ARN of the customer's support-access stack (so its later Update and Delete are recognised)",
    )
    accounts_add.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not assume the role first (by default it is assumed from the operations account and "
        "its unique id recorded, as onboarding does)",
    )
    accounts_add.add_argument(
        "--replace", action="store_true", help="replace a registration made by another stack"
    )
    accounts_add.set_defaults(func=cmd_accounts_add)
    accounts_remove = add(
        account_commands,
        "remove",
        "deregister an account and retire its stack (grants are not revoked)",
        [common, registry_opts],
    )
    account_arg(accounts_remove)
    accounts_remove.add_argument("--yes", action="store_true", help="confirm")
    accounts_remove.set_defaults(func=cmd_accounts_remove)

    keys = add(commands, "keys", "generate, list, show or destroy keys in the HSM", [])
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = add(key_commands, "generate", "generate a (staff, account) binding's key", [common])
    generate.add_argument("--staff", required=True, help="staff id, e.g. jane.doe")
    generate.add_argument("--account", required=True, help="customer AWS account id (12 digits)")
    generate.add_argument(
        "--spec",
        default="EC_P256",
        help=f"key type, one of {', '.join(s.value for s in KeySpec)} (default: %(default)s)",
    )
    generate.set_defaults(func=cmd_keys_generate)
    key_list = add(key_commands, "list", "list the keys in the HSM", [common])
    key_list.add_argument("--account", help="only this account's keys (12 digits)")
    key_list.set_defaults(func=cmd_keys_list)
    show = add(key_commands, "show", "show a key's public half (JWK and PEM)", [common])
    show.add_argument("kid", metavar="KID", help="key id (RFC 7638 thumbprint), from `keys list`")
    show.set_defaults(func=cmd_keys_show)
    destroy = add(key_commands, "destroy", "destroy a key (cannot be undone)", [common])
    destroy.add_argument("kid", metavar="KID", help="key id, from `keys list`")
    destroy.add_argument("--yes", action="store_true", help="confirm")
    destroy.set_defaults(func=cmd_keys_destroy)

    sign = add(
        commands,
        "sign",
        "sign a file (or stdin) with a key in the HSM",
        [common],
        epilog="Prints the signature as in a JWS: base64url without padding of the raw JOSE signature "
        "(for ES* the fixed-width r||s, not DER; for RS*, PS* and EdDSA the signature bytes). "
        "--json prints kid, alg and signature.",
    )
    sign.add_argument("kid", metavar="KID", help="key id, from `keys list`")
    sign.add_argument("input", metavar="FILE", help="file to sign, or - for standard input")
    sign.add_argument(
        "--alg", choices=[a.value for a in SignatureAlgorithm], help="algorithm (default: the key's own)"
    )
    sign.set_defaults(func=cmd_sign)

    thumbprint = add(
        commands,
        "thumbprint",
        "IAM OIDC thumbprint of a PEM chain file or a live TLS server",
        [common, tls_options(None, None)],
        epilog="A chain file must run leaf first, each certificate followed by its issuer.",
    )
    thumbprint.add_argument(
        "target",
        metavar="TARGET",
        help="PEM/DER chain file, HOST[:PORT], [IPv6]:PORT, or https://HOST[:PORT]/ (port 443 by default)",
    )
    thumbprint.set_defaults(func=cmd_thumbprint)
    return parser


def _wants_json(argv: list[str]) -> bool:
    """``--json`` among the options (not after ``--``): errors, even usage errors, are then JSON."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(arguments)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except UsageError as exc:
        if as_json:
            return report_error(str(exc), EXIT_BAD_INPUT, as_json=True)
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except HsmKeysError as exc:
        return report_error(
            error_message(exc),
            exit_code_for(exc),
            as_json=as_json,
            problems=exc.problems if isinstance(exc, ProblemsError) else (),
        )
    except OSError as exc:
        where = getattr(exc, "filename", None)
        message = f"{where}: {exc.strerror}" if where and exc.strerror else (exc.strerror or str(exc))
        return report_error(message, EXIT_BAD_INPUT, as_json=as_json)
    except KeyboardInterrupt:
        return report_error("interrupted", 130, as_json=as_json)
    except Exception as exc:  # the last guard: one line, never a traceback (unless asked for)
        if os.environ.get("HSM_KEYS_DEBUG"):
            raise
        return report_error(
            f"unexpected error: {type(exc).__name__} (set HSM_KEYS_DEBUG=1 for details)", 1, as_json=as_json
        )


if __name__ == "__main__":
    raise SystemExit(main())
