"""The real IAM policy evaluator: it can deny, it agrees with the local scope check, and it passes the
calls a grant-like sequence makes through the management role of a deployed stack.
"""

from __future__ import annotations

from typing import Any

import pytest

from hsm_keys import templates
from hsm_keys.errors import AccessDeniedError
from hsm_keys.provisioning.recorder import CallRecorder
from hsm_keys.provisioning.scope import RESOURCE_OF, AuthorizationRequest, ManagementScope, authorizations

pytestmark = pytest.mark.node

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "999988887777"
SECURITY_AUDIT = "arn:aws:iam::aws:policy/SecurityAudit"
TRUST = '{"Version": "2012-10-17", "Statement": []}'
TAGS = [{"Key": "team", "Value": "support"}]


def request(action: str, resource: str, **context: Any) -> AuthorizationRequest:
    return AuthorizationRequest(action.removeprefix("iam:"), action, resource, context)


def test_known_denied_requests_are_denied(policy_evaluator: Any) -> None:
    """The evaluator must be able to say no, or a green policy test would mean nothing."""
    arn = f"arn:aws:iam::{ACCOUNT}"
    denied = [
        request("iam:TagRole", f"{arn}:role/DoiT-Support-alice"),
        request("iam:CreateRole", f"{arn}:role/Other"),
        request("iam:UpdateAssumeRolePolicy", f"{arn}:role/DoiT-Support-alice"),
        request("iam:DeleteRolePolicy", f"{arn}:role/DoiT-Support-alice"),
        request("iam:ListInstanceProfilesForRole", f"{arn}:role/DoiT-Support-alice"),
        request("iam:TagOpenIDConnectProvider", f"{arn}:oidc-provider/idp.example.com/a"),
        request("iam:AddClientIDToOpenIDConnectProvider", f"{arn}:oidc-provider/idp.example.com/a"),
        request("iam:DeleteRole", f"{arn}:role/{templates.management_role_name()}"),
        request("iam:CreateRole", f"arn:aws:iam::{OTHER_ACCOUNT}:role/DoiT-Support-alice"),
    ]
    decisions = policy_evaluator.evaluate(denied, account_id=ACCOUNT)
    assert [d.decision for d in decisions] == ["ImplicitlyDenied"] * len(denied), [str(d) for d in decisions]
    allowed = policy_evaluator.evaluate(
        [request("iam:CreateRole", f"{arn}:role/DoiT-Support-alice")], account_id=ACCOUNT
    )
    assert [d.decision for d in allowed] == ["Allowed"]


def test_explicit_denies_and_conditions_are_evaluated(policy_evaluator: Any) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iam:AttachRolePolicy",
                "Resource": f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support*",
                "Condition": {"ArnEquals": {"iam:PolicyARN": SECURITY_AUDIT}},
            },
            {
                "Effect": "Deny",
                "Action": "iam:AttachRolePolicy",
                "Resource": f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-mallory",
            },
        ],
    }
    role = f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-alice"
    decisions = policy_evaluator.evaluate(
        [
            request("iam:AttachRolePolicy", role, **{"iam:PolicyARN": SECURITY_AUDIT}),
            request(
                "iam:AttachRolePolicy",
                role,
                **{"iam:PolicyARN": "arn:aws:iam::aws:policy/AdministratorAccess"},
            ),
            request(
                "iam:AttachRolePolicy", role.replace("alice", "mallory"), **{"iam:PolicyARN": SECURITY_AUDIT}
            ),
        ],
        account_id=ACCOUNT,
        policy=policy,
    )
    assert [d.decision for d in decisions] == ["Allowed", "ImplicitlyDenied", "ExplicitlyDenied"]


def _sample_params(operation: str, *, ours: bool) -> dict[str, Any]:
    """Parameters naming a resource inside (``ours``) or outside the management scope."""
    kind, parameter = RESOURCE_OF[operation]
    name = "DoiT-Support-alice" if ours else "Admin"
    account = ACCOUNT if ours else OTHER_ACCOUNT
    params: dict[str, Any]
    if kind == "role":
        params = {"RoleName": name}
    elif kind == "policy":
        params = {"PolicyName": name}
    elif kind == "oidc-url":
        params = {"Url": f"https://idp.example.com/{ACCOUNT}/alice"}
    elif kind == "saml":
        params = {"Name": name}
    elif kind == "*":
        params = {}
    elif parameter == "PolicyArn":
        params = {parameter: f"arn:aws:iam::{account}:policy/{name}"}
    elif parameter == "OpenIDConnectProviderArn":
        params = {parameter: f"arn:aws:iam::{account}:oidc-provider/idp.example.com/{ACCOUNT}/alice"}
    else:
        params = {parameter: f"arn:aws:iam::{account}:role/{name}"}
    if operation in ("AttachRolePolicy", "DetachRolePolicy"):
        params["PolicyArn"] = SECURITY_AUDIT
    if operation.startswith("Tag"):
        params["Tags"] = TAGS
    if operation.startswith("Untag"):
        params["TagKeys"] = ["team"]
    return params


