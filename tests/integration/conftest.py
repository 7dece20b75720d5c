"""Integration fixtures: a moto server on loopback, the customer's stack deployed in it, the policy evaluator.

* ``moto_server`` (session): endpoint URL of a ``ThreadedMotoServer`` on 127.0.0.1 with AWS managed
  policies loaded. Real boto3 clients reach it over HTTP. Its default account acts as the
  provider's operations account (:data:`OPERATIONS_ACCOUNT`).
* ``moto_client`` (session): ``moto_client(service, credentials=None)`` -> a boto3 client on the server;
  ``credentials`` is an STS ``Credentials`` dict (as ``AssumeRole`` returns), else the operations account.
* ``assume_role`` (session): ``assume_role(role_arn)`` -> STS credentials, from the operations account.
* ``deployed_stack``: the template deployed by CloudFormation into a fresh customer account, without
  the ``Custom::Hook`` (moto cannot deliver it; the tests hand the handler the event instead).
* ``deploy_support_stack``: ``deploy_support_stack(account_id=None)`` -> another :class:`DeployedStack`
  (a fresh account by default; the same account again after its stack was deleted, for redeployments).
* ``policy_evaluator`` (session): the test-only IAM policy evaluator (tests/policy); skips only when
  node is not installed. ``call_recorder``: a fresh :class:`CallRecorder`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from hsm_keys import templates
from hsm_keys.provisioning.recorder import CallRecorder

OPERATIONS_ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
_DUMMY_KEY = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # moto accepts any

_EVALUATOR_PATH = Path(__file__).resolve().parents[1] / "policy" / "iam_policy_evaluator.py"


def _load_evaluator_module() -> Any:
    """tests/policy is not a package on sys.path; load its wrapper by file, once."""
    name = "iam_policy_evaluator"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _EVALUATOR_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


iam_policy_evaluator = _load_evaluator_module()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    previous = os.environ.get("MOTO_IAM_LOAD_MANAGED_POLICIES")
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("MOTO_IAM_LOAD_MANAGED_POLICIES", None)
        else:
            os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = previous


MotoClient = Callable[..., Any]


@pytest.fixture(scope="session")
def moto_client(moto_server: str) -> MotoClient:
    def make(service: str, credentials: Mapping[str, str] | None = None) -> Any:
        keys: dict[str, str] = dict(_DUMMY_KEY)
        if credentials is not None:
            keys = {
                "aws_access_key_id": credentials["AccessKeyId"],
                "aws_secret_access_key": credentials["SecretAccessKey"],
                "aws_session_token": credentials["SessionToken"],
            }
        return boto3.Session(region_name=REGION, **keys).client(service, endpoint_url=moto_server)

    return make


def new_account_id() -> str:
    """A fresh 12-digit account, so tests sharing one moto server never see each other's IAM."""
    return f"{secrets.randbelow(9 * 10**11) + 10**11}"


@dataclass(frozen=True)
class DeployedStack:
    """The customer's stack as CloudFormation created it in ``account_id``."""

    endpoint_url: str
    account_id: str
    stack_id: str
    role_arn: str
    role_name: str
    service_token: str
    outputs: Mapping[str, str]
    admin_credentials: Mapping[str, str] = field(repr=False)

    def hook_properties(self) -> dict[str, str]:
        """The ``Custom::Hook`` properties CloudFormation would have sent for this stack (``Version``
        is a resource attribute of the hook, so it is not among them)."""
        return {
            "ServiceToken": self.service_token,
            "RoleArn": self.role_arn,
            "AccountId": self.account_id,
        }


def assume(moto_client: MotoClient, role_arn: str, session_name: str = "hsm-keys") -> dict[str, str]:
    """Credentials for ``role_arn``, assumed from the operations account."""
    response = moto_client("sts").assume_role(RoleArn=role_arn, RoleSessionName=session_name)
    return dict(response["Credentials"])


@pytest.fixture(scope="session")
def assume_role(moto_client: MotoClient) -> Callable[..., dict[str, str]]:
    """``assume_role(role_arn, session_name="hsm-keys")`` -> STS credentials, from the operations account."""

    def run(role_arn: str, session_name: str = "hsm-keys") -> dict[str, str]:
        return assume(moto_client, role_arn, session_name)

    return run


StackDeployer = Callable[..., DeployedStack]


def _deploy(moto_server: str, moto_client: MotoClient, account_id: str) -> DeployedStack:
    # In moto, assuming any role ARN yields credentials acting in that role's account: the customer's admin.
    admin = assume(moto_client, f"arn:aws:iam::{account_id}:role/customer-admin", "customer-admin")
    service_token = f"arn:aws:sns:{REGION}:{OPERATIONS_ACCOUNT}:hsm-keys-onboarding"
    cloudformation = moto_client("cloudformation", admin)
    stack_id = cloudformation.create_stack(
        StackName="DoiT-support-access",
        TemplateBody=templates.template_json(exclude_types={templates.HOOK_RESOURCE_TYPE}),
        Parameters=[
            {"ParameterKey": "AccountNumberParameter", "ParameterValue": OPERATIONS_ACCOUNT},
            {"ParameterKey": "ServiceToken", "ParameterValue": service_token},
        ],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )["StackId"]
    description = cloudformation.describe_stacks(StackName=stack_id)["Stacks"][0]
    assert description["StackStatus"] == "CREATE_COMPLETE", description
    outputs = {o["OutputKey"]: o["OutputValue"] for o in description.get("Outputs", [])}
    return DeployedStack(
        endpoint_url=moto_server,
        account_id=account_id,
        stack_id=stack_id,
        role_arn=outputs["ManagementRoleArn"],
        role_name=outputs["ManagementRoleName"],
        service_token=service_token,
        outputs=outputs,
        admin_credentials=admin,
    )


@pytest.fixture
def deploy_support_stack(moto_server: str, moto_client: MotoClient) -> StackDeployer:
    """``deploy_support_stack(account_id=None)``: the template deployed (again) into an account."""

    def deploy(account_id: str | None = None) -> DeployedStack:
        return _deploy(moto_server, moto_client, account_id or new_account_id())

    return deploy


@pytest.fixture
def deployed_stack(deploy_support_stack: StackDeployer) -> DeployedStack:
    return deploy_support_stack()


@pytest.fixture(scope="session")
def policy_evaluator() -> Any:
    evaluator = iam_policy_evaluator.PolicyEvaluator.find()
    if evaluator is None:
        pytest.skip("node is not installed; the IAM policy evaluator in tests/policy needs it")
    return evaluator


@pytest.fixture
def call_recorder() -> CallRecorder:
    return CallRecorder()
