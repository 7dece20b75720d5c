"""The main job, end to end, on the embedded defaults (``make demo`` / ``hsm-keys demo``).

A SoftHSM token, a local AWS (moto server on loopback, real boto3 clients over HTTP) and a loopback
HTTPS issuer with a real certificate chain. Each step prints what it did and what it checked, and is
also recorded in ``transcript`` (what ``hsm-keys demo --json`` prints).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from hsm_keys.errors import ConfigurationError, KeyExistsError
from hsm_keys.keystore.base import KeyStore
from hsm_keys.local.environment import DEFAULT_CUSTOMER_ACCOUNT, LocalEnvironment
from hsm_keys.provisioning.issuer import https_get
from hsm_keys.types import Binding

DEMO_TOKEN = "hsm-keys-demo"


class _Steps:
    """Prints each step and records it: ``{"step", "title", "details": {label: value}, "ok": [...]}``."""

    def __init__(self, out: TextIO, transcript: list[dict[str, Any]]) -> None:
        self.out = out
        self.transcript = transcript
        self.number = 0

    @property
    def _current(self) -> dict[str, Any]:
        return self.transcript[-1]

    def step(self, title: str) -> None:
        self.number += 1
        self.transcript.append({"step": self.number, "title": title, "details": {}, "ok": []})
        print(f"\n[{self.number}] {title}", file=self.out, flush=True)

    def show(self, label: str, value: Any) -> None:
        self._current["details"][label] = value
        print(f"    {label:<26} {value}", file=self.out, flush=True)

    def show_each(self, label: str, values: list[str]) -> None:
        """One line per value, recorded as a list under ``label``."""
        self._current["details"][label] = values
        for value in values:
            print(f"    {label:<26} {value}", file=self.out, flush=True)

    def ok(self, text: str) -> None:
        self._current["ok"].append(text)
        print(f"    ok: {text}", file=self.out, flush=True)

    def report(self, report: Any) -> None:
        """``verify``'s report, rendered as ``hsm-keys doctor`` renders it (PASS / FAIL / SKIP)."""
        from hsm_keys.cli import report_json, report_lines

        self._current["details"]["checks"] = report_json(report)
        for line in report_lines(report):
            print(f"    {line}", file=self.out, flush=True)


def _verify_with_pyjwt(token: str, jwks: dict[str, Any], issuer: str, audience: str) -> dict[str, Any]:
    """Independent check: PyJWT verifies the HSM-signed token against the published JWKS."""
    import jwt  # PyJWT: an independent implementation, not our code

    header = jwt.get_unverified_header(token)
    entry = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    key = jwt.PyJWK(entry)
    return dict(jwt.decode(token, key.key, algorithms=[header["alg"]], audience=audience, issuer=issuer))


def throwaway_softhsm_store(directory: Path) -> KeyStore:
    """A fresh SoftHSM token of the demo's own, so the demo never touches a user's keys.

    Must run before this process first loads the SoftHSM module (SoftHSM reads SOFTHSM2_CONF once).
    """
    from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore, find_softhsm_module

    module = find_softhsm_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise ConfigurationError(
            "SoftHSM2 is not installed (apt-get install softhsm2), or use --store memory"
        )
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin = secrets.token_hex(12)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            DEMO_TOKEN,
            "--pin",
            pin,
            "--so-pin",
            secrets.token_hex(12),
        ],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return Pkcs11KeyStore(module, DEMO_TOKEN, pin)


