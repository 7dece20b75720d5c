"""Record every AWS call a boto3 client (or session) makes, for the policy tests and audits.

moto does not enforce IAM policies, so a test passing against moto says nothing about whether a
customer's management policy permits the calls. The recorder captures each call exactly as sent
(service, operation, validated parameters) and maps it to the IAM authorisations it needs, which
the tests then evaluate against the template's policy with a real IAM policy evaluator.

Attach it to the clients that act through the management role::

    recorder = CallRecorder()
    recorder.attach(iam_client, account_id="111122223333")
    ...                                    # run the code under test
    requests = recorder.authorization_requests()

Attaching to a ``boto3.Session`` covers every client created from it afterwards (botocore copies
a session's event handlers into each new client). Parameters that carry secrets (a web-identity
token, a password, ...) are replaced by ``<redacted>`` in what is kept.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hsm_keys.errors import AccessDeniedError
from hsm_keys.provisioning.scope import AuthorizationRequest, authorizations

if TYPE_CHECKING:
    import boto3
    from botocore.client import BaseClient

REDACTED = "<redacted>"
SECRET_PARAMETERS = frozenset(
    {
        "WebIdentityToken",
        "SAMLAssertion",
        "Password",
        "OldPassword",
        "NewPassword",
        "SecretAccessKey",
        "SessionToken",
        "PrivateKey",
        "CertificateChain",
        "SecretString",
        "SecretBinary",
        "TokenCode",
    }
)

#: Calls that need no IAM permission at all (AWS answers them for any valid credentials).
PERMISSION_FREE = frozenset({("sts", "GetCallerIdentity")})


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if k in SECRET_PARAMETERS else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class RecordedCall:
    """One AWS call as it was sent. ``account_id`` is the account the client acts in."""

    service: str
    operation: str
    params: Mapping[str, Any] = field(hash=False)
    account_id: str | None
    partition: str = "aws"

    def authorizations(self) -> tuple[AuthorizationRequest, ...]:
        """The IAM authorisations this call needs (empty for calls that need none).

        Raises :class:`AccessDeniedError` for a call the scope mapping does not know (any non-IAM
        service but the permission-free ones, or an unmapped IAM operation): a test then fails
        loudly instead of skipping a call nobody evaluated.
        """
        if (self.service, self.operation) in PERMISSION_FREE:
            return ()
        if self.service != "iam":
            raise AccessDeniedError(
                f"{self.service}:{self.operation} is not covered by the management policy",
                operation=self.operation,
                code="UnknownOperation",
            )
        if self.account_id is None:
            raise AccessDeniedError(
                f"iam:{self.operation} was recorded without the account the client acts in",
                operation=self.operation,
                code="UnknownAccount",
            )
        return authorizations(
            self.operation, self.params, account_id=self.account_id, partition=self.partition
        )

    def __str__(self) -> str:
        return f"{self.service}:{self.operation} in {self.account_id or '?'}"


class CallRecorder:
    """Thread-safe list of the AWS calls made by the clients it is attached to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[RecordedCall] = []
        self._context_key = f"hsm_keys.recorder.{id(self)}"

    def attach(
        self, target: BaseClient | boto3.Session, *, account_id: str | None = None, partition: str = "aws"
    ) -> None:
        """Record every call ``target`` makes from now on, as acting in ``account_id``.

        A client starts recording at once; a session records the calls of the clients created from
        it after this call. Attaching the same target twice records each call once.
        """
        events = target.meta.events if hasattr(target, "meta") else target.events

        def stash(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
            context[self._context_key] = params

        def record(model: Any, context: dict[str, Any], **_: Any) -> None:
            params = context.pop(self._context_key, {})
            call = RecordedCall(
                service=str(model.service_model.service_name),
                operation=str(model.name),
                params=_redact(params),
                account_id=account_id,
                partition=partition,
            )
            with self._lock:
                self._calls.append(call)

        # Parameters are taken when botocore has them as the caller's keywords; the call is recorded
        # at ``before-call``, after validation and after every other parameter hook (the scope check
        # among them) has let it through, so only what is really sent is recorded.
        # ``before-call`` handlers may answer the call themselves (a test Stubber does), which stops
        # the event: the recorder goes first so such calls are recorded too.
        events.register("before-parameter-build", stash, unique_id=f"{self._context_key}.stash")
        events.register_first("before-call.*.*", record, unique_id=f"{self._context_key}.record")

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    def authorization_requests(self) -> list[AuthorizationRequest]:
        """Every IAM authorisation the recorded calls needed, in call order."""
        return [request for call in self.calls for request in call.authorizations()]


__all__ = ["PERMISSION_FREE", "REDACTED", "SECRET_PARAMETERS", "CallRecorder", "RecordedCall"]
