"""Local check of every IAM call against the management policy customers have deployed.

AWS decides in the end, but a call outside the policy must never be sent: in a customer's
account it would fail halfway through a grant (and moto, which does not enforce policies, would let
it pass in tests). So each call is mapped to the IAM authorisations it needs -- the action, the
resource ARN that action is authorised on (for ``AttachRolePolicy`` the role, not the policy), and the
condition context -- and each is matched against the template's policy, read from the template
itself (:func:`hsm_keys.templates.management_policy`), never from a copy.

The mapping is data (:data:`RESOURCE_OF`): one row per IAM operation, naming how to find the
resource in the call's parameters. Operations that are not in the table are refused: the check
fails closed. The same mapping feeds the policy tests, which evaluate recorded calls with a real IAM
policy evaluator.

Name-based operations (``GetRole(RoleName=...)``) are mapped to the ARN of a role with the default
path ``/``: the library creates every role and policy at path ``/``, and a ``Path`` on create is part
of the ARN, so a role at ``/other/`` falls outside ``role/DoiT-Support*`` here just as it would in IAM.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hsm_keys import templates
from hsm_keys.errors import AccessDeniedError, ConfigurationError, InvalidInputError

if TYPE_CHECKING:
    from botocore.client import BaseClient

ContextValue = str | tuple[str, ...]

#: How to find the resource an IAM operation is authorised on. Kinds:
#: ``*`` (no resource: list operations), ``role`` (RoleName [+ Path]), ``policy`` (PolicyName [+ Path]),
#: ``oidc-url`` (the provider's Url), ``saml`` (Name), ``arn`` (an ARN parameter, used as given).
RESOURCE_OF: Mapping[str, tuple[str, str]] = {
    # Roles, by name.
    "AttachRolePolicy": ("role", "RoleName"),
    "CreateRole": ("role", "RoleName"),
    "DeleteRole": ("role", "RoleName"),
    "DeleteRolePermissionsBoundary": ("role", "RoleName"),
    "DeleteRolePolicy": ("role", "RoleName"),
    "DetachRolePolicy": ("role", "RoleName"),
    "GetRole": ("role", "RoleName"),
    "GetRolePolicy": ("role", "RoleName"),
    "ListAttachedRolePolicies": ("role", "RoleName"),
    "ListInstanceProfilesForRole": ("role", "RoleName"),
    "ListRolePolicies": ("role", "RoleName"),
    "ListRoleTags": ("role", "RoleName"),
    "PutRolePermissionsBoundary": ("role", "RoleName"),
    "PutRolePolicy": ("role", "RoleName"),
    "TagRole": ("role", "RoleName"),
    "UntagRole": ("role", "RoleName"),
    "UpdateAssumeRolePolicy": ("role", "RoleName"),
    "UpdateRole": ("role", "RoleName"),
    "UpdateRoleDescription": ("role", "RoleName"),
    # Customer-managed policies.
    "CreatePolicy": ("policy", "PolicyName"),
    "CreatePolicyVersion": ("arn", "PolicyArn"),
    "DeletePolicy": ("arn", "PolicyArn"),
    "DeletePolicyVersion": ("arn", "PolicyArn"),
    "GetPolicy": ("arn", "PolicyArn"),
    "GetPolicyVersion": ("arn", "PolicyArn"),
    "ListEntitiesForPolicy": ("arn", "PolicyArn"),
    "ListPolicyTags": ("arn", "PolicyArn"),
    "ListPolicyVersions": ("arn", "PolicyArn"),
    "SetDefaultPolicyVersion": ("arn", "PolicyArn"),
    "TagPolicy": ("arn", "PolicyArn"),
    "UntagPolicy": ("arn", "PolicyArn"),
    # OIDC identity providers.
    "AddClientIDToOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "CreateOpenIDConnectProvider": ("oidc-url", "Url"),
    "DeleteOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "GetOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "ListOpenIDConnectProviderTags": ("arn", "OpenIDConnectProviderArn"),
    "RemoveClientIDFromOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "TagOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "UntagOpenIDConnectProvider": ("arn", "OpenIDConnectProviderArn"),
    "UpdateOpenIDConnectProviderThumbprint": ("arn", "OpenIDConnectProviderArn"),
    # SAML providers (the policy grants CreateSAMLProvider; no resource it lists can match one).
    "CreateSAMLProvider": ("saml", "Name"),
    # Account-wide listings.
    "ListOpenIDConnectProviders": ("*", ""),
    "ListPolicies": ("*", ""),
    "ListRoles": ("*", ""),
    "ListSAMLProviders": ("*", ""),
    "ListPoliciesGrantingServiceAccess": ("arn", "Arn"),
}

#: Creating an entity with ``Tags`` also needs the tagging action on it (IAM checks both).
TAG_ACTION_ON_CREATE: Mapping[str, str] = {
    "CreateRole": "iam:TagRole",
    "CreatePolicy": "iam:TagPolicy",
    "CreateOpenIDConnectProvider": "iam:TagOpenIDConnectProvider",
    "CreateSAMLProvider": "iam:TagSAMLProvider",
}

_POLICY_ARN_CONTEXT = frozenset({"AttachRolePolicy", "DetachRolePolicy"})
_BOUNDARY_CONTEXT = frozenset({"CreateRole", "PutRolePermissionsBoundary"})
_TAGGING = frozenset({"TagRole", "TagPolicy", "TagOpenIDConnectProvider"})
_UNTAGGING = frozenset({"UntagRole", "UntagPolicy", "UntagOpenIDConnectProvider"})


@dataclass(frozen=True)
class AuthorizationRequest:
    """One authorisation IAM performs for a call: ``action`` on ``resource`` with ``context``."""

    operation: str
    action: str
    resource: str
    context: Mapping[str, ContextValue] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return f"{self.action} on {self.resource} (for {self.operation})"


def _required(operation: str, params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{operation} needs the {name} parameter to name its resource")
    return value


def _path(params: Mapping[str, Any]) -> str:
    path = params.get("Path", "/")
    if not isinstance(path, str) or not path.startswith("/") or not path.endswith("/"):
        raise InvalidInputError(f"IAM path must start and end with '/', got {path!r}")
    return path


def resource_arn(
    operation: str, params: Mapping[str, Any], *, account_id: str, partition: str = "aws"
) -> str:
    """The ARN ``operation`` is authorised on (``*`` for account-wide listings)."""
    try:
        kind, name = RESOURCE_OF[operation]
    except KeyError:
        raise AccessDeniedError(
            f"iam:{operation} is not an operation the local scope check knows; refusing to send it",
            operation=operation,
            code="UnknownOperation",
        ) from None
    prefix = f"arn:{partition}:iam::{account_id}:"
    if kind == "*":
        return "*"
    value = _required(operation, params, name)
    if kind == "role":
        path = _path(params) if operation == "CreateRole" else "/"
        return f"{prefix}role{path}{value}"
    if kind == "policy":
        return f"{prefix}policy{_path(params)}{value}"
    if kind == "oidc-url":
        # IAM names a provider by its URL without the scheme (and without a trailing slash).
        bare = re.sub(r"^https://", "", value, flags=re.IGNORECASE).rstrip("/")
        return f"{prefix}oidc-provider/{bare}"
    if kind == "saml":
        return f"{prefix}saml-provider/{value}"
    return value


def _tag_context(tags: Any) -> dict[str, ContextValue]:
    context: dict[str, ContextValue] = {}
    keys: list[str] = []
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, Mapping) and isinstance(tag.get("Key"), str):
            keys.append(tag["Key"])
            context[f"aws:RequestTag/{tag['Key']}"] = str(tag.get("Value", ""))
    context["aws:TagKeys"] = tuple(keys)
    return context


def authorizations(
    operation: str, params: Mapping[str, Any], *, account_id: str, partition: str = "aws"
) -> tuple[AuthorizationRequest, ...]:
    """Every authorisation IAM checks for one call, in the order IAM would need them."""
    resource = resource_arn(operation, params, account_id=account_id, partition=partition)
    tag_action = TAG_ACTION_ON_CREATE.get(operation) if params.get("Tags") else None
    context: dict[str, ContextValue] = {}
    if operation in _POLICY_ARN_CONTEXT:
        context["iam:PolicyARN"] = _required(operation, params, "PolicyArn")
    if operation in _BOUNDARY_CONTEXT and params.get("PermissionsBoundary"):
        context["iam:PermissionsBoundary"] = str(params["PermissionsBoundary"])
    if operation in _TAGGING or tag_action:
        context.update(_tag_context(params.get("Tags")))
    if operation in _UNTAGGING:
        keys = params.get("TagKeys")
        context["aws:TagKeys"] = tuple(str(k) for k in keys) if isinstance(keys, list) else ()
    requests = [AuthorizationRequest(operation, f"iam:{operation}", resource, context)]
    if tag_action:
        requests.append(AuthorizationRequest(operation, tag_action, resource, context))
    return tuple(requests)


@functools.lru_cache(maxsize=1024)
def _pattern(glob: str, *, ignore_case: bool) -> re.Pattern[str]:
    """IAM wildcards: ``*`` is any run of characters (``/`` included), ``?`` exactly one."""
    body = "".join({"*": ".*", "?": "."}.get(ch, re.escape(ch)) for ch in glob)
    return re.compile(body, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


@dataclass(frozen=True)
class ScopeStatement:
    """One Allow statement: actions (case-insensitive globs) on resources (case-sensitive globs)."""

    actions: tuple[str, ...]
    resources: tuple[str, ...]

    def matches(self, request: AuthorizationRequest) -> bool:
        return any(_pattern(a, ignore_case=True).fullmatch(request.action) for a in self.actions) and any(
            _pattern(r, ignore_case=False).fullmatch(request.resource) for r in self.resources
        )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ConfigurationError(f"{where} must be a string or a non-empty list of strings")
    return tuple(items)


@dataclass(frozen=True)
class ManagementScope:
    """What the management role may do in one account, as the local check understands it."""

    account_id: str
    partition: str
    statements: tuple[ScopeStatement, ...]

    @classmethod
    def from_policy(
        cls, document: Mapping[str, Any], *, account_id: str, partition: str = "aws"
    ) -> ManagementScope:
        """Read an Allow-only policy; anything the check cannot judge exactly is refused here.

        Deny, NotAction, NotResource and Condition would change the meaning of a plain match, so a
        policy that uses them is a configuration error rather than something to approximate.
        """
        raw = document.get("Statement")
        raw_statements = [raw] if isinstance(raw, Mapping) else raw
        if not isinstance(raw_statements, list) or not raw_statements:
            raise ConfigurationError("the management policy has no statements")
        statements = []
        for index, statement in enumerate(raw_statements):
            where = f"management policy statement {index}"
            if not isinstance(statement, Mapping):
                raise ConfigurationError(f"{where} is not a mapping")
            unsupported = sorted(set(statement) - {"Sid", "Effect", "Action", "Resource"})
            if unsupported or statement.get("Effect") != "Allow":
                raise ConfigurationError(
                    f"{where} uses {unsupported or 'Effect ' + str(statement.get('Effect'))}; "
                    "the local scope check only judges Allow statements with Action and Resource"
                )
            statements.append(
                ScopeStatement(
                    actions=_strings(statement.get("Action"), f"{where} Action"),
                    resources=_strings(statement.get("Resource"), f"{where} Resource"),
                )
            )
        return cls(account_id=account_id, partition=partition, statements=tuple(statements))

    @classmethod
    def for_account(cls, account_id: str, partition: str = "aws") -> ManagementScope:
        """The scope the shipped template grants in ``account_id``."""
        return _scope_for(account_id, partition)

    def allows(self, request: AuthorizationRequest) -> bool:
        """Whether an Allow statement matches; a resource in another account never does.

        IAM entities have no resource policies, so a request on another account's role or policy is
        denied whatever the caller's own policy says (even ``Resource: "*"``). AWS managed policies
        (account field ``aws``) are readable from every account.
        """
        if self._foreign(request.resource):
            return False
        return any(statement.matches(request) for statement in self.statements)

    def _foreign(self, resource: str) -> bool:
        if resource == "*":
            return False
        parts = resource.split(":", 5)
        if len(parts) < 6 or parts[0] != "arn" or parts[1] != self.partition:
            return True
        return parts[4] not in (self.account_id, "aws")

    def check(self, request: AuthorizationRequest) -> None:
        """Raise :class:`AccessDeniedError` unless the policy allows ``request``."""
        if not self.allows(request):
            raise AccessDeniedError(
                f"{request.action} on {request.resource} is outside the management policy of account "
                f"{self.account_id}; not sent",
                operation=request.operation,
                code="OutsideManagementScope",
            )

    def check_call(self, operation: str, params: Mapping[str, Any]) -> tuple[AuthorizationRequest, ...]:
        """Check every authorisation one IAM call needs; return them when all are allowed."""
        requests = authorizations(operation, params, account_id=self.account_id, partition=self.partition)
        for request in requests:
            self.check(request)
        return requests

    def denied(self, requests: Iterable[AuthorizationRequest]) -> list[AuthorizationRequest]:
        return [request for request in requests if not self.allows(request)]

    def install(self, client: BaseClient) -> None:
        """Check every call ``client`` makes before botocore even validates it.

        Meant for the IAM client acting through the management role: an out-of-scope call raises
        :class:`AccessDeniedError` from the client method, and nothing is sent.
        """
        if client.meta.service_model.service_name != "iam":
            raise ConfigurationError(
                f"the management scope covers IAM only, not {client.meta.service_model.service_name}"
            )
        handler: Callable[..., None] = functools.partial(_guard, self)
        # provide-client-params is the first hook of a call, ahead of botocore's own parameter hooks
        # and of a test Stubber's, so nothing else sees a call the check refuses.
        client.meta.events.register(
            "provide-client-params.iam", handler, unique_id=f"hsm-keys-scope-{self.account_id}"
        )


def _guard(scope: ManagementScope, params: Mapping[str, Any], model: Any, **_: Any) -> None:
    scope.check_call(str(model.name), params)


@functools.lru_cache(maxsize=256)
def _scope_for(account_id: str, partition: str) -> ManagementScope:
    document = templates.management_policy(account_id, partition)
    return ManagementScope.from_policy(document, account_id=account_id, partition=partition)


def check_call(
    operation: str, params: Mapping[str, Any], *, account_id: str, partition: str = "aws"
) -> tuple[AuthorizationRequest, ...]:
    """Check one IAM call against the shipped template's policy in ``account_id``; raise if denied."""
    return ManagementScope.for_account(account_id, partition).check_call(operation, params)


__all__ = [
    "RESOURCE_OF",
    "TAG_ACTION_ON_CREATE",
    "AuthorizationRequest",
    "ContextValue",
    "ManagementScope",
    "ScopeStatement",
    "authorizations",
    "check_call",
    "resource_arn",
]
