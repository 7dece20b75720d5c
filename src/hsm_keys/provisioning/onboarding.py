"""The ``Custom::Hook`` handler: CloudFormation's custom-resource protocol for onboarding accounts.

The customer's stack (``hsm_keys/templates/support-access.yaml``) ends with a ``Custom::Hook``
whose ``ServiceToken`` is the provider's Lambda function or SNS topic. CloudFormation then sends a
Create, Update or Delete request and waits -- up to an hour -- for exactly one answer, PUT to the
pre-signed ``ResponseURL``. A handler that raises, answers twice, or never answers leaves the
customer's stack stuck, so every path here ends in exactly one response and nothing is raised.

Rules, and why:

* The ``PhysicalResourceId`` is a pure function of the stack id (which names the account): a
  changed id on Update makes CloudFormation delete the "old" resource, and a retried Create must
  produce the same id. Update echoes the id it was given and never deletes anything.
* Create registers (account, management role ARN, stack) in the :class:`AccountRegistry`; Delete
  revokes the account's grants *while the management role still exists* (CloudFormation deletes the
  hook first, because it depends on the policy), then deregisters. If the role cannot be used any
  more, the account's keys are destroyed and its issuers unpublished instead, which makes whatever is
  left in IAM useless; Delete answers SUCCESS either way. Only when neither worked does it answer
  FAILED, keeping the role in place for a retry.
* A Delete for something this stack never registered (after a failed Create, a duplicate, another
  stack's account) answers SUCCESS and touches nothing. A Create or Update that arrives after its
  stack's Delete is refused by the registry's retired-stack record.
* Anyone who can publish to the ServiceToken can send any event, so a StackId proves nothing: a
  forger can name a made-up stack in a victim's account together with the victim's real management
  role, and (were it allowed to take the account over) then Delete that made-up stack, revoking the
  victim's grants and deregistering the account. What a forger cannot fake is the management role
  itself. Its name is fixed by the template (``DoiT_Management_Role_DO-NOT-DELETE``), so at most one
  live stack per account holds it, and IAM gives a recreated role a new unique id (``AROA...``). So
  Create and Update learn the role's unique id by assuming it from the operations account (the
  ``role_id_lookup`` hook, e.g. :meth:`hsm_keys.provisioning.aws.AwsEnvironment.management_role_id`;
  STS answers ``AssumedRoleId`` = ``<role id>:<session>``) and record it with the registration. A
  request for an account that *another* stack registered takes it over only when the registered
  role is gone: assuming it is refused (AccessDenied), or its id now differs from the recorded one.
  Otherwise -- including any unclear answer (throttling, network), a registration recorded without a
  role id whose role is still assumable, or a handler without a ``role_id_lookup`` -- it answers
  FAILED ("already registered by a live stack") and touches nothing; the registry swaps the
  registration only if it is still the one that was checked. A Delete from a stack that is not the
  registered one touches nothing (above), so a forged stack can neither take over nor revoke.
  Reasons sent back never name the other stack or its role id: the answer goes to the requester.
* Everything in the event is attacker-supplied: the role ARN's account must equal ``AccountId``
  and the stack's account, and the ``ResponseURL`` must be an HTTPS pre-signed URL on an S3
  endpoint under ``amazonaws.com`` or ``amazonaws.com.cn`` -- a handler that PUTs wherever it is
  told is a request forger. Tests point it at a loopback server through an explicit override.
* The response body is at most 4,096 bytes (the reason is cut to fit), the URL is used byte for
  byte, and ``Content-Type`` is empty (the pre-signed signature covers it).
* The work runs against the Lambda deadline (``get_remaining_time_in_millis``), keeping a reserve
  for the answer: a request that does not finish in time is answered FAILED before Lambda kills us,
  and the work still running is cancelled (:mod:`hsm_keys.provisioning.cancellation`): it checks the
  token before every AWS call, key or issuer write and registry commit, so it changes nothing after
  that answer. A registry commit already in progress is waited for, and then its outcome is answered.
* The pre-signed URL is a credential for writing the answer: it is logged without its query.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import ipaddress
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hsm_keys.errors import AwsError, HsmKeysError, InvalidInputError, OnboardingError, WorkCancelledError
from hsm_keys.provisioning.cancellation import Cancellation, cancellable, committing
from hsm_keys.provisioning.registry import (
    AccountRegistration,
    AccountRegistry,
    parse_role_arn,
    parse_stack_id,
)
from hsm_keys.templates import HOOK_VERSION

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4096
SUPPORTED_VERSIONS = frozenset({HOOK_VERSION})
PHYSICAL_ID_PREFIX = "hsm-keys-onboarding"
REQUEST_TYPES = ("Create", "Update", "Delete")

_MAX_URL_LENGTH = 8192
_MAX_REASON_CHARS = 1024
_S3_HOST_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?\.)?"  # virtual-hosted bucket, if any
    r"s3(?:-external-1|-(?:[a-z]{2}(?:-gov)?-[a-z]+-[0-9]+))?"  # s3, s3-external-1, s3-<region>
    r"(?:\.dualstack)?(?:\.[a-z]{2}(?:-gov)?-[a-z]+-[0-9]+)?"  # .dualstack, .<region>
    r"\.amazonaws\.com(?:\.cn)?"
)
_LOOPBACK_NAMES = frozenset({"localhost"})


class Status(enum.Enum):
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


class LambdaContext(Protocol):
    """The part of AWS Lambda's context object the handler uses."""

    def get_remaining_time_in_millis(self) -> int: ...


