"""Support-access grants: one HSM key, one OIDC provider, one role and one policy per (staff, account).

State lives where it already lives. The key and its binding are in the HSM; the grant's metadata
(staff, ticket, expiry, kid, algorithm) is in the role's description, which the customers' management
policy lets ``CreateRole`` and ``UpdateRoleDescription`` set (it grants no tagging); the provider's URL
names the pair. Every IAM call goes through a client guarded by the local scope check of the
management policy, and through :class:`~hsm_keys.provisioning.aws.AwsCaller` for bounded retries.

The library touches only what it created: providers whose URL lies under its issuer base, and roles
and policies that pass :func:`owns` -- the description carries :data:`MARKER` *and* names the staff
member the entity's name is for (``DoiT-Support-<staff>``). Every path (grant, revoke, list, reconcile,
verify, credentials) asks that one predicate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from botocore import UNSIGNED

from hsm_keys import oidc
from hsm_keys.audit import AuditLog, NullAuditLog, digest
from hsm_keys.encoding.iam import MAX_THUMBPRINTS, normalize_thumbprint, oidc_thumbprint
from hsm_keys.encoding.jwk import jwk_thumbprint, jwk_to_public_key
from hsm_keys.errors import (
    AccessDeniedError,
    AwsError,
    ConfigurationError,
    HsmKeysError,
    InvalidInputError,
    KeyNotFoundError,
    NotOwnedError,
    OnboardingError,
    StsExchangeError,
    UnsupportedAlgorithmError,
    WorkCancelledError,
)
from hsm_keys.keystore.base import KeyStore
from hsm_keys.provisioning.aws import AwsEnvironment, error_code, translate
from hsm_keys.provisioning.cancellation import checkpoint
from hsm_keys.provisioning.issuer import (
    HttpsOptions,
    IssuerPublisher,
    IssuerScheme,
    https_get,
    issuer_documents,
)
from hsm_keys.provisioning.registry import AccountRegistry
from hsm_keys.tls import fetch_chain
from hsm_keys.types import ROLE_PREFIX, STS_ALGORITHMS, Binding, KeyInfo, KeySpec, SignatureAlgorithm

logger = logging.getLogger(__name__)

MARKER = "hsm-keys grant v1"
SECURITY_AUDIT_ARN = "arn:{partition}:iam::aws:policy/SecurityAudit"
DESCRIPTION_MAX = 1000
MIN_TTL = dt.timedelta(minutes=1)
TICKET_RE = re.compile(r"[A-Za-z0-9._:#/+=@-]{1,64}")
_DESCRIPTION_FIELD_RE = re.compile(r"(\w+)=([^;]*)")

#: The grant's extra read-only permissions by default: the account's AWS Support cases.
SUPPORT_CASES_READ_POLICY: Mapping[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "ReadSupportCases",
            "Effect": "Allow",
            "Action": [
                "support:DescribeAttachment",
                "support:DescribeCaseAttributes",
                "support:DescribeCases",
                "support:DescribeCommunications",
                "support:DescribeServices",
                "support:DescribeSeverityLevels",
            ],
            "Resource": "*",
        }
    ],
}
_READ_ONLY_VERBS = ("Describe", "Get", "List", "View", "Search", "Lookup", "BatchGet", "Query", "Scan")

#: Key spec generated for each algorithm a grant may use (STS accepts only these).
DEFAULT_KEY_SPECS: Mapping[SignatureAlgorithm, KeySpec] = {
    SignatureAlgorithm.RS256: KeySpec.RSA_2048,
    SignatureAlgorithm.RS384: KeySpec.RSA_3072,
    SignatureAlgorithm.RS512: KeySpec.RSA_4096,
    SignatureAlgorithm.ES256: KeySpec.EC_P256,
    SignatureAlgorithm.ES384: KeySpec.EC_P384,
    SignatureAlgorithm.ES512: KeySpec.EC_P521,
}

# Errors IAM and STS return for entities created moments ago (eventual consistency).
_FRESH_ROLE_ERRORS = frozenset({"NoSuchEntity"})
_FRESH_PRINCIPAL_ERRORS = frozenset({"MalformedPolicyDocument", "InvalidInput"})
_STS_TRANSIENT = frozenset({"IDPCommunicationError"})
# What STS answers for a role or provider IAM has not finished propagating: transient only while fresh.
_STS_FRESH = frozenset({"AccessDenied", "InvalidIdentityToken"})


def _check_read_only(document: Mapping[str, Any]) -> None:
    statements = document.get("Statement")
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise ConfigurationError("the staff policy needs at least one statement")
    for statement in statements:
        if (
            not isinstance(statement, Mapping)
            or statement.get("Effect") != "Allow"
            or "NotAction" in statement
        ):
            raise ConfigurationError("staff policy statements must be plain Allow statements with Action")
        actions = statement.get("Action")
        for action in [actions] if isinstance(actions, str) else list(actions or []):
            verb = str(action).split(":", 1)[-1]
            if ":" not in str(action) or not verb.startswith(_READ_ONLY_VERBS):
                raise ConfigurationError(
                    f"staff policy action {action!r} is not read-only; "
                    "support engineers never get write access"
                )


def validate_ticket(ticket: str) -> str:
    if not isinstance(ticket, str) or not TICKET_RE.fullmatch(ticket):
        raise InvalidInputError(f"ticket {ticket!r} must be 1-64 characters of letters, digits and ._:#/+=@-")
    return ticket


@dataclass(frozen=True)
class GrantSettings:
    """Everything a deployment chooses once."""

    issuer: IssuerScheme
    https: HttpsOptions = field(default_factory=HttpsOptions)
    staff_policy: Mapping[str, Any] = field(default_factory=lambda: SUPPORT_CASES_READ_POLICY)
    key_specs: Mapping[SignatureAlgorithm, KeySpec] = field(default_factory=lambda: dict(DEFAULT_KEY_SPECS))
    max_ttl: dt.timedelta = dt.timedelta(days=30)
    token_ttl: dt.timedelta = dt.timedelta(minutes=5)
    session_duration: int = 3600
    fresh_window: dt.timedelta = dt.timedelta(minutes=2)
    sts_attempts: int = 4

    def __post_init__(self) -> None:
        _check_read_only(self.staff_policy)
        if len(json.dumps(self.staff_policy)) > 6144:
            raise ConfigurationError("the staff policy exceeds IAM's 6,144-character limit")
        if not 900 <= self.session_duration <= 43200:
            raise ConfigurationError("session_duration must be between 900 and 43200 seconds")


@dataclass(frozen=True)
class GrantRecord:
    """Metadata kept in the role's description."""

    staff: str
    ticket: str
    expires_at: dt.datetime
    kid: str
    alg: SignatureAlgorithm

    def to_description(self) -> str:
        expires = self.expires_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = (
            f"{MARKER}; staff={self.staff}; ticket={self.ticket}; expires={expires}; "
            f"kid={self.kid}; alg={self.alg.value}; read-only support access, managed by hsm-keys"
        )
        assert len(text) <= DESCRIPTION_MAX
        return text

    @classmethod
    def from_description(cls, description: str | None) -> GrantRecord | None:
        if not description or not description.startswith(MARKER + ";"):
            return None
        fields = dict(_DESCRIPTION_FIELD_RE.findall(description))
        try:
            Binding(fields["staff"], "000000000000")  # a tampered description is not a grant
            return cls(
                staff=fields["staff"],
                ticket=fields["ticket"],
                expires_at=dt.datetime.strptime(fields["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=dt.UTC
                ),
                kid=fields["kid"],
                alg=SignatureAlgorithm.parse(fields["alg"]),
            )
        except (KeyError, ValueError, HsmKeysError):
            return None


@dataclass(frozen=True)
class Grant:
    staff: str
    account: str
    ticket: str
    expires_at: dt.datetime
    kid: str
    alg: SignatureAlgorithm
    issuer: str
    role_arn: str
    provider_arn: str
    staff_policy_arn: str
    thumbprints: tuple[str, ...] = ()
    #: What this grant changed beyond ticket and expiry that an operator should know (e.g. thumbprints).
    notes: tuple[str, ...] = ()

    @property
    def role_name(self) -> str:
        return self.role_arn.rsplit("/", 1)[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "staff": self.staff,
            "account": self.account,
            "ticket": self.ticket,
            "expires_at": self.expires_at.isoformat(),
            "kid": self.kid,
            "alg": self.alg.value,
            "issuer": self.issuer,
            "role_arn": self.role_arn,
            "provider_arn": self.provider_arn,
            "staff_policy_arn": self.staff_policy_arn,
            "thumbprints": list(self.thumbprints),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Action:
    """One thing revoke / reconcile / expire did (or found it could not do)."""

    account: str
    target: str
    action: str
    detail: str = ""
    ok: bool = True

    def __str__(self) -> str:
        mark = "" if self.ok else "FAILED "
        return f"{mark}{self.action} {self.target}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class AccountRevocation:
    """What revoking an account did (the onboarding handler's ``RevocationReport``)."""

    account: str
    actions: tuple[Action, ...]

    @property
    def complete(self) -> bool:
        return all(action.ok for action in self.actions)

    def summary(self) -> str:
        failed = [a for a in self.actions if not a.ok]
        text = f"account {self.account}: {len(self.actions)} action(s)"
        return text + (f", {len(failed)} failed: {failed[0]}" if failed else "")


@dataclass(frozen=True)
class Check:
    """One line of ``verify``: ``skipped`` when a check it depends on failed, so it did not run."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def status(self) -> str:
        return "PASS" if self.ok else "SKIP" if self.skipped else "FAIL"

    def __str__(self) -> str:
        return f"{self.status}  {self.name:<12} {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    staff: str
    account: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def __str__(self) -> str:
        return "\n".join(str(check) for check in self.checks)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_BINDING_LOCKS: dict[tuple[str, str], tuple[threading.RLock, int]] = {}
_BINDING_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def serialised(binding: Binding) -> Iterator[None]:
    """Hold the process-wide lock of one (staff, account) pair (IAM's case-insensitive identity).

    ``grant`` and ``revoke`` of one pair run one at a time within a process, whatever
    :class:`SupportAccess` instance runs them; the lock is re-entrant, so ``reconcile`` may grant or
    revoke from inside. Across processes, :class:`_Created` keeps a losing grant's rollback to what
    that grant made.
    """
    key = binding.key
    with _BINDING_LOCKS_GUARD:
        lock, users = _BINDING_LOCKS.get(key, (threading.RLock(), 0))
        _BINDING_LOCKS[key] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _BINDING_LOCKS_GUARD:
            lock, users = _BINDING_LOCKS[key]
            if users == 1:
                del _BINDING_LOCKS[key]
            else:
                _BINDING_LOCKS[key] = (lock, users - 1)


@dataclass
class _Created:
    """What one ``grant`` call created itself: the only things its rollback may undo."""

    key: KeyInfo | None = None
    published: bool = False
    provider_arn: str | None = None
    role_name: str | None = None
    policy_arn: str | None = None

    def __bool__(self) -> bool:
        return any((self.key, self.published, self.provider_arn, self.role_name, self.policy_arn))


def trust_policy(provider_arn: str, provider_url: str, audience: str, subject: str) -> dict[str, Any]:
    """Only web-identity tokens from this provider, for this audience and subject."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": provider_arn},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {
                    "StringEquals": {f"{provider_url}:aud": audience, f"{provider_url}:sub": subject}
                },
            }
        ],
    }


