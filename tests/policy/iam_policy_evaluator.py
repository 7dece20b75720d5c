"""Python side of the test-only IAM policy evaluator (``evaluate.mjs`` over ``@cloud-copilot/iam-simulate``).

moto does not enforce IAM policies, so the tests ask a real policy evaluator whether each recorded
call -- action, resource ARN, condition context -- is allowed by the customers' management policy::

    evaluator = PolicyEvaluator.find()            # None when node is not installed
    decisions = evaluator.evaluate_recorded(recorder)
    evaluator.assert_all_allowed(decisions)

All requests of one call to :meth:`PolicyEvaluator.evaluate` go to one node process.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsm_keys import templates
from hsm_keys.provisioning.recorder import CallRecorder
from hsm_keys.provisioning.scope import AuthorizationRequest

POLICY_DIR = Path(__file__).resolve().parent
SIMULATOR = POLICY_DIR / "node_modules" / "@cloud-copilot" / "iam-simulate" / "package.json"
MANAGEMENT_POLICY_NAME = "DoiT_Customer_Policy_DO-NOT-DELETE"
SESSION_NAME = "hsm-keys"
_install_lock = threading.Lock()


@dataclass(frozen=True)
class Decision:
    """The evaluator's answer for one authorisation request."""

    request: AuthorizationRequest
    account_id: str
    decision: str  # Allowed | ImplicitlyDenied | ExplicitlyDenied | Error
    errors: Any = None
    ignored_context_keys: tuple[str, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.decision == "Allowed"

    def __str__(self) -> str:
        extra = f" {json.dumps(self.errors)}" if self.errors else ""
        return f"{self.decision}: {self.request} in {self.account_id}{extra}"


def management_principal(account_id: str, partition: str = "aws") -> str:
    """The session ARN the provider's code acts as in a customer account."""
    role = templates.management_role_name()
    return f"arn:{partition}:sts::{account_id}:assumed-role/{role}/{SESSION_NAME}"


def _resource_account(resource: str, default: str) -> str:
    """The account owning ``resource``; AWS managed policies (``aws``) are readable by every account."""
    parts = resource.split(":")
    owner = parts[4] if len(parts) > 5 else ""
    return default if owner in ("", "aws") else owner


def _json_context(context: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in context.items()}


class PolicyEvaluator:
    """Runs ``evaluate.mjs`` with node; one subprocess per batch of requests."""

    def __init__(self, node: str, directory: Path = POLICY_DIR, *, timeout: float = 120.0) -> None:
        self.node = node
        self.directory = directory
        self.timeout = timeout

    @classmethod
    def find(cls) -> PolicyEvaluator | None:
        """An evaluator if node is installed (installing the locked npm packages if needed), else None."""
        node = shutil.which("node")
        if node is None:
            return None
        with _install_lock:
            if not SIMULATOR.exists():
                npm = shutil.which("npm")
                if npm is None:
                    raise RuntimeError(
                        f"node is installed but npm is not: cannot install {POLICY_DIR}/node_modules"
                    )
                subprocess.run(
                    [npm, "ci", "--silent", "--no-audit", "--no-fund"],
                    cwd=POLICY_DIR,
                    check=True,
                    timeout=600,
                )
        return cls(node)

    def evaluate(
        self,
        requests: Sequence[AuthorizationRequest],
        *,
        account_id: str,
        policy: Mapping[str, Any] | None = None,
        partition: str = "aws",
        principal: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> list[Decision]:
        """Decisions for ``requests`` made in ``account_id`` under ``policy`` (default: the template's).

        The request context holds what AWS would supply for a call through the management role
        (principal, account, secure transport, time, region) plus each request's own keys.
        """
        if not requests:
            return []
        policy = policy if policy is not None else templates.management_policy(account_id, partition)
        principal = principal or management_principal(account_id, partition)
        now = dt.datetime.now(dt.UTC)
        base_context = {
            "aws:PrincipalArn": f"arn:{partition}:iam::{account_id}:role/{templates.management_role_name()}",
            "aws:PrincipalAccount": account_id,
            "aws:PrincipalType": "AssumedRole",
            "aws:SecureTransport": "true",
            "aws:CurrentTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "aws:EpochTime": str(int(now.timestamp())),
            "aws:RequestedRegion": "us-east-1",
            **(context or {}),
        }
        payload = {
            "policies": [{"name": MANAGEMENT_POLICY_NAME, "policy": policy}],
            "requests": [
                {
                    "principal": principal,
                    "action": request.action,
                    "resource": request.resource,
                    "accountId": _resource_account(request.resource, account_id),
                    "context": _json_context({**base_context, **request.context}),
                }
                for request in requests
            ],
        }
        completed = subprocess.run(
            [self.node, str(self.directory / "evaluate.mjs")],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            cwd=self.directory,
            timeout=self.timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"policy evaluator exited with {completed.returncode}: {completed.stderr[-2000:]}"
            )
        results = json.loads(completed.stdout)["results"]
        if len(results) != len(requests):
            raise RuntimeError(f"policy evaluator answered {len(results)} of {len(requests)} requests")
        return [
            Decision(
                request=request,
                account_id=account_id,
                decision=str(result["decision"]),
                errors=result.get("errors"),
                ignored_context_keys=tuple(result.get("ignoredContextKeys") or ()),
            )
            for request, result in zip(requests, results, strict=True)
        ]

    def evaluate_recorded(self, recorder: CallRecorder, *, partition: str = "aws") -> list[Decision]:
        """Decisions for every IAM authorisation the recorder's calls needed, account by account."""
        by_account: dict[str, list[AuthorizationRequest]] = {}
        for call in recorder.calls:
            requests = call.authorizations()  # raises for calls the mapping does not know
            if requests:
                by_account.setdefault(str(call.account_id), []).extend(requests)
        decisions: list[Decision] = []
        for account_id, requests in by_account.items():
            decisions.extend(self.evaluate(requests, account_id=account_id, partition=partition))
        return decisions

    @staticmethod
    def assert_all_allowed(decisions: Iterable[Decision]) -> None:
        """Fail with every request that is not allowed, each on its own line."""
        refused = [str(d) for d in decisions if not d.allowed]
        if refused:
            raise AssertionError("requests the management policy does not allow:\n  " + "\n  ".join(refused))


__all__ = ["Decision", "PolicyEvaluator", "management_principal"]