class RevocationReport(Protocol):
    """What revoking an account's grants achieved."""

    @property
    def complete(self) -> bool:
        """True when nothing the library owned in the account is left usable."""
        ...

    def summary(self) -> str:
        """One line for logs and the CloudFormation reason; no secrets."""
        ...


class AccountRevoker(Protocol):
    """Revokes every grant in an account; implemented by the access layer. Both calls idempotent."""

    def revoke_account(self, account_id: str) -> RevocationReport:
        """Through the management role: delete roles, policies, providers; destroy keys; unpublish."""
        ...

    def purge_account_offline(self, account_id: str) -> RevocationReport:
        """Without AWS (the role is gone): destroy the account's keys and unpublish its issuers."""
        ...


#: ``(url, body, timeout_seconds)``; raises on failure. The default is :func:`put_response`.
ResponseSender = Callable[[str, bytes, float], None]
#: Raises :class:`InvalidInputError` for a ``ResponseURL`` that must not be used.
ResponseUrlCheck = Callable[[str], None]
#: Optional proof that the management role is usable (e.g. assume it); raises to refuse a Create.
RoleCheck = Callable[[AccountRegistration], None]
#: ``(account_id, role_arn) -> the role's unique id (AROA...)``, learnt by assuming the role from the
#: operations account (:meth:`hsm_keys.provisioning.aws.AwsEnvironment.management_role_id`). Raises
#: when the role cannot be assumed; an :class:`AwsError` with an AccessDenied code means it is gone.
RoleIdLookup = Callable[[str, str], str]

#: What STS answers when a role cannot be assumed because it no longer exists (or trusts us no more).
_ROLE_GONE_CODES = frozenset({"AccessDenied", "AccessDeniedException"})


# -- ResponseURL -----------------------------------------------------------------------------------