def _staff_of_role(role_name: str) -> str | None:
    """Lower-case staff id a ``DoiT-Support-<staff>`` role (or policy) is for, if it is a valid one."""
    if not role_name.startswith(ROLE_PREFIX):
        return None
    staff = role_name[len(ROLE_PREFIX) :]
    try:
        return Binding(staff, "000000000000").staff.lower()
    except HsmKeysError:
        return None


def _description_staff(description: object) -> str | None:
    """The ``staff=`` a description written by this library names (lower case), else None."""
    if not isinstance(description, str) or not description.startswith(MARKER + ";"):
        return None
    staff = dict(_DESCRIPTION_FIELD_RE.findall(description)).get("staff")
    return staff.strip().lower() if staff else None


def owns(name: str, description: object) -> bool:
    """Whether a ``DoiT-Support-<staff>`` role or policy is this library's: marker AND name match.

    The description carries :data:`MARKER` and names the staff member the entity's name is for. A
    description copied onto another name (``DoiT-Support-walt`` saying ``staff=vera``) is not ours:
    the name is the authority, as IAM keys the entity by it.
    """
    staff = _staff_of_role(name) if isinstance(name, str) else None
    return staff is not None and _description_staff(description) == staff


def owned_grant(role: Mapping[str, Any] | None) -> GrantRecord | None:
    """The grant a role (as GetRole / ListRoles return it) carries, if the role is ours (:func:`owns`)."""
    if role is None or not owns(str(role.get("RoleName", "")), role.get("Description")):
        return None
    record = GrantRecord.from_description(role.get("Description"))
    if record is None or record.staff.lower() != _staff_of_role(str(role["RoleName"])):
        return None
    return record


def rotated_thumbprints(current: Iterable[str], served: str) -> list[str]:
    """``served`` first, then the others newest first (as this library writes them), at most five."""
    first = normalize_thumbprint(served)
    others: list[str] = []
    for value in current:
        thumbprint = str(value).lower()
        if thumbprint != first and thumbprint not in others:
            others.append(thumbprint)
    return [first, *others][:MAX_THUMBPRINTS]


def _keys_by_binding(keys: Iterable[KeyInfo], account: str) -> dict[tuple[str, str], list[KeyInfo]]:
    """The account's keys grouped by binding identity, oldest first."""
    groups: dict[tuple[str, str], list[KeyInfo]] = {}
    for key in sorted(keys, key=lambda k: (k.created_at, k.kid)):
        if key.binding.account == account:
            groups.setdefault(key.binding.key, []).append(key)
    return groups


def _policy_document(value: Any) -> Any:
    """IAM returns policy documents URL-encoded (real AWS) or already decoded (some SDKs/mocks)."""
    if isinstance(value, str):
        return json.loads(urllib.parse.unquote(value))
    return value