def test_local_scope_check_agrees_with_the_evaluator_on_every_mapped_operation(policy_evaluator: Any) -> None:
    """Every row of the scope mapping, in and out of scope: same verdict, and a resource type IAM knows."""
    scope = ManagementScope.for_account(ACCOUNT)
    requests = [
        auth
        for operation in sorted(RESOURCE_OF)
        for ours in (True, False)
        for auth in authorizations(operation, _sample_params(operation, ours=ours), account_id=ACCOUNT)
    ]
    requests += list(
        authorizations("CreateRole", {"RoleName": "DoiT-Support-a", "Tags": TAGS}, account_id=ACCOUNT)
    )
    decisions = policy_evaluator.evaluate(requests, account_id=ACCOUNT)
    errors = [str(d) for d in decisions if d.decision == "Error"]
    assert errors == []
    disagreements = [
        f"{d} (local check: {'allowed' if scope.allows(d.request) else 'denied'})"
        for d in decisions
        if d.allowed != scope.allows(d.request)
    ]
    assert disagreements == []
    assert any(d.allowed for d in decisions) and any(not d.allowed for d in decisions)


def test_grant_like_calls_through_the_management_role_are_all_allowed(
    policy_evaluator: Any,
    deployed_stack: Any,
    moto_client: Any,
    assume_role: Any,
    call_recorder: CallRecorder,
) -> None:
    account = deployed_stack.account_id
    # What the stack really deployed is the policy the template describes.
    admin_iam = moto_client("iam", deployed_stack.admin_credentials)
    deployed = admin_iam.get_role_policy(
        RoleName=deployed_stack.role_name, PolicyName="DoiT_Customer_Policy_DO-NOT-DELETE"
    )["PolicyDocument"]
    assert deployed == templates.management_policy(account)

    iam = moto_client("iam", assume_role(deployed_stack.role_arn))
    ManagementScope.for_account(account).install(iam)
    call_recorder.attach(iam, account_id=account)

    url = f"https://idp.example.com/{account}/alice"
    provider = iam.create_open_id_connect_provider(
        Url=url, ClientIDList=["sts.amazonaws.com"], ThumbprintList=["a" * 40]
    )["OpenIDConnectProviderArn"]
    iam.get_open_id_connect_provider(OpenIDConnectProviderArn=provider)
    iam.update_open_id_connect_provider_thumbprint(
        OpenIDConnectProviderArn=provider, ThumbprintList=["b" * 40]
    )
    iam.create_role(
        RoleName="DoiT-Support-alice", AssumeRolePolicyDocument=TRUST, Description="hsm-keys ticket=1"
    )
    iam.attach_role_policy(RoleName="DoiT-Support-alice", PolicyArn=SECURITY_AUDIT)
    policy_arn = iam.create_policy(
        PolicyName="DoiT-Support-alice",
        PolicyDocument=TRUST.replace(
            "[]", '[{"Effect": "Allow", "Action": "support:Describe*", "Resource": "*"}]'
        ),
    )["Policy"]["Arn"]
    iam.attach_role_policy(RoleName="DoiT-Support-alice", PolicyArn=policy_arn)
    iam.update_role_description(RoleName="DoiT-Support-alice", Description="hsm-keys ticket=2")
    iam.get_role(RoleName="DoiT-Support-alice")
    iam.list_attached_role_policies(RoleName="DoiT-Support-alice")
    iam.list_role_policies(RoleName="DoiT-Support-alice")
    iam.list_roles(PathPrefix="/")
    iam.list_open_id_connect_providers()
    iam.list_policy_versions(PolicyArn=policy_arn)
    with pytest.raises(AccessDeniedError):
        iam.tag_role(RoleName="DoiT-Support-alice", Tags=TAGS)  # refused locally, never sent
    iam.detach_role_policy(RoleName="DoiT-Support-alice", PolicyArn=SECURITY_AUDIT)
    iam.detach_role_policy(RoleName="DoiT-Support-alice", PolicyArn=policy_arn)
    iam.delete_role(RoleName="DoiT-Support-alice")
    iam.delete_policy(PolicyArn=policy_arn)
    iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=provider)

    assert len(call_recorder.calls) == 19
    assert "TagRole" not in {c.operation for c in call_recorder.calls}
    decisions = policy_evaluator.evaluate_recorded(call_recorder)
    assert len(decisions) == 19
    policy_evaluator.assert_all_allowed(decisions)
    # The same requests evaluated against what moto really deployed.
    against_deployed = policy_evaluator.evaluate(
        [d.request for d in decisions], account_id=account, policy=deployed
    )
    policy_evaluator.assert_all_allowed(against_deployed)


def test_assert_all_allowed_names_each_refusal(policy_evaluator: Any) -> None:
    decisions = policy_evaluator.evaluate(
        [request("iam:TagRole", f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-alice")], account_id=ACCOUNT
    )
    with pytest.raises(
        AssertionError,
        match="ImplicitlyDenied: iam:TagRole on arn:aws:iam::111122223333:role/DoiT-Support-alice",
    ):
        policy_evaluator.assert_all_allowed(decisions)
