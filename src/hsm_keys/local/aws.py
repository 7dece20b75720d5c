"""A local AWS: moto in server mode on loopback, reached by real boto3 clients over HTTP.

moto serves several accounts at once: credentials from ``AssumeRole`` into a role ARN of another
account act in that account, so the operations account (moto's default) and customer accounts are
separate, as in production. AWS managed policies such as ``SecurityAudit`` exist only when moto starts
with ``MOTO_IAM_LOAD_MANAGED_POLICIES=true``, which :class:`LocalAws` sets.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

import boto3

from hsm_keys import templates

OPERATIONS_ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
# moto accepts any credentials; these name no real account and open nothing.
_LOCAL_KEY_ID = "AKIAHSMKEYSLOCAL0000"
_LOCAL_SECRET = "hsm-keys-local-moto-not-a-secret"


class LocalAws:
    """Start/stop a ThreadedMotoServer on 127.0.0.1 and hand out sessions per account.

    moto keeps its state per process: two servers started in one process share it.
    """

    def __init__(self, port: int = 0) -> None:
        os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
        os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "false")
        from moto.server import ThreadedMotoServer

        for noisy in ("werkzeug", "moto"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint_url = ""

    def start(self) -> LocalAws:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def client(self, service: str, session: boto3.Session | None = None) -> Any:
        make_client: Any = (session or self.operations_session()).client  # service chosen at run time
        return make_client(service, region_name=REGION, endpoint_url=self.endpoint_url)

    @staticmethod
    def operations_session() -> boto3.Session:
        return boto3.Session(
            aws_access_key_id=_LOCAL_KEY_ID, aws_secret_access_key=_LOCAL_SECRET, region_name=REGION
        )

    def session_in(self, account: str, role_name: str = "OrganizationAccountAccessRole") -> boto3.Session:
        """Administrator credentials in ``account`` (how a customer acts in their own account)."""
        sts = self.client("sts")
        creds = sts.assume_role(
            RoleArn=f"arn:aws:iam::{account}:role/{role_name}", RoleSessionName="customer-admin"
        )["Credentials"]
        return boto3.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            region_name=REGION,
        )

    def deploy_support_stack(
        self,
        account: str,
        *,
        operations_account: str = OPERATIONS_ACCOUNT,
        service_token: str,
        stack_name: str = "doit-support-access",
    ) -> dict[str, str]:
        """Deploy the customers' template in ``account`` as the customer would.

        moto delivers ``Custom::*`` resources only through a Lambda it would run in a container, so
        the hook resource is left out here; the caller hands the onboarding handler the event
        CloudFormation would send. Returns StackId and the management role's ARN.
        """
        cloudformation = self.client("cloudformation", self.session_in(account))
        body = templates.template_json(exclude_types={templates.HOOK_RESOURCE_TYPE})
        stack_id = cloudformation.create_stack(
            StackName=stack_name,
            TemplateBody=body,
            Parameters=[
                {"ParameterKey": "AccountNumberParameter", "ParameterValue": operations_account},
                {"ParameterKey": "ServiceToken", "ParameterValue": service_token},
            ],
            Capabilities=["CAPABILITY_NAMED_IAM"],
        )["StackId"]
        stack = cloudformation.describe_stacks(StackName=stack_id)["Stacks"][0]
        if stack["StackStatus"] != "CREATE_COMPLETE":
            raise RuntimeError(f"stack {stack_name} ended in {stack['StackStatus']}")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        role_arn = next((v for v in outputs.values() if v.startswith("arn:")), "")
        return {"StackId": stack_id, "RoleArn": role_arn, **outputs}

    def delete_support_stack(self, account: str, stack_id: str) -> None:
        self.client("cloudformation", self.session_in(account)).delete_stack(StackName=stack_id)