class SupportAccess:
    """Grant, list, verify, revoke, expire and reconcile read-only support access.

    Collaborators are injected so each can be replaced in tests: the key store (HSM), the account
    registry (filled by onboarding), the AWS environment (operations session and endpoints), the
    issuer publisher, the clock and the audit log.
    """

    def __init__(
        self,
        store: KeyStore,
        registry: AccountRegistry,
        aws: AwsEnvironment,
        publisher: IssuerPublisher,
        settings: GrantSettings,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.aws = aws
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.audit = audit or NullAuditLog()

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def scheme(self) -> IssuerScheme:
        return self.settings.issuer

    def _iam(self, account: str) -> Any:
        registration = self.registry.require(account)
        return self.aws.management_iam(account, registration.role_arn)

    def _call(self, iam: Any, operation: str, *, fresh: Iterable[str] = (), **params: Any) -> dict[str, Any]:
        try:
            return self.aws.retries.call(iam, operation, fresh=frozenset(fresh), **params)
        except botocore.exceptions.ClientError as exc:
            raise translate(exc, operation) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc, operation) from exc

    def _gone_ok(self, iam: Any, operation: str, **params: Any) -> bool:
        """Run a delete-like call; NoSuchEntity counts as done. Returns whether it did something."""
        try:
            self._call(iam, operation, **params)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return False
            raise
        return True

    def _get_role(self, iam: Any, role_name: str) -> dict[str, Any] | None:
        try:
            return dict(self._call(iam, "GetRole", RoleName=role_name)["Role"])
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return None
            raise

    def _staff_policy_arn(self, binding: Binding, partition: str) -> str:
        return f"arn:{partition}:iam::{binding.account}:policy/{binding.role_name}"

    def _partition(self, account: str) -> str:
        """``aws``, ``aws-cn`` or ``aws-us-gov``: the partition of the account's management role ARN."""
        return self.registry.require(account).partition

    def _provider_arn(self, binding: Binding) -> str:
        return self.scheme.provider_arn(binding, self._partition(binding.account))

    @staticmethod
    def _subject(binding: Binding) -> str:
        return binding.staff.lower()

    def _canonical_binding(self, binding: Binding) -> tuple[Binding, KeyInfo | None]:
        """The binding as first granted (staff-id case) and its key, if any."""
        key = self.store.find(binding)
        return (key.binding if key else binding), key

    def _check_grant_inputs(
        self, staff: str, account: str, ticket: str, ttl: dt.timedelta, alg: SignatureAlgorithm | str
    ) -> tuple[Binding, SignatureAlgorithm, dt.datetime]:
        binding = Binding(staff, account)
        validate_ticket(ticket)
        algorithm = SignatureAlgorithm.parse(alg)
        if algorithm not in STS_ALGORITHMS:
            allowed = ", ".join(sorted(a.value for a in STS_ALGORITHMS))
            raise UnsupportedAlgorithmError(
                f"STS does not accept {algorithm.value} for web-identity tokens (allowed: {allowed})"
            )
        if not isinstance(ttl, dt.timedelta) or ttl < MIN_TTL:
            raise InvalidInputError(f"ttl must be a timedelta of at least {MIN_TTL}, got {ttl!r}")
        if ttl > self.settings.max_ttl:
            raise InvalidInputError(f"ttl {ttl} exceeds the maximum of {self.settings.max_ttl}")
        oidc.validate_issuer_url(self.scheme.issuer(binding))  # e.g. a staff id of "." or ".."
        return binding, algorithm, (self.clock() + ttl).replace(microsecond=0)

    # -- grant --------------------------------------------------------------------------------------

    def grant(
        self,
        staff: str,
        account: str,
        *,
        ticket: str,
        ttl: dt.timedelta,
        alg: SignatureAlgorithm | str = SignatureAlgorithm.ES256,
    ) -> Grant:
        """Create (or refresh) the pair's access. Idempotent: a repeat only updates ticket and expiry.

        Grants (and revocations) of one pair run one at a time within the process. A grant that fails
        half way undoes only what it created itself (key, issuer documents, provider, role, policy),
        and nothing a concurrent grant of the same pair now relies on.
        """
        binding, algorithm, expires_at = self._check_grant_inputs(staff, account, ticket, ttl, alg)
        with serialised(binding):
            return self._grant(binding, algorithm, ticket, expires_at)

    def _grant(
        self, binding: Binding, algorithm: SignatureAlgorithm, ticket: str, expires_at: dt.datetime
    ) -> Grant:
        account = binding.account
        iam = self._iam(account)  # fails early when the account is not onboarded or the role is gone
        partition = self._partition(account)
        binding, key = self._canonical_binding(binding)

        role = self._get_role(iam, binding.role_name)
        record = owned_grant(role)
        if role is not None and record is None:
            raise NotOwnedError(
                f"role {binding.role_name} exists in account {account} but was not created by hsm-keys; "
                "it is left alone (rename or remove it to grant access to this staff member)",
                operation="GetRole",
                code="NotOwned",
            )

        self._check_staff_policy_owned(iam, binding, partition)  # before anything is written
        created = _Created()
        notes: list[str] = []
        try:
            key, role, provider_arn, policy_arn = self._apply_grant(
                iam, binding, key, role, record, algorithm, ticket, expires_at, partition, created, notes
            )
        except BaseException:
            # Undo what this call made, leave no usable access of its own making. The original error
            # matters; reconcile finishes whatever this cannot.
            if created:
                self._roll_back(iam, binding, created)
            raise
        provider = self._call(iam, "GetOpenIDConnectProvider", OpenIDConnectProviderArn=provider_arn)
        grant = Grant(
            staff=binding.staff,
            account=account,
            ticket=ticket,
            expires_at=expires_at,
            kid=key.kid,
            alg=algorithm,
            issuer=self.scheme.issuer(binding),
            role_arn=str(role["Arn"]),
            provider_arn=provider_arn,
            staff_policy_arn=policy_arn,
            thumbprints=tuple(provider.get("ThumbprintList", ())),
            notes=tuple(notes),
        )
        self.audit.record(
            "access.grant",
            staff=binding.staff,
            account=account,
            ticket=ticket,
            expires_at=grant.expires_at.isoformat(),
            kid=key.kid,
            alg=algorithm.value,
        )
        return grant

    def _apply_grant(
        self,
        iam: Any,
        binding: Binding,
        key: KeyInfo | None,
        role: dict[str, Any] | None,
        record: GrantRecord | None,
        algorithm: SignatureAlgorithm,
        ticket: str,
        expires_at: dt.datetime,
        partition: str,
        created: _Created,
        notes: list[str],
    ) -> tuple[KeyInfo, dict[str, Any], str, str]:
        """Every write of a grant, in dependency order: key, issuer, provider, role, policies.

        Whatever it creates is noted in ``created`` the moment it exists, for the rollback; changes
        worth reporting beyond ticket and expiry go to ``notes``.
        """
        account = binding.account
        if key is None:
            spec = self.settings.key_specs.get(algorithm)
            if spec is None:
                raise UnsupportedAlgorithmError(f"no key spec configured for {algorithm.value}")
            checkpoint(f"generating the key of {binding}")
            key = self.store.generate(spec, binding)
            created.key = key
            self.audit.record(
                "key.generate", kid=key.kid, staff=binding.staff, account=account, spec=spec.value
            )
        elif not algorithm.allows(key.spec):
            raise UnsupportedAlgorithmError(
                f"{binding} already has an {key.spec.value} key, which cannot sign {algorithm.value}; "
                f"use {key.default_algorithm.value} or revoke first"
            )
        if record is not None and record.kid != key.kid:
            # The role trusts a key that is gone: the grant is stale, rebuild its IAM side.
            self._delete_role(iam, binding.role_name)
            role, record = None, None

        self._publish(binding, key, algorithm)
        created.published = created.key is not None
        thumbprint = self._served_thumbprint()
        provider_arn, provider_fresh = self._ensure_provider(iam, binding, thumbprint, notes)
        if provider_fresh:
            created.provider_arn = provider_arn

        new = GrantRecord(binding.staff, ticket, expires_at, key.kid, algorithm)
        expected_trust = trust_policy(
            provider_arn, self.scheme.provider_url(binding), self.scheme.audience, self._subject(binding)
        )
        if role is not None and _policy_document(role.get("AssumeRolePolicyDocument")) != expected_trust:
            # The management policy grants no UpdateAssumeRolePolicy: replace the role instead.
            self._delete_role(iam, binding.role_name)
            role = None
        if role is None:
            role = self._call(
                iam,
                "CreateRole",
                fresh=_FRESH_PRINCIPAL_ERRORS if provider_fresh else (),
                RoleName=binding.role_name,
                AssumeRolePolicyDocument=json.dumps(expected_trust),
                Description=new.to_description(),
                MaxSessionDuration=self.settings.session_duration,
            )["Role"]
            created.role_name = binding.role_name
            role_fresh = True
        else:
            self._call(
                iam, "UpdateRoleDescription", RoleName=binding.role_name, Description=new.to_description()
            )
            role_fresh = False
        fresh = _FRESH_ROLE_ERRORS if role_fresh else frozenset()
        self._call(
            iam,
            "AttachRolePolicy",
            fresh=fresh,
            RoleName=binding.role_name,
            PolicyArn=SECURITY_AUDIT_ARN.format(partition=partition),
        )
        policy_arn, policy_fresh = self._ensure_staff_policy(iam, binding, partition)
        if policy_fresh:
            created.policy_arn = policy_arn
        self._call(
            iam,
            "AttachRolePolicy",
            fresh=fresh | (_FRESH_ROLE_ERRORS if policy_fresh else frozenset()),
            RoleName=binding.role_name,
            PolicyArn=policy_arn,
        )
        return key, role, provider_arn, policy_arn

    def _roll_back(self, iam: Any, binding: Binding, created: _Created) -> None:
        """Undo what one failed grant created, and nothing else.

        A role this call did not create but that is ours now belongs to a concurrent grant of the
        same pair (another process): the key, documents, provider and policy it relies on stay.
        Each step is attempted on its own; what cannot be undone is left to ``reconcile``.
        """
        undone: list[str] = []

        def step(what: str, undo: Callable[[], object]) -> None:
            try:
                undo()
                undone.append(what)
            except HsmKeysError as exc:
                logger.warning("rolling back the grant of %s: could not undo %s: %s", binding, what, exc)

        if created.role_name is not None:
            step(f"role {created.role_name}", lambda: self._delete_role(iam, binding.role_name))
            adopted = False
        else:
            try:
                adopted = owned_grant(self._get_role(iam, binding.role_name)) is not None
            except HsmKeysError:
                adopted = True  # cannot tell: leave the shared parts to reconcile
        if not adopted:
            if created.policy_arn is not None:
                arn = created.policy_arn
                step(f"policy {arn}", lambda: self._delete_staff_policy(iam, arn))
            if created.provider_arn is not None:
                arn_ = created.provider_arn
                step(
                    f"provider {arn_}",
                    lambda: self._gone_ok(iam, "DeleteOpenIDConnectProvider", OpenIDConnectProviderArn=arn_),
                )
            if created.key is not None:
                key = created.key
                step(
                    f"key {key.kid}",
                    lambda: self._destroy_keys_and_issuer(binding, [key], unpublish=created.published),
                )
        self.audit.record(
            "access.grant.rollback",
            staff=binding.staff,
            account=binding.account,
            undone=", ".join(undone),
            left_for_concurrent_grant=adopted,
        )

    def _check_staff_policy_owned(self, iam: Any, binding: Binding, partition: str) -> None:
        try:
            policy = self._call(iam, "GetPolicy", PolicyArn=self._staff_policy_arn(binding, partition))[
                "Policy"
            ]
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return
            raise
        if not owns(binding.role_name, policy.get("Description")):
            raise NotOwnedError(
                f"policy {binding.role_name} exists in account {binding.account} "
                "but was not created by hsm-keys; it is left alone",
                operation="GetPolicy",
                code="NotOwned",
            )

    def _publish(self, binding: Binding, key: KeyInfo, alg: SignatureAlgorithm) -> None:
        issuer = self.scheme.issuer(binding)
        discovery = oidc.discovery_document(issuer, self.scheme.jwks_uri(binding), [alg.value])
        documents = issuer_documents(discovery, oidc.jwks([key], alg=alg))
        checkpoint(f"publishing the issuer of {binding}")
        self.publisher.publish(self._issuer_path(binding), documents)

    def _issuer_path(self, binding: Binding) -> str:
        base = self.scheme.base_path
        relative = self.scheme.relative_path(binding)
        return f"{base}/{relative}" if base else relative

    def _served_thumbprint(self) -> str:
        host = self.scheme.host
        chain = fetch_chain(
            host,
            443,
            resolve=self.settings.https.resolve,
            ca_bundle=self.settings.https.ca_bundle,
            timeout=self.settings.https.timeout,
        )
        return oidc_thumbprint(chain)

    def _find_provider(self, iam: Any, arn: str) -> dict[str, Any] | None:
        try:
            return self._call(iam, "GetOpenIDConnectProvider", OpenIDConnectProviderArn=arn)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return None
            raise

    def _ensure_provider(
        self, iam: Any, binding: Binding, thumbprint: str, notes: list[str]
    ) -> tuple[str, bool]:
        """Create the pair's provider, or make the existing one (ours: its URL) trust the served chain.

        A provider whose thumbprints miss the one served now gets it *first*, followed by the most
        recent of the others (this library writes newest first) up to IAM's five; what is dropped is
        reported in ``notes`` and the audit log. Without this, a provider already holding five stale
        thumbprints would block every repeat grant.
        """
        arn = self._provider_arn(binding)
        provider = self._find_provider(iam, arn)
        if provider is not None and self.scheme.audience not in provider.get("ClientIDList", []):
            # Adding a client id is not permitted by the management policy: recreate with the final list.
            self._gone_ok(iam, "DeleteOpenIDConnectProvider", OpenIDConnectProviderArn=arn)
            provider = None
        if provider is None:
            created = self._call(
                iam,
                "CreateOpenIDConnectProvider",
                Url=self.scheme.issuer(binding),
                ClientIDList=[self.scheme.audience],
                ThumbprintList=[thumbprint],
            )
            return str(created["OpenIDConnectProviderArn"]), True
        current = [str(t).lower() for t in provider.get("ThumbprintList", [])]
        served = normalize_thumbprint(thumbprint)
        if served not in current:
            wanted = rotated_thumbprints(current, served)
            self._call(
                iam,
                "UpdateOpenIDConnectProviderThumbprint",
                OpenIDConnectProviderArn=arn,
                ThumbprintList=wanted,
            )
            dropped = [t for t in current if t not in wanted]
            notes.append(
                f"provider thumbprints updated: served {served} added first"
                + (f"; dropped {', '.join(dropped)}" if dropped else "")
            )
            self.audit.record("provider.thumbprints", provider=arn, added=served, dropped=", ".join(dropped))
            logger.info("%s: %s", arn, notes[-1])
        return arn, False

    def _ensure_staff_policy(self, iam: Any, binding: Binding, partition: str) -> tuple[str, bool]:
        arn = self._staff_policy_arn(binding, partition)
        wanted = dict(self.settings.staff_policy)
        try:
            policy = self._call(iam, "GetPolicy", PolicyArn=arn)["Policy"]
        except AwsError as exc:
            if exc.code != "NoSuchEntity":
                raise
            policy = None
        if policy is None:
            self._call(
                iam,
                "CreatePolicy",
                PolicyName=binding.role_name,
                PolicyDocument=json.dumps(wanted),
                Description=f"{MARKER}; staff={binding.staff}; extra read-only support permissions",
            )
            return arn, True
        if not owns(binding.role_name, policy.get("Description")):
            raise NotOwnedError(
                f"policy {binding.role_name} exists in account {binding.account} "
                "but was not created by hsm-keys",
                operation="GetPolicy",
                code="NotOwned",
            )
        version = self._call(iam, "GetPolicyVersion", PolicyArn=arn, VersionId=policy["DefaultVersionId"])
        if _policy_document(version["PolicyVersion"]["Document"]) != wanted:
            self._prune_policy_versions(iam, arn, keep=4)
            self._call(
                iam,
                "CreatePolicyVersion",
                PolicyArn=arn,
                PolicyDocument=json.dumps(wanted),
                SetAsDefault=True,
            )
        return arn, False

    def _prune_policy_versions(self, iam: Any, arn: str, *, keep: int) -> None:
        """IAM keeps at most 5 versions: delete the oldest non-default ones beyond ``keep``."""
        versions = self._call(iam, "ListPolicyVersions", PolicyArn=arn)["Versions"]
        old = sorted((v for v in versions if not v["IsDefaultVersion"]), key=lambda v: v["CreateDate"])
        for version in old[: max(0, len(versions) - keep)]:
            self._gone_ok(iam, "DeletePolicyVersion", PolicyArn=arn, VersionId=version["VersionId"])

    # -- revoke -------------------------------------------------------------------------------------

    def _delete_role(self, iam: Any, role_name: str) -> list[Action]:
        """Detach every managed policy, then delete the role. Conflicts we may not clear are reported."""
        actions: list[Action] = []
        account = ""
        try:
            attached = self._call(iam, "ListAttachedRolePolicies", RoleName=role_name)["AttachedPolicies"]
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return actions
            raise
        for policy in attached:
            if self._gone_ok(iam, "DetachRolePolicy", RoleName=role_name, PolicyArn=policy["PolicyArn"]):
                actions.append(Action(account, policy["PolicyArn"], "detached policy", f"from {role_name}"))
        inline = self._call(iam, "ListRolePolicies", RoleName=role_name).get("PolicyNames", [])
        if inline:
            raise AccessDeniedError(
                f"role {role_name} has inline policies ({', '.join(inline)}) that someone else added; "
                "the management policy does not permit iam:DeleteRolePolicy, so remove them in the account "
                "and revoke again",
                operation="DeleteRole",
                code="DeleteConflict",
            )
        try:
            if self._gone_ok(iam, "DeleteRole", RoleName=role_name):
                actions.append(Action(account, role_name, "deleted role"))
        except AwsError as exc:
            if exc.code == "DeleteConflict":
                raise AccessDeniedError(
                    f"role {role_name} cannot be deleted: {exc} (an instance profile or permissions boundary "
                    "someone else added; the management policy cannot clear it: remove it in the account and "
                    "revoke again)",
                    operation="DeleteRole",
                    code="DeleteConflict",
                ) from exc
            raise
        return actions

    def _delete_staff_policy(self, iam: Any, arn: str) -> list[Action]:
        try:
            policy = self._call(iam, "GetPolicy", PolicyArn=arn)["Policy"]
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return []
            raise
        if not owns(arn.rsplit("/", 1)[-1], policy.get("Description")):
            return [Action("", arn, "left alone", "policy not created by hsm-keys", ok=True)]
        if int(policy.get("AttachmentCount", 0)):
            entities = self._call(iam, "ListEntitiesForPolicy", PolicyArn=arn)
            for role in entities.get("PolicyRoles", []):
                if role["RoleName"].startswith("DoiT-Support"):
                    self._gone_ok(iam, "DetachRolePolicy", RoleName=role["RoleName"], PolicyArn=arn)
        versions = self._call(iam, "ListPolicyVersions", PolicyArn=arn)["Versions"]
        for version in versions:
            if not version["IsDefaultVersion"]:
                self._gone_ok(iam, "DeletePolicyVersion", PolicyArn=arn, VersionId=version["VersionId"])
        try:
            self._gone_ok(iam, "DeletePolicy", PolicyArn=arn)
        except AwsError as exc:
            if exc.code == "DeleteConflict":
                raise AccessDeniedError(
                    f"policy {arn} is still attached to entities the management policy may not detach from; "
                    "detach it in the account and revoke again",
                    operation="DeletePolicy",
                    code="DeleteConflict",
                ) from exc
            raise
        return [Action("", arn, "deleted policy")]

    def revoke(self, staff: str, account: str) -> list[Action]:
        """Remove the pair's role, policy, provider, key and issuer. Safe to repeat."""
        with serialised(Binding(staff, account)):
            return self._revoke(staff, account)

    def _revoke(self, staff: str, account: str) -> list[Action]:
        binding, _ = self._canonical_binding(Binding(staff, account))
        iam = self._iam(account)
        partition = self._partition(account)
        actions: list[Action] = []
        role = self._get_role(iam, binding.role_name)
        if role is not None:
            if owned_grant(role) is None:
                raise NotOwnedError(
                    f"role {binding.role_name} in account {account} was not created by hsm-keys; "
                    "not deleting it",
                    operation="GetRole",
                    code="NotOwned",
                )
            actions += self._delete_role(iam, binding.role_name)
        actions += self._delete_staff_policy(iam, self._staff_policy_arn(binding, partition))
        provider_arn = self._provider_arn(binding)
        if self._find_provider(iam, provider_arn) is not None and self._gone_ok(
            iam, "DeleteOpenIDConnectProvider", OpenIDConnectProviderArn=provider_arn
        ):
            actions.append(Action(account, provider_arn, "deleted provider"))
        actions += self._destroy_keys_and_issuer(binding)
        self.audit.record("access.revoke", staff=binding.staff, account=account)
        return [Action(account, a.target, a.action, a.detail, a.ok) for a in actions]

    def _destroy_keys_and_issuer(
        self, binding: Binding, keys: Iterable[KeyInfo] | None = None, *, unpublish: bool = True
    ) -> list[Action]:
        """Destroy every key of the binding (a race may have left more than one) and its issuer."""
        actions = []
        if keys is None:
            keys = [k for k in self.store.list_keys() if k.binding.same_as(binding)]
        for key in keys:
            try:
                checkpoint(f"destroying key {key.kid}")
                self.store.destroy(key.kid)
            except KeyNotFoundError:
                continue
            self.audit.record("key.destroy", kid=key.kid, staff=key.binding.staff, account=binding.account)
            actions.append(Action(binding.account, key.kid, "destroyed key"))
        path = self._issuer_path(binding)
        if unpublish and path.strip("/") in {p.strip("/") for p in self.publisher.published()}:
            checkpoint(f"unpublishing {path}")
            self.publisher.unpublish(path)
            actions.append(Action(binding.account, self.scheme.issuer(binding), "unpublished issuer"))
        return actions

    def purge_account_offline(self, account: str) -> AccountRevocation:
        """When the management role is gone: destroy the account's keys and unpublish its issuers."""
        return AccountRevocation(account, tuple(self._purge_offline(account)))

    def _purge_offline(self, account: str, reason: str = "") -> list[Action]:
        """Destroy the account's keys and unpublish its issuers, without AWS; report each action."""
        actions: list[Action] = []
        for group in _keys_by_binding(self.store.list_keys(), account).values():
            actions += self._destroy_keys_and_issuer(group[0].binding, group)
        for (_, staff), path in self._published_issuers(account).items():
            checkpoint(f"unpublishing {path}")
            self.publisher.unpublish(path)
            actions.append(Action(account, self.scheme.issuer(Binding(staff, account)), "unpublished issuer"))
        if reason:
            actions = [Action(a.account, a.target, a.action, a.detail or reason, a.ok) for a in actions]
        return actions

    def revoke_account(self, account: str) -> AccountRevocation:
        """Revoke every grant in the account (onboarding's Delete), then clean what is left offline."""
        actions: list[Action] = []
        for grant in self.list_grants(account):
            actions += self.revoke(grant.staff, account)
        actions += self.reconcile(account)
        actions += self._purge_offline(account)
        return AccountRevocation(account, tuple(actions))

    # -- read ---------------------------------------------------------------------------------------

    def _owned_roles(self, iam: Any) -> list[tuple[dict[str, Any], GrantRecord]]:
        roles: list[tuple[dict[str, Any], GrantRecord]] = []
        marker: str | None = None
        while True:
            page = self._call(iam, "ListRoles", **({"Marker": marker} if marker else {}))
            for listed in page.get("Roles", []):
                if not listed["RoleName"].startswith(ROLE_PREFIX):
                    continue
                # ListRoles may omit the description; GetRole has it
                role = (
                    listed if "Description" in listed else (self._get_role(iam, listed["RoleName"]) or listed)
                )
                record = owned_grant({**role, "RoleName": listed["RoleName"]})
                if record is not None:
                    roles.append((role, record))
            if not page.get("IsTruncated"):
                return roles
            marker = page.get("Marker")

    def list_grants(self, account: str) -> list[Grant]:
        iam = self._iam(account)
        partition = self._partition(account)
        grants = []
        for role, record in self._owned_roles(iam):
            binding = Binding(record.staff, account)
            grants.append(
                Grant(
                    staff=record.staff,
                    account=account,
                    ticket=record.ticket,
                    expires_at=record.expires_at,
                    kid=record.kid,
                    alg=record.alg,
                    issuer=self.scheme.issuer(binding),
                    role_arn=role["Arn"],
                    provider_arn=self._provider_arn(binding),
                    staff_policy_arn=self._staff_policy_arn(binding, partition),
                )
            )
        return sorted(grants, key=lambda g: g.staff.lower())

    def expire(self, now: dt.datetime | None = None) -> list[Action]:
        """Revoke every grant, in every registered account, whose expiry has passed.

        One account (or grant) that fails is reported as a failed action; the others still expire.
        """
        moment = now or self.clock()
        actions: list[Action] = []
        for registration in self.registry.accounts():
            account = registration.account_id
            try:
                grants = self.list_grants(account)
            except WorkCancelledError:
                raise
            except HsmKeysError as exc:
                actions.append(Action(account, registration.role_arn, "skipped account", str(exc), ok=False))
                continue
            for grant in grants:
                if grant.expires_at > moment:
                    continue
                try:
                    actions += self.revoke(grant.staff, account)
                except WorkCancelledError:
                    raise
                except HsmKeysError as exc:
                    actions.append(Action(account, grant.role_name, "could not expire", str(exc), ok=False))
                    continue
                actions.append(Action(account, grant.role_name, "expired", grant.expires_at.isoformat()))
        return actions

    def reconcile(self, account: str) -> list[Action]:
        """Compare the HSM, the registry and IAM for what we own; repair drift; report each action.

        For a registered account: grants missing a part (provider, a thumbprint of the chain served
        now, a policy attachment, issuer documents) are completed; grants whose key is gone or whose
        expiry passed are removed; keys without a role, and providers, staff policies and published
        issuer documents without key and role, are removed. For an account that is not registered
        (its stack was deleted, or never onboarded) nothing in AWS can be reached: its keys are
        destroyed and its issuers unpublished, each reported.

        Each item is repaired on its own: one that cannot be (a conflict only the customer can clear)
        is reported as a failed action and the others still get done. Removals of leftovers happen
        under the pair's lock, after checking again that no grant of the pair appeared meanwhile.
        """
        Binding("reconcile", account)  # a malformed account id is bad input, not an empty account
        if self.registry.get(account) is None:
            return self._purge_offline(account, "account not registered")
        iam = self._iam(account)
        partition = self._partition(account)
        actions: list[Action] = []
        keys = _keys_by_binding(self.store.list_keys(), account)
        roles = {
            Binding(record.staff, account).key: (role, record) for role, record in self._owned_roles(iam)
        }
        providers = {}
        for entry in self._call(iam, "ListOpenIDConnectProviders").get("OpenIDConnectProviderList", []):
            named = self.scheme.binding_of_provider_arn(entry["Arn"], account, partition)
            if named is not None:
                providers[named] = entry["Arn"]
        served = functools.cache(self._served_thumbprint)  # fetched once, and only if a grant needs it

        def attempt(target: str, repair: Callable[[], list[Action]]) -> None:
            try:
                actions.extend(repair())
            except WorkCancelledError:
                raise  # not a failed repair: nothing more may be done at all
            except HsmKeysError as exc:
                actions.append(Action(account, target, "could not repair", str(exc), ok=False))

        for identity, (role, record) in roles.items():
            binding = Binding(record.staff, account)
            group = keys.get(identity, [])
            attempt(
                binding.role_name,
                functools.partial(
                    self._reconcile_grant, iam, binding, role, record, group, partition, providers, served
                ),
            )

        for identity, group in keys.items():
            if identity not in roles:
                binding = group[0].binding

                def remove_half_made(b: Binding = binding, g: list[KeyInfo] = group) -> list[Action]:
                    with serialised(b):
                        if owned_grant(self._get_role(iam, b.role_name)) is not None:
                            return []  # a grant completed meanwhile
                        done: list[Action] = []
                        arn = providers.get(b.key)
                        if arn is not None and self._gone_ok(
                            iam, "DeleteOpenIDConnectProvider", OpenIDConnectProviderArn=arn
                        ):
                            done.append(Action(account, arn, "deleted provider", "half-made grant (no role)"))
                        done += self._delete_staff_policy(iam, self._staff_policy_arn(b, partition))
                        done += self._destroy_keys_and_issuer(b, g)
                        done.append(Action(account, g[0].kid, "removed half-made grant", "key without role"))
                        return done

                attempt(group[0].kid, remove_half_made)

        def remove_leftover(
            identity: tuple[str, str],
            target: str,
            remove: Callable[[Binding], list[Action]],
            *,
            unless_role: bool = True,
        ) -> None:
            """Remove what a pair without key (and, ``unless_role``, without role) left behind,
            checking again under its lock: a grant of the pair may have run meanwhile."""
            if identity in keys or (unless_role and identity in roles):
                return
            binding = Binding(identity[1], account)

            def repair() -> list[Action]:
                with serialised(binding):
                    if self.store.find(binding) is not None:
                        return []
                    if unless_role and self._get_role(iam, binding.role_name):
                        return []
                    return remove(binding)

            attempt(target, repair)

        def delete_provider(arn: str) -> Callable[[Binding], list[Action]]:
            def remove(_: Binding) -> list[Action]:
                self._gone_ok(iam, "DeleteOpenIDConnectProvider", OpenIDConnectProviderArn=arn)
                return [Action(account, arn, "deleted provider", "no key and no role")]

            return remove

        def delete_policy(arn: str) -> Callable[[Binding], list[Action]]:
            def remove(_: Binding) -> list[Action]:
                return [
                    Action(account, x.target, x.action, "no key and no role" if x.ok else x.detail, x.ok)
                    for x in self._delete_staff_policy(iam, arn)
                    if x.action != "left alone"
                ]

            return remove

        def unpublish(path: str) -> Callable[[Binding], list[Action]]:
            def remove(binding: Binding) -> list[Action]:
                if path not in self.publisher.published():
                    return []
                checkpoint(f"unpublishing {path}")
                self.publisher.unpublish(path)
                return [Action(account, self.scheme.issuer(binding), "unpublished issuer", "no key")]

            return remove

        for identity, arn in providers.items():
            remove_leftover(identity, arn, delete_provider(arn))
        for identity, arn in self._staff_policies(iam, account, partition).items():
            remove_leftover(identity, arn, delete_policy(arn))
        for identity, path in self._published_issuers(account).items():
            # Our own documents: only our key decides (a role without key is revoked above).
            remove_leftover(identity, path, unpublish(path), unless_role=False)
        return [Action(account, a.target, a.action, a.detail, a.ok) for a in actions]

    def _staff_policies(self, iam: Any, account: str, partition: str) -> dict[tuple[str, str], str]:
        """``DoiT-Support-<staff>`` customer-managed policies at ``/`` by pair identity (not yet
        checked for ownership: :meth:`_delete_staff_policy` does that)."""
        found: dict[tuple[str, str], str] = {}
        marker: str | None = None
        while True:
            page = self._call(
                iam, "ListPolicies", Scope="Local", PathPrefix="/", **({"Marker": marker} if marker else {})
            )
            for policy in page.get("Policies", []):
                name = str(policy.get("PolicyName", ""))
                if _staff_of_role(name) is None:
                    continue
                binding = Binding(name.removeprefix(ROLE_PREFIX), account)
                arn = self._staff_policy_arn(binding, partition)
                if policy.get("Arn") == arn:  # ours are created at "/"
                    found[binding.key] = arn
            if not page.get("IsTruncated"):
                return found
            marker = page.get("Marker")

    def _issuer_identity(self, path: str) -> tuple[str, str] | None:
        """(account, lower-case staff) of a published issuer path under our base, else None."""
        parts = path.strip("/").split("/")
        base = [p for p in self.scheme.base_path.split("/") if p]
        if parts[: len(base)] != base:
            return None
        rest = parts[len(base) :]
        if (
            len(rest) != 2
            or not re.fullmatch(r"[0-9]{12}", rest[0])
            or _staff_of_role(ROLE_PREFIX + rest[1]) is None
        ):
            return None
        return rest[0], rest[1].lower()

    def _published_issuers(self, account: str) -> dict[tuple[str, str], str]:
        """The account's published issuer paths, by pair identity."""
        found = {}
        for path in self.publisher.published():
            identity = self._issuer_identity(path)
            if identity is not None and identity[0] == account:
                found[identity] = path
        return found

    def orphaned_accounts(self) -> list[str]:
        """Accounts with keys or published issuers but no registration: ``reconcile`` each to clean."""
        accounts = {key.binding.account for key in self.store.list_keys()}
        accounts |= {i[0] for i in (self._issuer_identity(p) for p in self.publisher.published()) if i}
        return sorted(a for a in accounts if self.registry.get(a) is None)

    def _reconcile_grant(
        self,
        iam: Any,
        binding: Binding,
        role: Mapping[str, Any],
        record: GrantRecord,
        keys: list[KeyInfo],
        partition: str,
        providers: Mapping[Any, str],
        served: Callable[[], str],
    ) -> list[Action]:
        actions: list[Action] = []
        trusted = [k for k in keys if k.kid == record.kid]
        if not trusted:
            actions += self.revoke(binding.staff, binding.account)
            return [*actions, Action(binding.account, binding.role_name, "removed grant", "its key is gone")]
        if record.expires_at <= self.clock():
            actions += self.revoke(binding.staff, binding.account)
            return [*actions, Action(binding.account, binding.role_name, "removed grant", "expired")]
        extra = [k for k in keys if k.kid != record.kid]
        for key in extra:  # left by a race between two generators: the grant's key is the one that stays
            checkpoint(f"destroying key {key.kid}")
            self.store.destroy(key.kid)
            actions.append(
                Action(binding.account, key.kid, "destroyed duplicate key", f"grant uses {record.kid}")
            )
        missing = self._missing_parts(iam, binding, role, partition, providers, served)
        if missing:
            ttl = max(record.expires_at - self.clock(), MIN_TTL)
            self.grant(binding.staff, binding.account, ticket=record.ticket, ttl=ttl, alg=record.alg)
            actions.append(Action(binding.account, binding.role_name, "completed grant", ", ".join(missing)))
        return actions

    def _missing_parts(
        self,
        iam: Any,
        binding: Binding,
        role: Mapping[str, Any],
        partition: str,
        providers: Mapping[Any, str],
        served: Callable[[], str],
    ) -> list[str]:
        missing = []
        if binding.key not in providers:
            missing.append("provider")
        else:
            provider = self._find_provider(iam, providers[binding.key])
            listed = {str(t).lower() for t in (provider or {}).get("ThumbprintList", [])}
            if provider is None:
                missing.append("provider")
            elif normalize_thumbprint(served()) not in listed:
                missing.append("thumbprint of the served chain")
        attached = {
            p["PolicyArn"]
            for p in self._call(iam, "ListAttachedRolePolicies", RoleName=binding.role_name)[
                "AttachedPolicies"
            ]
        }
        if SECURITY_AUDIT_ARN.format(partition=partition) not in attached:
            missing.append("SecurityAudit attachment")
        if self._staff_policy_arn(binding, partition) not in attached:
            missing.append("staff policy")
        path = self._issuer_path(binding).strip("/")
        if path not in {p.strip("/") for p in self.publisher.published()}:
            missing.append("issuer documents")
        return missing

    # -- tokens and credentials ---------------------------------------------------------------------

    def _record_for(self, iam: Any, binding: Binding) -> tuple[dict[str, Any], GrantRecord]:
        role = self._get_role(iam, binding.role_name)
        record = owned_grant(role)
        if role is None or record is None:
            raise OnboardingError(
                f"{binding} has no grant (no role {binding.role_name} created by hsm-keys)", code="NoGrant"
            )
        return role, record

    def mint_token(self, binding: Binding, kid: str, alg: SignatureAlgorithm) -> str:
        return oidc.mint_jwt(
            self.store,
            kid,
            {"iss": self.scheme.issuer(binding), "sub": self._subject(binding), "aud": self.scheme.audience},
            alg,
            ttl=int(self.settings.token_ttl.total_seconds()),
            now=self.clock(),
        )

    def credentials(self, staff: str, account: str, *, session_name: str | None = None) -> boto3.Session:
        """Exchange an HSM-signed JWT at STS for the role's short-lived read-only credentials."""
        binding, key = self._canonical_binding(Binding(staff, account))
        role, record = self._record_for(self._iam(account), binding)
        if key is None or key.kid != record.kid:
            raise KeyNotFoundError(f"the key of {binding}'s grant ({record.kid}) is not in the store")
        if record.expires_at <= self.clock():
            raise OnboardingError(
                f"{binding}'s grant expired at {record.expires_at.isoformat()}", code="Expired"
            )
        sts = self.aws.client("sts", config=botocore.config.Config(signature_version=UNSIGNED))
        name = session_name or re.sub(r"[^\w+=,.@-]", "-", f"{binding.staff}.{record.ticket}")[:64]
        issuer = self.scheme.issuer(binding)
        created = role.get("CreateDate")
        fresh = isinstance(created, dt.datetime) and self.clock() - created < self.settings.fresh_window
        attempts = max(1, self.settings.sts_attempts)
        for attempt in range(attempts):
            token = self.mint_token(binding, key.kid, record.alg)  # a fresh token for every try
            try:
                response = sts.assume_role_with_web_identity(
                    RoleArn=role["Arn"],
                    RoleSessionName=name,
                    WebIdentityToken=token,
                    DurationSeconds=self.settings.session_duration,
                )
                break
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                message = str(exc.response.get("Error", {}).get("Message", ""))
                transient = (
                    code in _STS_TRANSIENT
                    or (code == "InvalidIdentityToken" and "retrieve verification key" in message)
                    or (fresh and code in _STS_FRESH)
                )
                if transient and attempt + 1 < attempts:
                    self.aws.retries.sleep(
                        min(self.aws.retries.max_delay, self.aws.retries.base_delay * 2**attempt)
                    )
                    continue
                raise StsExchangeError(
                    f"STS refused the web-identity token for {role['Arn']} (iss={issuer}, "
                    f"aud={self.scheme.audience}): {code}: {message}",
                    operation="AssumeRoleWithWebIdentity",
                    code=code,
                ) from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise translate(exc, "AssumeRoleWithWebIdentity") from exc
        credentials = response["Credentials"]
        self.audit.record(
            "access.credentials",
            staff=binding.staff,
            account=account,
            kid=key.kid,
            token_digest=digest(token),
            expires_at=str(credentials["Expiration"]),
        )
        return boto3.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
            region_name=self.aws.region,
        )

    # -- verify -------------------------------------------------------------------------------------

    def verify(self, staff: str, account: str) -> VerifyReport:
        """What STS will check, one line each, with the reason for any failure."""
        binding, key = self._canonical_binding(Binding(staff, account))
        checks: list[Check] = []

        def check(name: str, probe: Callable[[], str]) -> bool:
            try:
                checks.append(Check(name, True, probe()))
                return True
            except (HsmKeysError, ValueError, KeyError, TypeError) as exc:
                checks.append(Check(name, False, str(exc) or type(exc).__name__))
                return False

        context: dict[str, Any] = {}

        def registered() -> str:
            registration = self.registry.require(account)
            context["iam"] = self.aws.management_iam(account, registration.role_arn)
            return f"management role {registration.role_arn} assumed"

        def role_ok() -> str:
            role, record = self._record_for(context["iam"], binding)
            context["role"], context["record"] = role, record
            if record.expires_at <= self.clock():
                raise ValueError(f"grant expired at {record.expires_at.isoformat()}")
            return f"{role['Arn']} (ticket {record.ticket}, expires {record.expires_at.isoformat()})"

        def key_ok() -> str:
            record: GrantRecord = context["record"]
            if key is None:
                raise KeyNotFoundError(f"no key for {binding} in the store")
            if key.kid != record.kid:
                raise ValueError(f"role trusts kid {record.kid} but the store holds {key.kid}")
            if record.alg not in STS_ALGORITHMS or not record.alg.allows(key.spec):
                raise ValueError(f"{record.alg.value} with a {key.spec.value} key is not accepted by STS")
            return f"kid {key.kid} ({key.spec.value}, {record.alg.value})"

        def discovery_ok() -> str:
            url = self.scheme.discovery_url(binding)
            status, body = https_get(url, self.settings.https)
            if status != 200:
                raise ValueError(f"GET {url} answered HTTP {status}")
            document = json.loads(body)
            if document.get("issuer") != self.scheme.issuer(binding):
                raise ValueError(
                    f"discovery issuer {document.get('issuer')!r} != {self.scheme.issuer(binding)!r}"
                )
            if document.get("jwks_uri") != self.scheme.jwks_uri(binding):
                raise ValueError(
                    f"jwks_uri {document.get('jwks_uri')!r} != {self.scheme.jwks_uri(binding)!r}"
                )
            algs = document.get("id_token_signing_alg_values_supported", [])
            if context["record"].alg.value not in algs:
                raise ValueError(
                    f"{context['record'].alg.value} not in id_token_signing_alg_values_supported {algs}"
                )
            return f"{url} reachable over HTTPS"

        def jwks_ok() -> str:
            url = self.scheme.jwks_uri(binding)
            status, body = https_get(url, self.settings.https)
            if status != 200:
                raise ValueError(f"GET {url} answered HTTP {status}")
            entries = [k for k in json.loads(body).get("keys", []) if k.get("kid") == context["record"].kid]
            if not entries:
                raise ValueError(f"JWKS at {url} has no key with kid {context['record'].kid}")
            if jwk_thumbprint(jwk_to_public_key(entries[0])) != context["record"].kid:
                raise ValueError("the published key's thumbprint does not match its kid")
            context["jwk"] = entries[0]
            return f"kid present, thumbprint matches ({len(json.loads(body).get('keys', []))} key(s))"

        def provider_ok() -> str:
            arn = self._provider_arn(binding)
            provider = self._find_provider(context["iam"], arn)
            if provider is None:
                raise ValueError(f"no OIDC provider {arn}")
            context["provider"] = provider
            if self.scheme.audience not in provider.get("ClientIDList", []):
                raise ValueError(
                    f"audience {self.scheme.audience} not in client ids {provider.get('ClientIDList')}"
                )
            return f"{arn}, client ids {provider.get('ClientIDList')}"

        def thumbprint_ok() -> str:
            served = self._served_thumbprint()
            listed = [t.lower() for t in context["provider"].get("ThumbprintList", [])]
            if served.lower() not in listed:
                raise ValueError(f"served chain's thumbprint {served} not in provider list {listed}")
            return f"served chain thumbprint {served} is registered"

        def trust_ok() -> str:
            expected = trust_policy(
                self._provider_arn(binding),
                self.scheme.provider_url(binding),
                self.scheme.audience,
                self._subject(binding),
            )
            actual = _policy_document(context["role"].get("AssumeRolePolicyDocument"))
            if actual != expected:
                raise ValueError(f"trust policy differs from what the token satisfies: {json.dumps(actual)}")
            return f"accepts aud={self.scheme.audience}, sub={self._subject(binding)} from the provider only"

        def token_ok() -> str:
            record: GrantRecord = context["record"]
            token = self.mint_token(binding, record.kid, record.alg)
            claims = oidc.verify_jwt(
                token,
                context["jwk"],
                audience=self.scheme.audience,
                issuer=self.scheme.issuer(binding),
                now=self.clock(),
                algorithms=[record.alg],
            )
            if claims.get("sub") != self._subject(binding):
                raise ValueError(f"token sub {claims.get('sub')!r} does not match the trust policy")
            return "an HSM-signed token verifies against the published JWKS"

        steps: list[tuple[str, Callable[[], str]]] = [
            ("onboarded", registered),
            ("role", role_ok),
            ("key", key_ok),
            ("discovery", discovery_ok),
            ("jwks", jwks_ok),
            ("provider", provider_ok),
            ("thumbprint", thumbprint_ok),
            ("trust", trust_ok),
            ("token", token_ok),
        ]
        needs = {
            "role": "onboarded",
            "key": "role",
            "discovery": "role",
            "jwks": "role",
            "provider": "onboarded",
            "thumbprint": "provider",
            "trust": "role",
            "token": "jwks",
        }
        passed: set[str] = set()
        for name, probe in steps:
            prerequisite = needs.get(name)
            if prerequisite and prerequisite not in passed:
                checks.append(Check(name, False, f"not checked: {prerequisite} failed", skipped=True))
                continue
            if check(name, probe):
                passed.add(name)
        return VerifyReport(binding.staff, account, tuple(checks))
