"""The call recorder: what is sent is recorded once, mapped to IAM authorisations, secrets redacted."""

from __future__ import annotations

import datetime as dt
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber

from hsm_keys.errors import AccessDeniedError
from hsm_keys.provisioning.recorder import REDACTED, CallRecorder, RecordedCall
from hsm_keys.provisioning.scope import AuthorizationRequest, ManagementScope

ACCOUNT = "111122223333"
TRUST = '{"Version": "2012-10-17", "Statement": []}'


def _session() -> boto3.Session:
    return boto3.Session(
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
        aws_secret_access_key="not-a-secret",
        region_name="us-east-1",
    )


def _role(name: str) -> dict[str, Any]:
    return {
        "Path": "/",
        "RoleName": name,
        "RoleId": "AROAEXAMPLEEXAMPLE000",
        "Arn": f"arn:aws:iam::{ACCOUNT}:role/{name}",
        "CreateDate": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    }


def test_records_each_call_as_sent_and_maps_it() -> None:
    iam = _session().client("iam")
    recorder = CallRecorder()
    recorder.attach(iam, account_id=ACCOUNT)
    recorder.attach(iam, account_id=ACCOUNT)  # twice: still one record per call
    with Stubber(iam) as stub:
        stub.add_response("create_role", {"Role": _role("DoiT-Support-a")})
        stub.add_response("attach_role_policy", {})
        iam.create_role(RoleName="DoiT-Support-a", AssumeRolePolicyDocument=TRUST, Description="d")
        iam.attach_role_policy(RoleName="DoiT-Support-a", PolicyArn="arn:aws:iam::aws:policy/SecurityAudit")
    assert [(c.service, c.operation) for c in recorder.calls] == [
        ("iam", "CreateRole"),
        ("iam", "AttachRolePolicy"),
    ]
    assert recorder.calls[0].params["Description"] == "d"
    assert recorder.authorization_requests() == [
        AuthorizationRequest("CreateRole", "iam:CreateRole", f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-a"),
        AuthorizationRequest(
            "AttachRolePolicy",
            "iam:AttachRolePolicy",
            f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-a",
            {"iam:PolicyARN": "arn:aws:iam::aws:policy/SecurityAudit"},
        ),
    ]
    recorder.clear()
    assert recorder.calls == []


def test_failed_calls_that_were_sent_are_recorded() -> None:
    iam = _session().client("iam")
    recorder = CallRecorder()
    recorder.attach(iam, account_id=ACCOUNT)
    with Stubber(iam) as stub:
        stub.add_client_error("get_role", "NoSuchEntity", http_status_code=404)
        with pytest.raises(botocore.exceptions.ClientError):
            iam.get_role(RoleName="DoiT-Support-a")
    assert [c.operation for c in recorder.calls] == ["GetRole"]


def test_calls_refused_before_sending_are_not_recorded() -> None:
    iam = _session().client("iam")
    ManagementScope.for_account(ACCOUNT).install(iam)
    recorder = CallRecorder()
    recorder.attach(iam, account_id=ACCOUNT)
    with Stubber(iam), pytest.raises(AccessDeniedError):
        iam.tag_role(RoleName="DoiT-Support-a", Tags=[{"Key": "k", "Value": "v"}])
    with pytest.raises(botocore.exceptions.ParamValidationError):
        iam.get_role(RoleName="DoiT-Support-a", Unknown=1)  # rejected by botocore, never sent
    assert recorder.calls == []


def test_attached_session_records_clients_created_afterwards_and_redacts_secrets() -> None:
    session = _session()
    recorder = CallRecorder()
    recorder.attach(session, account_id=ACCOUNT)
    sts = session.client("sts")
    with Stubber(sts) as stub:
        stub.add_response(
            "get_caller_identity", {"Account": ACCOUNT, "Arn": "arn:aws:iam::1:user/u", "UserId": "u"}
        )
        stub.add_client_error("assume_role_with_web_identity", "InvalidIdentityToken")
        sts.get_caller_identity()
        with pytest.raises(botocore.exceptions.ClientError):
            sts.assume_role_with_web_identity(
                RoleArn=f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-a",
                RoleSessionName="session",
                WebIdentityToken="eyJhbGciOiJFUzI1NiJ9.secret.token",
            )
    get_identity, exchange = recorder.calls
    assert get_identity.authorizations() == ()  # needs no permission
    assert exchange.params["WebIdentityToken"] == REDACTED
    assert "secret" not in repr(recorder.calls)
    with pytest.raises(AccessDeniedError):
        exchange.authorizations()  # not something the management policy covers


def test_unmapped_or_unaccounted_calls_fail_loudly() -> None:
    with pytest.raises(AccessDeniedError):
        RecordedCall("iam", "CreateUser", {"UserName": "u"}, ACCOUNT).authorizations()
    with pytest.raises(AccessDeniedError):
        RecordedCall("iam", "GetRole", {"RoleName": "DoiT-Support-a"}, None).authorizations()
    assert str(RecordedCall("iam", "GetRole", {}, ACCOUNT)) == f"iam:GetRole in {ACCOUNT}"