def run_demo(
    store_factory: Callable[[Path], KeyStore],
    *,
    out: TextIO,
    staff: str = "jane.doe",
    account: str = DEFAULT_CUSTOMER_ACCOUNT,
    ticket: str = "CS-1042",
    workdir: Path | None = None,
    transcript: list[dict[str, Any]] | None = None,
) -> int:
    """Run the whole flow; returns 0 when every step checked out.

    Each step is also appended to ``transcript`` (when given) as a JSON-ready dict.
    """
    steps = _Steps(out, transcript if transcript is not None else [])
    binding = Binding(staff, account)  # bad input fails here, before anything starts
    with tempfile.TemporaryDirectory(prefix="hsm-keys-demo-") as scratch:
        root = Path(workdir or scratch)
        steps.step("Start the embedded defaults")
        store = store_factory(root / "hsm")
        if store.find(binding) is not None:
            store.close()
            raise KeyExistsError(
                f"{binding} already has a key in this store; the demo will not touch it "
                "(use another --staff or the demo's own throwaway token)"
            )
        with store, LocalEnvironment(root, store) as env:
            steps.show("key store", repr(store))
            steps.show("local AWS (moto)", env.aws.endpoint_url)
            steps.show("issuer host", f"https://{env.issuer_host} -> 127.0.0.1:{env.issuer_server.port}")
            steps.show("issuer chain", "private root -> intermediate -> leaf (TLS on loopback)")

            steps.step(f"Customer {account} deploys the published CloudFormation template")
            customer = env.deploy_stack(account)
            steps.show("stack", customer.stack_id)
            steps.show("management role", customer.role_arn)

            steps.step("Onboarding: the template's Custom::Hook reaches our handler")
            response = env.send_hook("Create", account)
            steps.show("answer to CloudFormation", f"{response['Status']} ({response['PhysicalResourceId']})")
            if response["Status"] != "SUCCESS":
                steps.show("reason", response.get("Reason"))
                return 1

            steps.step(f"Grant {staff} read-only access for ticket {ticket}")
            grant = env.access.grant(staff, account, ticket=ticket, ttl=dt.timedelta(hours=4))
            steps.show("key (kid)", f"{grant.kid} ({grant.alg.value}, in the HSM, non-extractable)")
            steps.show("issuer", grant.issuer)
            steps.show("OIDC provider", grant.provider_arn)
            steps.show("thumbprint", ", ".join(grant.thumbprints))
            steps.show("role", grant.role_arn)
            steps.show("expires", grant.expires_at.isoformat())

            steps.step("Verify what STS will check")
            report = env.access.verify(staff, account)
            steps.report(report)
            if not report.ok:
                return 1

            steps.step("Obtain read-only credentials through STS AssumeRoleWithWebIdentity")
            session = env.access.credentials(staff, account)
            sts = env.aws.client("sts", session)
            identity = sts.get_caller_identity()
            steps.show("caller", identity["Arn"])
            iam = env.aws.client("iam", session)
            roles = iam.list_roles()["Roles"]
            steps.ok(f"read call iam:ListRoles with the support credentials saw {len(roles)} role(s)")

            steps.step("Check the token with an independent JWT library (PyJWT) against the published JWKS")
            token = env.access.mint_token(binding, grant.kid, grant.alg)
            status, body = https_get(f"{grant.issuer}/jwks.json", env.https)
            claims = _verify_with_pyjwt(token, json.loads(body), grant.issuer, "sts.amazonaws.com")
            steps.ok(
                f"PyJWT verified the signature (HTTP {status} JWKS); sub={claims['sub']} aud={claims['aud']}"
            )

            steps.step(f"Revoke {staff}'s access")
            actions = env.access.revoke(staff, account)
            steps.show_each("revoked", [f"{action.action} {action.target}" for action in actions])

            steps.step("Nothing is left behind")
            admin_iam = env.aws.client("iam", env.aws.session_in(account))
            left_roles = [
                r["RoleName"]
                for r in admin_iam.list_roles()["Roles"]
                if r["RoleName"].startswith("DoiT-Support")
            ]
            left_providers = admin_iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]
            left_key = store.find(binding)
            steps.show("DoiT-Support roles", left_roles or "none")
            steps.show("OIDC providers", [p["Arn"] for p in left_providers] or "none")
            steps.show("key in the HSM", left_key.kid if left_key else "none")
            if left_roles or left_providers or left_key:
                return 1

            steps.step("Customer deletes the stack: the hook's Delete is answered")
            response = env.send_hook("Delete", account)
            steps.show("answer to CloudFormation", response["Status"])
            steps.show("still registered", env.registry.get(account) is not None)
        print("\nDemo complete: access was granted, verified, used read-only, and revoked.", file=out)
    return 0


#: moto accepts any credentials and acts as its default account (the operations account the local
#: stack trusts); these placeholders name no real account and open nothing.
LOCAL_AWS_PLACEHOLDERS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def serve_local(
    *,
    out: TextIO,
    account: str = DEFAULT_CUSTOMER_ACCOUNT,
    as_json: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Keep a local AWS and HTTPS issuer running for the other commands (``hsm-keys demo --serve``).

    The customer ``account`` deploys the published template, but its onboarding notification is not
    sent: registering the account is left to ``hsm-keys accounts add``. Prints the settings that point
    the provisioning commands here, then serves until interrupted (or ``stop`` is set). Keys live in
    whatever HSM those commands are configured with; this process holds none.
    """
    from hsm_keys.keystore.memory import MemoryKeyStore

    Binding("x", account)  # a bad account fails before anything starts
    stop = stop or threading.Event()
    with (
        tempfile.TemporaryDirectory(prefix="hsm-keys-local-") as scratch,
        MemoryKeyStore() as store,
        LocalEnvironment(Path(scratch), store) as env,
    ):
        customer = env.deploy_stack(account)
        address, port = env.issuer_server.address
        settings = {
            "HSM_KEYS_REGISTRY": str(env.registry.path),
            "HSM_KEYS_ISSUER_BASE": f"https://{env.issuer_host}",
            "HSM_KEYS_PUBLISH_DIR": str(env.issuer_server.root),
            "HSM_KEYS_AWS_ENDPOINT": env.aws.endpoint_url,
            "HSM_KEYS_CA_BUNDLE": str(env.pki.ca_file),
            "HSM_KEYS_RESOLVE": f"{env.issuer_host}={address}:{port}",
            **LOCAL_AWS_PLACEHOLDERS,
        }
        register = f"hsm-keys accounts add {account} {customer.role_arn} --stack-id {customer.stack_id}"
        if as_json:
            data = {
                "account": account,
                "role_arn": customer.role_arn,
                "stack_id": customer.stack_id,
                "environment": settings,
            }
            print(json.dumps(data, indent=2, sort_keys=True), file=out, flush=True)
        else:
            lines = [
                "# A local AWS (moto) and HTTPS issuer for the provisioning commands; Ctrl-C stops both.",
                f"# Customer {account} has deployed the support-access stack; its onboarding",
                "# notification was not sent. In another shell (the HSM configured as usual):",
                *(f"export {name}={value}" for name, value in settings.items()),
                register,
                f"hsm-keys grant jane.doe {account} --ticket CS-1042 --ttl 1h",
                f"hsm-keys doctor jane.doe {account}",
                f"hsm-keys list {account}",
                f"hsm-keys revoke jane.doe {account}",
            ]
            print("\n".join(lines), file=out, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    if not as_json:
        print("# stopped; the local AWS and issuer are gone", file=out, flush=True)
    return 0
