"""The main job, end to end, on the embedded defaults (``make demo`` / ``hsm-keys demo``).

A SoftHSM token, a local AWS (moto server on loopback, real boto3 clients over HTTP) and a loopback
HTTPS issuer with a real certificate chain. Each step prints what it did and what it checked.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import tempfile
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
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.number = 0

    def step(self, title: str) -> None:
        self.number += 1
        print(f"\n[{self.number}] {title}", file=self.out, flush=True)

    def show(self, label: str, value: Any) -> None:
        print(f"    {label:<26} {value}", file=self.out, flush=True)

    def ok(self, text: str) -> None:
        print(f"    ok: {text}", file=self.out, flush=True)


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
) -> int:
    """Run the whole flow; returns 0 when every step checked out."""
    steps = _Steps(out)
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
            for line in str(report).splitlines():
                print(f"    {line}", file=out)
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
            for action in env.access.revoke(staff, account):
                steps.show("revoked", f"{action.action} {action.target}")

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
