"""The customer's CloudFormation template, shipped as package data, and the facts derived from it.

The template is the single source of what the library may do in a customer's account: the local
scope check and the policy tests read the management policy from here instead of keeping a copy.

CloudFormation's short-form tags (``!Ref``, ``!Sub``, ``!GetAtt``, ...) are read into their long
JSON form, and YAML 1.1 timestamps stay strings (``Version: 2012-10-17`` is a string to
CloudFormation, not a date), so the loaded document is exactly what CloudFormation would see.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Collection, Mapping
from importlib import resources
from typing import Any

import yaml  # type: ignore[import-untyped, unused-ignore]

from hsm_keys.errors import ConfigurationError, InvalidBindingError

TEMPLATE_NAME = "support-access.yaml"

#: Logical ids and names the template fixes; the onboarding handler and the grants rely on them.
MANAGEMENT_ROLE_LOGICAL_ID = "AssumeableRole"
MANAGEMENT_POLICY_LOGICAL_ID = "CustomerPolicy"
HOOK_LOGICAL_ID = "NotifyHook"
HOOK_RESOURCE_TYPE = "Custom::Hook"
HOOK_VERSION = "1.0"

PARTITIONS = frozenset({"aws", "aws-cn", "aws-us-gov"})
_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_SUB_RE = re.compile(r"\$\{([^}!]+)\}")


class _CfnLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """SafeLoader that knows CloudFormation's short-form intrinsic functions."""


# CloudFormation reads unquoted dates as strings; so must we, or policy versions become dates.
_CfnLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_INTRINSICS = (
    "Base64",
    "Cidr",
    "FindInMap",
    "GetAZs",
    "ImportValue",
    "Join",
    "Select",
    "Split",
    "Sub",
    "Transform",
    "And",
    "Equals",
    "If",
    "Not",
    "Or",
)


def _construct(loader: Any, node: Any, name: str) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if name == "Ref":
        return {"Ref": value}
    if name == "GetAtt":
        return {"Fn::GetAtt": value.split(".", 1) if isinstance(value, str) else value}
    if name == "Condition":
        return {"Condition": value}
    return {f"Fn::{name}": value}


for _name in (*_INTRINSICS, "Ref", "GetAtt", "Condition"):
    _CfnLoader.add_constructor(f"!{_name}", functools.partial(_construct, name=_name))


def template_text() -> str:
    """The template exactly as shipped (what a customer deploys)."""
    return resources.files(__name__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


@functools.cache
def _template() -> dict[str, Any]:
    loaded = yaml.load(template_text(), Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(loaded, dict):
        raise ConfigurationError(f"{TEMPLATE_NAME} does not hold a mapping")
    return loaded


def load_template() -> dict[str, Any]:
    """The template as a JSON-shaped document (intrinsics in long form). A fresh copy each call."""
    return copy.deepcopy(_template())


def template_json(*, exclude_types: Collection[str] = ()) -> str:
    """The template as a JSON template body, optionally without resources of some types.

    moto's CloudFormation cannot deliver a ``Custom::Hook`` (it would need a Lambda container), so
    local deployments pass ``exclude_types={"Custom::Hook"}`` and hand the onboarding handler the
    event CloudFormation would have sent.
    """
    document = load_template()
    excluded = {
        logical_id
        for logical_id, resource in document.get("Resources", {}).items()
        if resource.get("Type") in exclude_types
    }
    for logical_id in excluded:
        del document["Resources"][logical_id]
    for resource in document.get("Resources", {}).values():
        depends = resource.get("DependsOn")
        if isinstance(depends, list):
            resource["DependsOn"] = [d for d in depends if d not in excluded]
        elif isinstance(depends, str) and depends in excluded:
            del resource["DependsOn"]
    return json.dumps(document, indent=2)


def management_role_name() -> str:
    """``DoiT_Management_Role_DO-NOT-DELETE``: the role the template creates for the provider."""
    name = _template()["Resources"][MANAGEMENT_ROLE_LOGICAL_ID]["Properties"]["RoleName"]
    return str(name)


def _substitute(value: Any, variables: Mapping[str, str]) -> Any:
    """Resolve ``Fn::Sub`` over pseudo parameters; anything else unresolved is a template error."""
    if isinstance(value, list):
        return [_substitute(item, variables) for item in value]
    if isinstance(value, dict):
        if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):

            def replace(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in variables:
                    raise ConfigurationError(f"the management policy refers to unknown ${{{name}}}")
                return variables[name]

            return _SUB_RE.sub(replace, value["Fn::Sub"])
        if len(value) == 1 and next(iter(value)).startswith(("Fn::", "Ref")):
            raise ConfigurationError(f"the management policy uses {next(iter(value))}, which is not resolved")
        return {key: _substitute(item, variables) for key, item in value.items()}
    return value


def management_policy(account_id: str, partition: str = "aws") -> dict[str, Any]:
    """The template's ``CustomerPolicy`` document as IAM holds it in ``account_id``.

    ``${AWS::Partition}`` and ``${AWS::AccountId}`` are substituted; the result is a plain IAM policy
    document (``Version`` + ``Statement``) ready for the local scope check or a policy evaluator.
    """
    if not isinstance(account_id, str) or not _ACCOUNT_RE.fullmatch(account_id):
        raise InvalidBindingError(f"account id must be exactly 12 digits, got {account_id!r}")
    if partition not in PARTITIONS:
        raise ConfigurationError(f"unknown AWS partition {partition!r}; expected one of {sorted(PARTITIONS)}")
    document = _template()["Resources"][MANAGEMENT_POLICY_LOGICAL_ID]["Properties"]["PolicyDocument"]
    resolved = _substitute(document, {"AWS::Partition": partition, "AWS::AccountId": account_id})
    if not isinstance(resolved, dict):
        raise ConfigurationError("the management policy is not a mapping")
    return resolved


__all__ = [
    "HOOK_LOGICAL_ID",
    "HOOK_RESOURCE_TYPE",
    "HOOK_VERSION",
    "MANAGEMENT_POLICY_LOGICAL_ID",
    "MANAGEMENT_ROLE_LOGICAL_ID",
    "PARTITIONS",
    "TEMPLATE_NAME",
    "load_template",
    "management_policy",
    "management_role_name",
    "template_json",
    "template_text",
]