def redact_url(url: object) -> str:
    """The URL without query or fragment (the pre-signed signature lives in the query)."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    parts = urllib.parse.urlsplit(url[:_MAX_URL_LENGTH])
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path[:200], "", ""))


def _split(url: object) -> urllib.parse.SplitResult:
    if not isinstance(url, str) or not url:
        raise InvalidInputError("ResponseURL is missing")
    if len(url) > _MAX_URL_LENGTH:
        raise InvalidInputError(f"ResponseURL is longer than {_MAX_URL_LENGTH} characters")
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in url):
        raise InvalidInputError("ResponseURL holds characters a pre-signed URL cannot hold")
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInputError("ResponseURL must not carry user information")
    if parts.fragment:
        raise InvalidInputError("ResponseURL must not have a fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidInputError("ResponseURL has a malformed port") from None
    return parts


def check_response_url(url: str) -> None:
    """Accept only an HTTPS pre-signed URL on an S3 endpoint under amazonaws.com(.cn)."""
    parts = _split(url)
    if parts.scheme != "https":
        raise InvalidInputError(f"ResponseURL must use https, not {parts.scheme or 'no scheme'}")
    if parts.port not in (None, 443):
        raise InvalidInputError("ResponseURL must use the default https port")
    host = parts.hostname or ""
    if not _S3_HOST_RE.fullmatch(host):
        raise InvalidInputError(f"ResponseURL host {host!r} is not an S3 endpoint under amazonaws.com(.cn)")
    if not parts.path or parts.path == "/":
        raise InvalidInputError("ResponseURL names no object")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    sigv4 = {"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Algorithm"} <= query.keys()
    sigv2 = {"Signature", "AWSAccessKeyId", "Expires"} <= query.keys()
    if not (sigv4 or sigv2):
        raise InvalidInputError("ResponseURL is not a pre-signed URL (no signature in its query)")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allow_loopback_response_urls(url: str) -> None:
    """TEST ONLY: also accept http(s) URLs on a loopback address (a local response sink).

    Pass it as ``response_url_check`` in tests and the local demo; never in a deployed handler.
    """
    parts = _split(url)
    if parts.scheme in ("http", "https") and _is_loopback(parts.hostname or ""):
        return
    check_response_url(url)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A response goes to the URL CloudFormation signed, or nowhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def put_response(url: str, body: bytes, timeout: float) -> None:
    """PUT ``body`` to ``url`` exactly as given, with an empty ``Content-Type``.

    Errors are raised as :class:`OnboardingError` without the URL (its query is a credential).
    """
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked by the URL check
        url, data=body, method="PUT", headers={"Content-Type": "", "Content-Length": str(len(body))}
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        raise OnboardingError(
            f"could not send the response ({type(exc).__name__})", operation="PUT", code="SendFailed"
        ) from None
    if not 200 <= status < 300:
        raise OnboardingError(
            f"the response URL answered HTTP {status}", operation="PUT", code=f"HTTP{status}"
        )


# -- Requests and responses ------------------------------------------------------------------------


def physical_resource_id(stack_id: str, account_id: str) -> str:
    """``hsm-keys-onboarding-<account>-<first 16 hex of sha256(stack id)>``: stable per stack."""
    digest = hashlib.sha256(stack_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{PHYSICAL_ID_PREFIX}-{account_id}-{digest}"


@dataclasses.dataclass(frozen=True)
class CustomResourceResponse:
    """The answer CloudFormation waits for."""

    status: Status
    physical_resource_id: str
    stack_id: str
    request_id: str
    logical_resource_id: str
    reason: str = ""
    data: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def _document(self, reason: str, *, echoed: int | None = None, data: bool = True) -> dict[str, Any]:
        """The answer; ``echoed`` cuts each field echoed from the request to that many characters."""

        def cut(value: str) -> str:
            return value if echoed is None else value[:echoed]

        document: dict[str, Any] = {
            "Status": self.status.value,
            "Reason": reason,
            "PhysicalResourceId": cut(self.physical_resource_id),
            "StackId": cut(self.stack_id),
            "RequestId": cut(self.request_id),
            "LogicalResourceId": cut(self.logical_resource_id),
            "NoEcho": False,
        }
        if self.data and data:
            document["Data"] = dict(self.data)
        return document

    def body(self, limit: int = MAX_RESPONSE_BYTES) -> bytes:
        """JSON body of at most ``limit`` bytes, always valid JSON; the reason is cut (``...``) to fit.

        Sizes are measured on the encoded JSON (a character may take up to 12 bytes escaped) and
        text is only ever cut in characters before encoding, never in encoded bytes. When even an
        empty reason does not fit, the request's echoed fields were oversized (a bogus request): the
        answer then drops ``Data`` and cuts those fields too, as little as fits.
        """

        def encode(document: Mapping[str, Any]) -> bytes:
            return json.dumps(document).encode("ascii")

        def longest_fitting(size: int, make: Callable[[int], Mapping[str, Any]]) -> int | None:
            """The largest n in [0, size] whose ``make(n)`` fits (the size grows with n), else None."""
            if len(encode(make(0))) > limit:
                return None
            low, high = 0, size
            while low < high:
                middle = (low + high + 1) // 2
                if len(encode(make(middle))) <= limit:
                    low = middle
                else:
                    high = middle - 1
            return low

        reason = self.reason or ("" if self.status is Status.SUCCESS else "failed")
        if len(reason) > _MAX_REASON_CHARS:
            reason = reason[:_MAX_REASON_CHARS] + "..."
        encoded = encode(self._document(reason))
        if len(encoded) <= limit:
            return encoded
        kept = longest_fitting(len(reason), lambda n: self._document(reason[:n] + "..."))
        if kept is not None:
            return encode(self._document(reason[:kept] + "..."))
        # Only oversized echoed fields (not ours to shorten, but the request was bogus) are left.
        note = "request fields too long"
        longest = max(
            len(self.physical_resource_id),
            len(self.stack_id),
            len(self.request_id),
            len(self.logical_resource_id),
        )
        echoed = longest_fitting(longest, lambda n: self._document(note, echoed=n, data=False))
        if echoed is None:
            raise ValueError(f"a custom-resource response cannot fit in {limit} bytes")
        return encode(self._document(note, echoed=echoed, data=False))


@dataclasses.dataclass(frozen=True)
class HandlerOutcome:
    """What one request led to; returned by the handler for tests and logs."""

    request_id: str
    request_type: str
    status: Status | None
    reason: str
    physical_resource_id: str
    sent: bool


@dataclasses.dataclass(frozen=True)
class _Request:
    request_type: str
    stack_id: str
    request_id: str
    logical_resource_id: str
    physical_resource_id: str | None
    properties: object  # a mapping in a well-formed request; checked by _validate
    stack: dict[str, str] | None


class _Deadline:
    def __init__(self, seconds: float | None, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._end = None if seconds is None else monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - self._monotonic())


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """The answer the work decided on."""

    status: Status
    reason: str
    data: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value, default=str))


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _error_reason(exc: BaseException) -> str:
    """Our own errors speak for themselves; anything else is named, not quoted (it may leak internals)."""
    if isinstance(exc, HsmKeysError):
        return str(exc)
    return f"internal error ({type(exc).__name__}); the provider's logs have the details"


class OnboardingHandler:
    """The Lambda entry point for the template's ``Custom::Hook`` (direct or SNS-wrapped events).

    ``handler = OnboardingHandler(registry, revoker, role_id_lookup=aws.management_role_id)`` then
    ``handler(event, context)``. It never raises; it returns ``{"outcomes": [...]}`` describing what
    it answered. Without ``role_id_lookup`` no stack can ever take over an account another stack
    registered (see the module docstring).
    """

    def __init__(
        self,
        registry: AccountRegistry,
        revoker: AccountRevoker,
        *,
        sender: ResponseSender = put_response,
        response_url_check: ResponseUrlCheck = check_response_url,
        role_check: RoleCheck | None = None,
        role_id_lookup: RoleIdLookup | None = None,
        supported_versions: frozenset[str] = SUPPORTED_VERSIONS,
        response_reserve: float = 3.0,
        send_attempts: int = 3,
        retry_delay: float = 0.5,
        clock: Callable[[], dt.datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._registry = registry
        self._revoker = revoker
        self._sender = sender
        self._check_url = response_url_check
        self._role_check = role_check
        self._role_ids = role_id_lookup
        self._versions = supported_versions
        self._reserve = response_reserve
        self._attempts = max(1, send_attempts)
        self._retry_delay = retry_delay
        self._clock = clock or _now
        self._monotonic = monotonic
        self._sleep = sleep

    # -- entry point ------------------------------------------------------------------------------

    def __call__(self, event: Any, context: LambdaContext | None = None) -> dict[str, Any]:
        outcomes: list[HandlerOutcome] = []
        try:
            deadline = _Deadline(self._remaining_seconds(context), self._monotonic)
            for request in self._unwrap(event):
                try:
                    outcomes.append(self._handle_one(request, deadline))
                except Exception as exc:  # one bad record must not cost the others their answer
                    logger.error("onboarding request could not be handled: %s", type(exc).__name__)
        except Exception as exc:  # the last guard: CloudFormation must not see us crash
            logger.error("onboarding handler failed outside a request: %s", type(exc).__name__)
        return {
            "outcomes": [dataclasses.asdict(o) | {"status": o.status and o.status.value} for o in outcomes]
        }

    @staticmethod
    def _remaining_seconds(context: LambdaContext | None) -> float | None:
        if context is None:
            return None
        try:
            return max(0.0, float(context.get_remaining_time_in_millis()) / 1000.0)
        except Exception:
            logger.warning("Lambda context gave no remaining time; running without a deadline")
            return None

    @staticmethod
    def _unwrap(event: Any) -> list[Any]:
        """CloudFormation requests, from a direct invocation or from SNS records."""
        records = event.get("Records") if isinstance(event, Mapping) else None
        if not isinstance(records, list):
            return [event]
        requests = []
        for record in records:
            sns = record.get("Sns") if isinstance(record, Mapping) else None
            message = sns.get("Message") if isinstance(sns, Mapping) else None
            try:
                requests.append(json.loads(message) if isinstance(message, str) else None)
            except ValueError:
                requests.append(None)
        return requests

    # -- one request ------------------------------------------------------------------------------

    def _handle_one(self, raw: Any, deadline: _Deadline) -> HandlerOutcome:
        event: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        request_id = _text(event.get("RequestId"))
        request_type = _text(event.get("RequestType"))
        url = event.get("ResponseURL")
        try:
            if not isinstance(url, str):
                raise InvalidInputError("ResponseURL is missing")
            self._check_url(url)
        except Exception as exc:
            logger.error(
                "not answering request %r: ResponseURL %s refused (%s)",
                request_id[:64],
                redact_url(url),
                _error_reason(exc),
            )
            return HandlerOutcome(request_id, request_type, None, _error_reason(exc), "", sent=False)

        request = self._parse(event)
        physical_id = self._physical_id(request)
        try:
            status, reason, data = self._decide(request, physical_id, deadline)
        except HsmKeysError as exc:
            logger.warning("onboarding request %r refused: %s", request_id[:64], exc)
            status, reason, data = Status.FAILED, _error_reason(exc), {}
        except Exception as exc:
            logger.exception("onboarding request %r failed", request_id[:64])
            status, reason, data = Status.FAILED, _error_reason(exc), {}
        response = CustomResourceResponse(
            status=status,
            physical_resource_id=physical_id,
            stack_id=request.stack_id,
            request_id=request.request_id,
            logical_resource_id=request.logical_resource_id,
            reason=reason,
            data=data,
        )
        sent = self._send(url, response.body(), deadline)
        logger.info(
            "answered %r %r for stack %r: %s (%r)%s",
            request_type[:16],
            request_id[:64],
            request.stack_id[:256],
            status.value,
            reason[:200],
            "" if sent else " -- but the answer could not be delivered",
        )
        return HandlerOutcome(request_id, request_type, status, reason, physical_id, sent)

    @staticmethod
    def _parse(event: Mapping[str, Any]) -> _Request:
        properties = event.get("ResourceProperties")
        physical = event.get("PhysicalResourceId")
        stack_id = _text(event.get("StackId"))
        return _Request(
            request_type=_text(event.get("RequestType")),
            stack_id=stack_id,
            request_id=_text(event.get("RequestId")),
            logical_resource_id=_text(event.get("LogicalResourceId")),
            physical_resource_id=physical if isinstance(physical, str) and physical else None,
            properties=properties,
            stack=parse_stack_id(stack_id),
        )

    @staticmethod
    def _physical_id(request: _Request) -> str:
        """Update and Delete keep the id they were given; Create derives it from the stack."""
        if request.request_type in ("Update", "Delete") and request.physical_resource_id:
            return request.physical_resource_id
        if request.stack is not None:
            return physical_resource_id(request.stack_id, request.stack["account"])
        digest = hashlib.sha256(request.stack_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"{PHYSICAL_ID_PREFIX}-invalid-{digest}"

    def _decide(
        self, request: _Request, physical_id: str, deadline: _Deadline
    ) -> tuple[Status, str, Mapping[str, str]]:
        if request.request_type not in REQUEST_TYPES:
            return Status.FAILED, f"unknown RequestType {request.request_type[:40]!r}", {}
        if request.request_type == "Delete":
            work: Callable[[], _Outcome] = lambda: self._delete(request)  # noqa: E731
        else:
            registration = self._validate(request)
            if request.request_type == "Update" and physical_id != physical_resource_id(
                request.stack_id, registration.account_id
            ):
                return (
                    Status.FAILED,
                    f"PhysicalResourceId {physical_id[:128]!r} is not this stack's onboarding; "
                    "an Update cannot move it",
                    {},
                )
            work = lambda: self._register(registration)  # noqa: E731
        outcome = self._run(work, deadline)
        return outcome.status, outcome.reason, outcome.data

    def _validate(self, request: _Request) -> AccountRegistration:
        """Create and Update properties: every account named must be the stack's account."""
        if request.stack is None:
            raise InvalidInputError(f"StackId {request.stack_id[:256]!r} is not a CloudFormation stack ARN")
        if not request.request_id or not request.logical_resource_id:
            raise InvalidInputError("RequestId and LogicalResourceId are required")
        props = request.properties
        if not isinstance(props, Mapping):
            got = "nothing" if props is None else "a JSON " + _json_type(props)
            raise InvalidInputError(f"ResourceProperties must be a JSON object, got {got}")
        # The template sets Version as a resource attribute (next to Type), which CloudFormation does
        # not send in ResourceProperties; a Version that is sent there must still be one we support.
        if "Version" in props:
            version = props["Version"]
            if not isinstance(version, str):
                raise InvalidInputError(
                    f"hook Version is invalid: expected a string (supported: {sorted(self._versions)}), "
                    f"got {'null' if version is None else 'a JSON ' + _json_type(version)}"
                )
            if version not in self._versions:
                raise InvalidInputError(
                    f"hook Version {version[:20]!r} is not supported (supported: {sorted(self._versions)})"
                )
        if not isinstance(props.get("ServiceToken"), str) or not props["ServiceToken"]:
            raise InvalidInputError("ServiceToken is missing")
        account_id, role_arn = props.get("AccountId"), props.get("RoleArn")
        if not isinstance(account_id, str) or not re.fullmatch(r"[0-9]{12}", account_id):
            raise InvalidInputError(
                f"AccountId must be a 12-digit account id, got {_text(account_id)[:40]!r}"
            )
        role = parse_role_arn(role_arn) if isinstance(role_arn, str) else None
        if role is None:
            raise InvalidInputError(f"RoleArn {_text(role_arn)[:256]!r} is not an IAM role ARN")
        stack_account = request.stack["account"]
        if not role["account"] == account_id == stack_account:
            raise InvalidInputError(
                f"accounts disagree: RoleArn is in {role['account']}, AccountId is {account_id}, "
                f"the stack is in {stack_account}"
            )
        if role["partition"] != request.stack["partition"]:
            raise InvalidInputError(
                f"RoleArn is in partition {role['partition']}, the stack in {request.stack['partition']}"
            )
        return AccountRegistration(
            account_id=account_id,
            role_arn=str(role_arn),
            stack_id=request.stack_id,
            registered_at=self._clock(),
        )

    # -- the work (runs against the deadline) -----------------------------------------------------

    def _run(self, work: Callable[[], _Outcome], deadline: _Deadline) -> _Outcome:
        remaining = deadline.remaining()
        # Keep a reserve for the answer: the configured one, or a third of what is left if less.
        budget = None if remaining is None else remaining - min(self._reserve, remaining / 3)
        if budget is not None and budget <= 0:
            return _Outcome(Status.FAILED, "too little time left to do the work; nothing was changed")
        result: list[_Outcome] = []
        failure: list[BaseException] = []
        token = Cancellation()

        def target() -> None:
            try:
                with cancellable(token):
                    result.append(work())
            except BaseException as exc:
                failure.append(exc)

        worker = threading.Thread(target=target, name="hsm-keys-onboarding", daemon=True)
        worker.start()
        worker.join(budget)
        if worker.is_alive():
            # The answer will be FAILED: from here on the work may write nothing (it checks the
            # token before every AWS call, key, issuer and registry write). A commit in progress
            # is waited for briefly; if one was made, the work's own outcome is the true answer.
            left = deadline.remaining() or 0.0
            exact = token.cancel("the deadline came first and FAILED was answered", timeout=left / 3)
            if token.commits or not exact:
                worker.join(max(0.0, min(left / 3, (deadline.remaining() or 0.0) - 1.0)))
            if worker.is_alive() or not result:
                logger.warning(
                    "onboarding work did not finish before the deadline; it was cancelled%s",
                    "" if exact else " while a registry write was in progress (it may have landed)",
                )
                return _Outcome(
                    Status.FAILED,
                    "did not finish before the deadline; nothing more will be changed and the request "
                    "can be retried (for a stack deletion: delete the stack again)",
                )
        if failure:
            exc = failure[0]
            if not isinstance(exc, HsmKeysError):
                logger.error("onboarding work failed", exc_info=(type(exc), exc, exc.__traceback__))
            return _Outcome(Status.FAILED, _error_reason(exc))
        return result[0]

    def _register(self, registration: AccountRegistration) -> _Outcome:
        if self._role_check is not None:
            self._role_check(registration)
        if self._role_ids is not None:
            registration = dataclasses.replace(registration, role_id=self._role_id_of_new(registration))
        account_id = registration.account_id
        current = self._registry.get(account_id)
        replacing = None
        if current is not None and current.stack_id != registration.stack_id:
            refusal = self._refuse_take_over(current, registration)
            if refusal is not None:
                logger.warning(
                    "account %s: stack %r may not take over from stack %r: %s",
                    account_id,
                    registration.stack_id[:256],
                    current.stack_id,
                    refusal,
                )
                return _Outcome(Status.FAILED, refusal)
            logger.warning(
                "account %s: stack %r takes over from stack %r, whose management role is gone",
                account_id,
                registration.stack_id[:256],
                current.stack_id,
            )
            replacing = current
        try:
            with committing(f"registering account {account_id}"):
                if replacing is None:  # the plain call: never a take-over (registries that predate it)
                    changed = self._registry.register(registration)
                else:
                    changed = self._registry.register(registration, replacing=replacing)
        except OnboardingError as exc:
            if exc.code != "RegisteredByAnotherStack":
                raise
            logger.warning("account %s: %s", account_id, exc)
            return _Outcome(  # registered meanwhile; the other stack's id is not the requester's to see
                Status.FAILED,
                f"account {account_id} is already registered by another stack; nothing was changed",
            )
        verb = "registered" if changed else "already registered"
        return _Outcome(
            Status.SUCCESS,
            f"account {registration.account_id} {verb} with role {registration.role_arn}",
            {"AccountId": registration.account_id, "RoleArn": registration.role_arn},
        )

    def _role_id_of_new(self, registration: AccountRegistration) -> str:
        """The unique id of the role the request names; it must be assumable to register at all."""
        assert self._role_ids is not None
        try:
            return self._role_ids(registration.account_id, registration.role_arn)
        except Exception as exc:
            code = exc.code if isinstance(exc, AwsError) and exc.code else type(exc).__name__
            logger.warning(
                "account %s: the management role could not be assumed: %s",
                registration.account_id,
                _error_reason(exc),
            )
            raise OnboardingError(
                f"cannot assume the management role {registration.role_arn} from the operations "
                f"account ({code}); nothing was registered",
                operation="AssumeRole",
                code=code,
            ) from exc

    def _refuse_take_over(self, current: AccountRegistration, new: AccountRegistration) -> str | None:
        """None when the stack that registered ``current`` is gone (its role is); else the reason."""
        account_id = current.account_id
        if self._role_ids is None:
            return (
                f"account {account_id} is already registered by another stack; without a role-id lookup "
                "this handler cannot tell whether that stack is gone, so nothing was changed"
            )
        if current.role_arn == new.role_arn:
            observed: str | None = new.role_id  # assumed moments ago
        else:
            try:
                observed = self._role_ids(account_id, current.role_arn)
            except Exception as exc:
                if not (isinstance(exc, AwsError) and exc.code in _ROLE_GONE_CODES):
                    logger.warning(
                        "account %s: the registered management role could not be checked: %s",
                        account_id,
                        _error_reason(exc),
                    )
                    return (
                        f"account {account_id} is already registered by another stack whose management "
                        "role could not be checked; nothing was changed (the request can be retried)"
                    )
                observed = None  # the registered role can no longer be assumed: it is gone
        if observed is None:
            return None
        live = f"account {account_id} is already registered by a live stack"
        if current.role_id is None:
            return (
                f"{live} (its management role can still be assumed, and the registration predates "
                "role ids); nothing was changed"
            )
        if observed == current.role_id:
            return f"{live} (it still holds the management role); nothing was changed"
        return None

    def _delete(self, request: _Request) -> _Outcome:
        stack = request.stack
        given = request.physical_resource_id  # what CloudFormation holds, not our fallback for the answer
        if stack is None or given != physical_resource_id(request.stack_id, stack["account"]):
            return _Outcome(Status.SUCCESS, "nothing of this stack was registered; nothing to delete")
        account_id = stack["account"]
        registration = self._registry.get(account_id)
        if registration is None or registration.stack_id != request.stack_id:
            with committing(f"retiring stack {request.stack_id[:256]}"):
                self._registry.deregister(account_id, stack_id=request.stack_id)  # this stack only
            return _Outcome(
                Status.SUCCESS, f"account {account_id} is not registered by this stack; nothing to do"
            )
        summary = self._revoke(account_id)
        with committing(f"deregistering account {account_id}"):
            self._registry.deregister(account_id, stack_id=request.stack_id)
        return _Outcome(Status.SUCCESS, f"account {account_id} deregistered; {summary}")

    def _revoke(self, account_id: str) -> str:
        """Revoke through the role; if that fails or is incomplete, purge offline; raise if both fail."""
        try:
            report = self._revoker.revoke_account(account_id)
            if report.complete:
                return report.summary()
            first = f"revocation incomplete ({report.summary()})"
        except WorkCancelledError:
            raise  # the answer was given: no offline purge either
        except Exception as exc:
            first = f"revocation through the management role failed ({_error_reason(exc)})"
        logger.warning("account %s: %s; purging its keys and issuers offline", account_id, first)
        try:
            purge = self._revoker.purge_account_offline(account_id)
        except Exception as exc:
            raise OnboardingError(
                f"{first}; the offline purge failed too ({_error_reason(exc)}); "
                "the account stays registered: retry the stack deletion",
                code="RevocationFailed",
            ) from exc
        if not purge.complete:
            raise OnboardingError(
                f"{first}; the offline purge was incomplete ({purge.summary()}); "
                "the account stays registered: retry the stack deletion",
                code="RevocationFailed",
            )
        return f"{first}; keys destroyed and issuers unpublished instead ({purge.summary()})"

    # -- the answer -------------------------------------------------------------------------------

    def _send(self, url: str, body: bytes, deadline: _Deadline) -> bool:
        """PUT the answer, retrying transient failures while time is left. One answer, maybe resent.

        The first attempt is always made, however little time is left: an answer that may arrive
        beats one that surely will not.
        """
        for attempt in range(1, self._attempts + 1):
            remaining = deadline.remaining()
            timeout = 10.0 if remaining is None else max(0.5, min(10.0, remaining - 0.1))
            try:
                self._sender(url, body, timeout)
                return True
            except OnboardingError as exc:
                logger.warning("sending the answer failed (attempt %d): %s", attempt, exc)
                if exc.code.startswith("HTTP4"):
                    break  # the URL was refused (expired, forged): resending cannot help
            except Exception as exc:
                logger.warning("sending the answer failed (attempt %d): %s", attempt, type(exc).__name__)
            delay = self._retry_delay * attempt
            remaining = deadline.remaining()
            if attempt == self._attempts or (remaining is not None and remaining - delay < 0.6):
                break
            self._sleep(delay)
        return False


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = [
    "MAX_RESPONSE_BYTES",
    "PHYSICAL_ID_PREFIX",
    "SUPPORTED_VERSIONS",
    "AccountRevoker",
    "CustomResourceResponse",
    "HandlerOutcome",
    "LambdaContext",
    "OnboardingHandler",
    "ResponseSender",
    "ResponseUrlCheck",
    "RevocationReport",
    "RoleCheck",
    "RoleIdLookup",
    "Status",
    "allow_loopback_response_urls",
    "check_response_url",
    "physical_resource_id",
    "put_response",
    "redact_url",
]
