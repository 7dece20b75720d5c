"""The shipped template: faithful to the published text, cfn-lint clean, read as CloudFormation reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cfnlint.api import lint_all

from hsm_keys import templates
from hsm_keys.errors import ConfigurationError, InvalidBindingError

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT.parent / "shared" / "reference" / "support-access-doc.txt"

LIST_ACTIONS = [
    "iam:ListAttachedRolePolicies",
    "iam:ListEntitiesForPolicy",
    "iam:ListOpenIDConnectProviders",
    "iam:ListPolicies",
    "iam:ListPoliciesGrantingServiceAccess",
    "iam:ListPolicyVersions",
    "iam:ListRolePolicies",
    "iam:ListRoles",
]
WRITE_ACTIONS = [
    "iam:AttachRolePolicy",
    "iam:CreateOpenIDConnectProvider",
    "iam:CreatePolicy",
    "iam:CreatePolicyVersion",
    "iam:CreateRole",
    "iam:CreateSAMLProvider",
    "iam:DeleteOpenIDConnectProvider",
    "iam:DeletePolicy",
    "iam:DeletePolicyVersion",
    "iam:DeleteRole",
    "iam:DetachRolePolicy",
    "iam:GetOpenIDConnectProvider",
    "iam:GetPolicy",
    "iam:GetPolicyVersion",
    "iam:GetRole",
    "iam:PutRolePolicy",
    "iam:SetDefaultPolicyVersion",
    "iam:UpdateOpenIDConnectProviderThumbprint",
    "iam:UpdateRole",
    "iam:UpdateRoleDescription",
]


def _lint_findings(text: str) -> list[str]:
    """Errors and warnings only; cfn-lint's informational suggestions are not findings."""
    return [str(match) for match in lint_all(text) if match.rule.id[0] in "EW"]


def test_template_is_cfn_lint_clean() -> None:
    assert _lint_findings(templates.template_text()) == []


def test_cfn_lint_does_catch_a_broken_template() -> None:
    broken = templates.template_text().replace("'iam:ListRoles'", "'iam:ListRolez'")
    assert any("listrolez" in finding for finding in _lint_findings(broken))


def test_parameters_and_descriptions() -> None:
    document = templates.load_template()
    assert document["AWSTemplateFormatVersion"] == "2010-09-09"
    assert document["Description"] == (
        "This template deploys the IAM Policies and Roles needed for AWS Ops. It takes a parameter to "
        "define if we need the payer roles as well.\n"
    )
    assert document["Parameters"] == {
        "AccountNumberParameter": {"Type": "String", "Description": "Account number AWS Ops runs in"},
        "ServiceToken": {"Type": "String", "Description": "Service Token to notify on execution"},
    }


def test_management_role_and_trust() -> None:
    role = templates.load_template()["Resources"]["AssumeableRole"]
    assert role["Type"] == "AWS::IAM::Role"
    assert role["Properties"] == {
        "RoleName": "DoiT_Management_Role_DO-NOT-DELETE",
        "AssumeRolePolicyDocument": {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": [{"Ref": "AccountNumberParameter"}]},
                    "Action": ["sts:AssumeRole"],
                }
            ],
        },
    }
    assert templates.management_role_name() == "DoiT_Management_Role_DO-NOT-DELETE"


