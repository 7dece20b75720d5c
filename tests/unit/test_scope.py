"""The local scope check: calls mapped to the resource IAM authorises, judged by the template policy."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber

from hsm_keys import templates
from hsm_keys.errors import AccessDeniedError, ConfigurationError, InvalidInputError
from hsm_keys.provisioning import scope
from hsm_keys.provisioning.scope import AuthorizationRequest, ManagementScope, authorizations, check_call

ACCOUNT = "111122223333"
ARN = f"arn:aws:iam::{ACCOUNT}"
PROVIDER = f"{ARN}:oidc-provider/idp.example.com/{ACCOUNT}/alice"
STAFF_POLICY = f"{ARN}:policy/DoiT-Support-alice"
SECURITY_AUDIT = "arn:aws:iam::aws:policy/SecurityAudit"
TRUST = '{"Version": "2012-10-17", "Statement": []}'

ALLOWED_CALLS: list[tuple[str, dict[str, Any]]] = [
    (
        "CreateOpenIDConnectProvider",
        {"Url": f"https://idp.example.com/{ACCOUNT}/alice", "ThumbprintList": []},
    ),
    ("GetOpenIDConnectProvider", {"OpenIDConnectProviderArn": PROVIDER}),
    ("UpdateOpenIDConnectProviderThumbprint", {"OpenIDConnectProviderArn": PROVIDER, "ThumbprintList": []}),
    ("DeleteOpenIDConnectProvider", {"OpenIDConnectProviderArn": PROVIDER}),
    ("CreateRole", {"RoleName": "DoiT-Support-alice", "AssumeRolePolicyDocument": TRUST, "Description": "x"}),
    ("CreateRole", {"RoleName": "DoiT-Support-alice", "Path": "/", "AssumeRolePolicyDocument": TRUST}),
    ("GetRole", {"RoleName": "DoiT-Support-alice"}),
    ("UpdateRole", {"RoleName": "DoiT-Support-alice", "MaxSessionDuration": 3600}),
    ("UpdateRoleDescription", {"RoleName": "DoiT-Support-alice", "Description": "ticket 42"}),
    ("AttachRolePolicy", {"RoleName": "DoiT-Support-alice", "PolicyArn": SECURITY_AUDIT}),
    ("DetachRolePolicy", {"RoleName": "DoiT-Support-alice", "PolicyArn": SECURITY_AUDIT}),
    ("PutRolePolicy", {"RoleName": "DoiT-Support-alice", "PolicyName": "p", "PolicyDocument": TRUST}),
    ("ListAttachedRolePolicies", {"RoleName": "DoiT-Support-alice"}),
    ("ListAttachedRolePolicies", {"RoleName": "SomeoneElsesRole"}),  # list actions: any resource
    ("ListRolePolicies", {"RoleName": "DoiT-Support-alice"}),
    ("DeleteRole", {"RoleName": "DoiT-Support-alice"}),
    ("CreatePolicy", {"PolicyName": "DoiT-Support-alice", "PolicyDocument": TRUST}),
    ("CreatePolicyVersion", {"PolicyArn": STAFF_POLICY, "PolicyDocument": TRUST}),
    ("SetDefaultPolicyVersion", {"PolicyArn": STAFF_POLICY, "VersionId": "v2"}),
    ("GetPolicy", {"PolicyArn": STAFF_POLICY}),
    ("GetPolicyVersion", {"PolicyArn": STAFF_POLICY, "VersionId": "v1"}),
    ("DeletePolicyVersion", {"PolicyArn": STAFF_POLICY, "VersionId": "v1"}),
    ("DeletePolicy", {"PolicyArn": STAFF_POLICY}),
    ("ListPolicyVersions", {"PolicyArn": STAFF_POLICY}),
    ("ListEntitiesForPolicy", {"PolicyArn": SECURITY_AUDIT}),
    ("ListRoles", {"PathPrefix": "/"}),
    ("ListPolicies", {"Scope": "Local"}),
    ("ListOpenIDConnectProviders", {}),
    (
        "ListPoliciesGrantingServiceAccess",
        {"Arn": f"{ARN}:role/DoiT-Support-alice", "ServiceNamespaces": ["s3"]},
    ),
]

DENIED_CALLS: list[tuple[str, dict[str, Any]]] = [
    # Permissions the policy does not grant at all.
    ("TagRole", {"RoleName": "DoiT-Support-alice", "Tags": [{"Key": "k", "Value": "v"}]}),
    (
        "TagOpenIDConnectProvider",
        {"OpenIDConnectProviderArn": PROVIDER, "Tags": [{"Key": "k", "Value": "v"}]},
    ),
    ("AddClientIDToOpenIDConnectProvider", {"OpenIDConnectProviderArn": PROVIDER, "ClientID": "x"}),
    ("UpdateAssumeRolePolicy", {"RoleName": "DoiT-Support-alice", "PolicyDocument": TRUST}),
    ("DeleteRolePolicy", {"RoleName": "DoiT-Support-alice", "PolicyName": "p"}),
    ("ListInstanceProfilesForRole", {"RoleName": "DoiT-Support-alice"}),
    ("ListRoleTags", {"RoleName": "DoiT-Support-alice"}),
    # Granted actions, outside the resource scope.
    ("CreateRole", {"RoleName": "Other", "AssumeRolePolicyDocument": TRUST}),
    (
        "CreateRole",
        {"RoleName": "DoiT-Support-alice", "Path": "/hsm-keys/", "AssumeRolePolicyDocument": TRUST},
    ),
    ("CreateRole", {"RoleName": "doit-support-alice", "AssumeRolePolicyDocument": TRUST}),  # case-sensitive
    ("DeleteRole", {"RoleName": "DoiT_Management_Role_DO-NOT-DELETE"}),
    ("GetRole", {"RoleName": "Admin"}),
    ("AttachRolePolicy", {"RoleName": "Admin", "PolicyArn": STAFF_POLICY}),  # authorised on the role
    ("CreatePolicy", {"PolicyName": "Other", "PolicyDocument": TRUST}),
    ("CreatePolicy", {"PolicyName": "DoiT-Support-alice", "Path": "/x/", "PolicyDocument": TRUST}),
    ("GetPolicy", {"PolicyArn": SECURITY_AUDIT}),  # AWS managed policies are not ours to read
    ("DeletePolicy", {"PolicyArn": "arn:aws:iam::999988887777:policy/DoiT-Support-alice"}),  # other account
    ("CreateSAMLProvider", {"Name": "DoiT-Support", "SAMLMetadataDocument": "x" * 1000}),
    # Another account's entities, even under the list statement's "*": IAM entities have no resource policy.
    ("ListEntitiesForPolicy", {"PolicyArn": "arn:aws:iam::999988887777:policy/DoiT-Support-alice"}),
    (
        "ListPoliciesGrantingServiceAccess",
        {"Arn": "arn:aws:iam::999988887777:role/x", "ServiceNamespaces": ["s3"]},
    ),
    ("ListEntitiesForPolicy", {"PolicyArn": "arn:aws-cn:iam::aws:policy/SecurityAudit"}),  # other partition
    # Creating with tags also needs the tagging action, which the policy lacks.
    (
        "CreateRole",
        {
            "RoleName": "DoiT-Support-alice",
            "AssumeRolePolicyDocument": TRUST,
            "Tags": [{"Key": "k", "Value": "v"}],
        },
    ),
    (
        "CreateOpenIDConnectProvider",
        {"Url": "https://idp.example.com/a", "Tags": [{"Key": "k", "Value": "v"}]},
    ),
    (
        "CreatePolicy",
        {"PolicyName": "DoiT-Support-a", "PolicyDocument": TRUST, "Tags": [{"Key": "k", "Value": "v"}]},
    ),
    # Unknown to the check: refused rather than guessed.
    ("CreateUser", {"UserName": "DoiT-Support-alice"}),
]


@pytest.mark.parametrize(
    ("operation", "params"), ALLOWED_CALLS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_calls_the_policy_allows(operation: str, params: dict[str, Any]) -> None:
    requests = check_call(operation, params, account_id=ACCOUNT)
    assert requests and all(r.operation == operation for r in requests)


@pytest.mark.parametrize(("operation", "params"), DENIED_CALLS, ids=lambda v: v if isinstance(v, str) else "")
def test_calls_the_policy_denies(operation: str, params: dict[str, Any]) -> None:
    with pytest.raises(AccessDeniedError) as caught:
        check_call(operation, params, account_id=ACCOUNT)
    assert caught.value.operation == operation


def test_attach_role_policy_is_authorised_on_the_role_with_the_policy_as_context() -> None:
    (request,) = authorizations(
        "AttachRolePolicy",
        {"RoleName": "DoiT-Support-alice", "PolicyArn": SECURITY_AUDIT},
        account_id=ACCOUNT,
    )
    assert request == AuthorizationRequest(
        "AttachRolePolicy",
        "iam:AttachRolePolicy",
        f"{ARN}:role/DoiT-Support-alice",
        {"iam:PolicyARN": SECURITY_AUDIT},
    )


def test_resource_arns() -> None:
    def arn(operation: str, **params: Any) -> str:
        return scope.resource_arn(operation, params, account_id=ACCOUNT, partition="aws-cn")

    china = f"arn:aws-cn:iam::{ACCOUNT}"
    assert arn("CreateRole", RoleName="DoiT-Support-a", Path="/p/q/") == f"{china}:role/p/q/DoiT-Support-a"
    assert arn("GetRole", RoleName="DoiT-Support-a") == f"{china}:role/DoiT-Support-a"
    assert arn("CreatePolicy", PolicyName="DoiT-x") == f"{china}:policy/DoiT-x"
    assert arn("CreateOpenIDConnectProvider", Url="https://Host.example/a/b/") == (
        f"{china}:oidc-provider/Host.example/a/b"
    )
    assert arn("CreateSAMLProvider", Name="n") == f"{china}:saml-provider/n"
    assert arn("ListRoles") == "*"
    assert arn("GetPolicy", PolicyArn="arn:aws:iam::aws:policy/X") == "arn:aws:iam::aws:policy/X"


def test_create_with_tags_needs_the_tag_action_too() -> None:
    tags = [{"Key": "team", "Value": "support"}]
    requests = authorizations(
        "CreateRole",
        {"RoleName": "DoiT-Support-a", "AssumeRolePolicyDocument": TRUST, "Tags": tags},
        account_id=ACCOUNT,
    )
    assert [r.action for r in requests] == ["iam:CreateRole", "iam:TagRole"]
    assert requests[1].context == {"aws:RequestTag/team": "support", "aws:TagKeys": ("team",)}


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("GetRole", {}),
        ("GetRole", {"RoleName": ""}),
        ("GetPolicy", {"PolicyArn": 7}),
        ("AttachRolePolicy", {"RoleName": "DoiT-Support-a"}),
        ("CreateRole", {"RoleName": "DoiT-Support-a", "Path": "no-slashes"}),
    ],
)
def test_calls_without_their_resource_are_refused(operation: str, params: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        check_call(operation, params, account_id=ACCOUNT)


def test_scope_is_read_from_the_template() -> None:
    """No second copy: the check's statements are the template's, with the account filled in."""
    checked = ManagementScope.for_account(ACCOUNT)
    policy = templates.management_policy(ACCOUNT)
    assert [list(s.actions) for s in checked.statements] == [s["Action"] for s in policy["Statement"]]
    assert [list(s.resources) for s in checked.statements] == [s["Resource"] for s in policy["Statement"]]


def test_every_action_the_template_grants_is_mapped() -> None:
    granted = {a for s in ManagementScope.for_account(ACCOUNT).statements for a in s.actions}
    assert {a.removeprefix("iam:") for a in granted} <= set(scope.RESOURCE_OF)


def test_mapping_names_real_iam_operations_and_parameters() -> None:
    model = botocore.session.get_session().get_service_model("iam")
    for operation, (_kind, parameter) in scope.RESOURCE_OF.items():
        assert operation in model.operation_names, operation
        if parameter:
            members = model.operation_model(operation).input_shape.members
            assert parameter in members, (operation, parameter)
    for operation in scope.TAG_ACTION_ON_CREATE:
        assert "Tags" in model.operation_model(operation).input_shape.members


def test_wildcards_follow_iam_rules() -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iam:Get*", "Resource": f"{ARN}:role/DoiT-?x*"}],
    }
    checked = ManagementScope.from_policy(policy, account_id=ACCOUNT)

    def allowed(action: str, resource: str) -> bool:
        return checked.allows(AuthorizationRequest("Op", action, resource))

    assert allowed("iam:GetRole", f"{ARN}:role/DoiT-ax")
    assert allowed("IAM:getrole", f"{ARN}:role/DoiT-ax/deeper")  # actions ignore case; * crosses '/'
    assert not allowed("iam:GetRole", f"{ARN}:role/DoiT-x")  # ? is exactly one character
    assert not allowed("iam:GetRole", f"{ARN}:role/doit-ax")  # resources keep case
    assert not allowed("iam:ListRoles", f"{ARN}:role/DoiT-ax")
    assert not allowed("iam:GetRole", f"{ARN}:role/DoiT-ax".replace("iam", "iamx"))


@pytest.mark.parametrize(
    "statement",
    [
        {"Effect": "Deny", "Action": "iam:*", "Resource": "*"},
        {"Effect": "Allow", "NotAction": "iam:TagRole", "Resource": "*"},
        {"Effect": "Allow", "Action": "iam:*", "NotResource": "*"},
        {
            "Effect": "Allow",
            "Action": "iam:*",
            "Resource": "*",
            "Condition": {"Bool": {"aws:MultiFactorAuthPresent": "true"}},
        },
        {"Effect": "Allow", "Action": [], "Resource": "*"},
        "not a statement",
    ],
)
def test_policies_the_check_cannot_judge_exactly_are_refused(statement: Any) -> None:
    with pytest.raises(ConfigurationError):
        ManagementScope.from_policy({"Statement": [statement]}, account_id=ACCOUNT)


def _iam_client() -> Any:
    return boto3.Session(
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
        aws_secret_access_key="not-a-secret",
        region_name="us-east-1",
    ).client("iam")


def test_installed_check_stops_out_of_scope_calls_before_sending() -> None:
    iam = _iam_client()
    ManagementScope.for_account(ACCOUNT).install(iam)
    with Stubber(iam) as stub:
        stub.add_response(
            "get_role", {"Role": _role("DoiT-Support-alice")}, {"RoleName": "DoiT-Support-alice"}
        )
        assert iam.get_role(RoleName="DoiT-Support-alice")["Role"]["RoleName"] == "DoiT-Support-alice"
        with pytest.raises(AccessDeniedError) as caught:
            iam.tag_role(RoleName="DoiT-Support-alice", Tags=[{"Key": "k", "Value": "v"}])
        assert caught.value.code == "OutsideManagementScope"
        with pytest.raises(AccessDeniedError):
            iam.create_role(RoleName="Other", AssumeRolePolicyDocument=TRUST)
        stub.assert_no_pending_responses()


def test_installing_twice_checks_once_and_other_services_are_refused() -> None:
    iam = _iam_client()
    checked = ManagementScope.for_account(ACCOUNT)
    checked.install(iam)
    checked.install(iam)
    with Stubber(iam) as stub:
        stub.add_response("list_roles", {"Roles": []}, {})
        iam.list_roles()
    sts = boto3.Session(
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
        aws_secret_access_key="not-a-secret",
        region_name="us-east-1",
    ).client("sts")
    with pytest.raises(ConfigurationError):
        checked.install(sts)


def _role(name: str) -> dict[str, Any]:
    import datetime as dt

    return {
        "Path": "/",
        "RoleName": name,
        "RoleId": "AROAEXAMPLEEXAMPLE000",
        "Arn": f"{ARN}:role/{name}",
        "CreateDate": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    }


def test_provisioning_package_exports_lazily() -> None:
    from hsm_keys import provisioning

    assert sorted(provisioning.__all__) == sorted(provisioning._WHERE)
    for name in provisioning.__all__:
        if provisioning._WHERE[name] != "grants":  # the access layer is tested with its own module
            assert getattr(provisioning, name).__name__ == name
    with pytest.raises(AttributeError):
        provisioning.NoSuchThing  # noqa: B018
