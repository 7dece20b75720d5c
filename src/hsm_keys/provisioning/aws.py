"""AWS plumbing for provisioning: sessions, the management role, one error translation, bounded retries.

Every AWS call of the provisioning layer goes through :class:`AwsCaller`, so throttling, IAM's
eventual consistency and error translation are handled in one place and tests can replace the clock.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from hsm_keys.errors import (
    AccessDeniedError,
    AwsError,
    HsmKeysError,
    ManagementRoleDeniedError,
    OnboardingError,
    ThrottledError,
    WorkCancelledError,
)
from hsm_keys.provisioning.cancellation import checkpoint
from hsm_keys.provisioning.scope import ManagementScope

if TYPE_CHECKING:
    from botocore.client import BaseClient

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "SlowDown",
    }
)
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_ROLE_ARN_RE = re.compile(r"arn:(aws|aws-cn|aws-us-gov):iam::([0-9]{12}):role/[\w+=,.@/-]{1,512}")
#: ``AssumedRoleUser.AssumedRoleId`` is ``<the role's unique id>:<session name>``.
_ASSUMED_ROLE_ID_RE = re.compile(r"(?P<role_id>[A-Z0-9]{8,128}):[\w+=,.@-]{2,64}")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def translate(exc: BaseException, operation: str) -> HsmKeysError:
    """The one place AWS failures become ``hsm_keys`` errors. Never echoes credentials."""
    if isinstance(exc, HsmKeysError):
        return exc
    code = error_code(exc)
    if isinstance(exc, botocore.exceptions.ClientError):
        message = str(exc.response.get("Error", {}).get("Message", "")) or code
        text = f"{operation} failed: {code}: {message}"
        if code in ACCESS_DENIED_CODES:
            return AccessDeniedError(text, operation=operation, code=code)
        if code in THROTTLING_CODES:
            return ThrottledError(text, operation=operation, code=code)
        return AwsError(text, operation=operation, code=code)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AwsError(f"{operation} failed: no AWS credentials configured", operation=operation)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return AwsError(f"{operation} failed: {type(exc).__name__}: {exc}", operation=operation)
    return AwsError(f"{operation} failed: {type(exc).__name__}", operation=operation)


@dataclass
class AwsCaller:
    """Calls AWS with bounded retries: throttling always, named codes only while ``fresh``.

    ``fresh`` codes are the errors a just-created role or provider produces until IAM has
    propagated it (e.g. ``NoSuchEntity`` right after ``CreateRole``); they are retried only when the
    caller says it created the entity moments ago.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 3.0
    sleep: Callable[[float], None] = time.sleep

    def call(
        self,
        client: BaseClient,
        operation: str,
        *,
        fresh: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any]:
        method = getattr(client, botocore.xform_name(operation))
        attempt = 0
        while True:
            checkpoint(f"{operation}")  # late work (its answer already given) sends nothing
            try:
                return dict(method(**params))
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                retry = code in THROTTLING_CODES or code in fresh
                if retry and attempt + 1 < self.attempts:
                    self.sleep(min(self.max_delay, self.base_delay * 2**attempt))
                    attempt += 1
                    continue
                raise


def account_of_role_arn(role_arn: str) -> str:
    match = _ROLE_ARN_RE.fullmatch(role_arn or "")
    if not match:
        raise OnboardingError(f"{role_arn!r} is not an IAM role ARN")
    return match.group(2)


def partition_of_role_arn(role_arn: str) -> str:
    """``aws``, ``aws-cn`` or ``aws-us-gov``: where the role, and so everything in its account, lives."""
    match = _ROLE_ARN_RE.fullmatch(role_arn or "")
    if not match:
        raise OnboardingError(f"{role_arn!r} is not an IAM role ARN")
    return match.group(1)


@dataclass
class AwsEnvironment:
    """Where AWS is: region, optional endpoint (a local moto server), and the operations session.

    ``session`` holds the operations account's credentials (the only ones allowed to assume the
    customers' management roles). ``endpoint_url`` sends every client to one endpoint, as moto in
    server mode needs.
    """

    session: boto3.Session = field(default_factory=boto3.Session)
    region: str = "us-east-1"
    endpoint_url: str | None = None
    role_session_name: str = "hsm-keys-provisioning"
    retries: AwsCaller = field(default_factory=AwsCaller)
    #: Called with every management IAM client and its account (tests attach call recorders here).
    client_hooks: list[Callable[[Any, str], None]] = field(default_factory=list)
    client_config: botocore.config.Config = field(
        default_factory=lambda: botocore.config.Config(
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=30
        )
    )

    #: boto3 sessions are not thread-safe: clients are made one at a time (calls on them are safe).
    _client_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def client(self, service: str, session: boto3.Session | None = None, **options: Any) -> Any:
        make_client: Any = (session or self.session).client  # service chosen at run time
        with self._client_lock:
            return make_client(
                service,
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=options.pop("config", self.client_config),
                **options,
            )

    def _assume_management_role(self, account: str, role_arn: str, duration: int) -> dict[str, Any]:
        if account_of_role_arn(role_arn) != account:
            raise OnboardingError(f"management role {role_arn} is not in account {account}")
        sts = self.client("sts")
        try:
            return self.retries.call(
                sts,
                "AssumeRole",
                RoleArn=role_arn,
                RoleSessionName=self.role_session_name,
                DurationSeconds=duration,
            )
        except WorkCancelledError:
            raise
        except Exception as exc:
            error = translate(exc, "AssumeRole")
            kind = ManagementRoleDeniedError if isinstance(error, AccessDeniedError) else OnboardingError
            raise kind(
                f"cannot assume the management role of account {account}: {error}",
                operation="AssumeRole",
                code=getattr(error, "code", ""),
            ) from exc

    def management_session(self, account: str, role_arn: str, *, duration: int = 900) -> boto3.Session:
        """Credentials of the customer's management role, assumed from the operations account."""
        credentials = self._assume_management_role(account, role_arn, duration)["Credentials"]
        return boto3.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
            region_name=self.region,
        )

    def management_role_id(self, account: str, role_arn: str) -> str:
        """The management role's unique id (``AROA...``), learnt by assuming it from the operations account.

        STS answers ``AssumedRoleUser.AssumedRoleId`` = ``<role id>:<session name>``. IAM gives a
        recreated role a new id, so the id tells one incarnation of a role from the next. Raises
        :class:`OnboardingError` (``code`` = the AWS error code, e.g. ``AccessDenied`` when the role is
        gone or no longer trusts the operations account: then it is a :class:`ManagementRoleDeniedError`,
        an :class:`~hsm_keys.errors.AccessDeniedError` too). The credentials are not kept.
        """
        response = self._assume_management_role(account, role_arn, 900)
        user = response.get("AssumedRoleUser")
        assumed = user.get("AssumedRoleId") if isinstance(user, dict) else None
        match = _ASSUMED_ROLE_ID_RE.fullmatch(assumed) if isinstance(assumed, str) else None
        if match is None:
            raise OnboardingError(
                f"AssumeRole into the management role of account {account} returned no usable role id",
                operation="AssumeRole",
                code="NoRoleId",
            )
        return match["role_id"]

    def management_iam(self, account: str, role_arn: str) -> Any:
        """An IAM client acting through the management role, guarded by the local scope check."""
        iam = self.client("iam", self.management_session(account, role_arn))
        ManagementScope.for_account(account, partition_of_role_arn(role_arn)).install(iam)
        for hook in self.client_hooks:
            hook(iam, account)
        return iam