def test_customer_policy_has_both_statements_exactly() -> None:
    policy = templates.load_template()["Resources"]["CustomerPolicy"]
    assert policy["Type"] == "AWS::IAM::Policy"
    properties = policy["Properties"]
    assert properties["PolicyName"] == "DoiT_Customer_Policy_DO-NOT-DELETE"
    assert properties["Roles"] == [{"Ref": "AssumeableRole"}]
    document = properties["PolicyDocument"]
    assert document["Version"] == "2012-10-17"  # a string, as CloudFormation reads it, not a date
    assert document["Statement"] == [
        {"Effect": "Allow", "Action": LIST_ACTIONS, "Resource": ["*"]},
        {
            "Effect": "Allow",
            "Action": WRITE_ACTIONS,
            "Resource": [
                {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:oidc-provider/*"},
                {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:policy/DoiT-*"},
                {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/DoiT-Support*"},
            ],
        },
    ]


def test_hook_and_outputs() -> None:
    document = templates.load_template()
    hook = document["Resources"][templates.HOOK_LOGICAL_ID]
    assert hook == {
        "Type": "Custom::Hook",
        "Version": "1.0",  # a resource attribute next to Type, not a property CloudFormation sends
        "Properties": {
            "ServiceToken": {"Ref": "ServiceToken"},
            "RoleArn": {"Fn::GetAtt": ["AssumeableRole", "Arn"]},
            "AccountId": {"Ref": "AWS::AccountId"},
        },
        "DependsOn": ["CustomerPolicy"],
    }
    assert document["Outputs"] == {
        "ManagementRoleName": {"Value": {"Ref": "AssumeableRole"}},
        "ManagementRoleArn": {"Value": {"Fn::GetAtt": ["AssumeableRole", "Arn"]}},
    }
    assert set(document["Resources"]) == {"AssumeableRole", "CustomerPolicy", "NotifyHook"}


def test_the_hook_version_is_the_one_the_handler_supports() -> None:
    from hsm_keys.provisioning.onboarding import SUPPORTED_VERSIONS

    hook = templates.load_template()["Resources"][templates.HOOK_LOGICAL_ID]
    assert "Version" not in hook["Properties"]
    assert hook["Version"] == templates.HOOK_VERSION and templates.HOOK_VERSION in SUPPORTED_VERSIONS


@pytest.mark.skipif(not PUBLISHED.exists(), reason=f"published document not found at {PUBLISHED}")
def test_every_published_line_appears_in_order() -> None:
    """The published copy lost its keys but kept its lines: each must be in the template, in order."""
    text = PUBLISHED.read_text(encoding="utf-8")
    start = text.index("AWSTemplateFormatVersion")
    end = text.index("Value: !GetAtt AssumeableRole.Arn") + len("Value: !GetAtt AssumeableRole.Arn")
    published = [line.strip() for line in text[start:end].splitlines() if line.strip()]
    ours = [line.strip() for line in templates.template_text().splitlines() if line.strip()]
    position = 0
    for line in published:
        try:
            position = ours.index(line, position) + 1
        except ValueError:
            pytest.fail(f"published line {line!r} is missing (or out of order) in the template")


def test_loaded_template_is_a_fresh_copy() -> None:
    first = templates.load_template()
    first["Resources"].clear()
    assert templates.load_template()["Resources"]


def test_template_json_without_the_hook() -> None:
    document = json.loads(templates.template_json(exclude_types={"Custom::Hook"}))
    assert set(document["Resources"]) == {"AssumeableRole", "CustomerPolicy"}
    assert document["Outputs"] == templates.load_template()["Outputs"]
    full = json.loads(templates.template_json())
    assert full == templates.load_template()


def test_management_policy_substitutes_partition_and_account() -> None:
    policy = templates.management_policy("111122223333")
    assert policy["Statement"][1]["Resource"] == [
        "arn:aws:iam::111122223333:oidc-provider/*",
        "arn:aws:iam::111122223333:policy/DoiT-*",
        "arn:aws:iam::111122223333:role/DoiT-Support*",
    ]
    assert policy["Statement"][0]["Resource"] == ["*"]
    china = templates.management_policy("012345678901", partition="aws-cn")
    assert china["Statement"][1]["Resource"][2] == "arn:aws-cn:iam::012345678901:role/DoiT-Support*"
    assert json.dumps(policy)  # plain JSON, nothing left unresolved


@pytest.mark.parametrize("account", ["12345678901", "1234567890123", "abcdefghijkl", 111122223333])
def test_management_policy_rejects_bad_accounts(account: object) -> None:
    with pytest.raises(InvalidBindingError):
        templates.management_policy(account)  # type: ignore[arg-type]


def test_management_policy_rejects_unknown_partition() -> None:
    with pytest.raises(ConfigurationError):
        templates.management_policy("111122223333", partition="aws-mars")
