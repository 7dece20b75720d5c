"""AccessDenied, throttling and STS transient errors, driven by botocore's Stubber (no network)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from hsm_keys.errors import (
    AccessDeniedError,
    AwsError,
    OnboardingError,
    StsExchangeError,
    ThrottledError,
)
from hsm_keys.keystore import MemoryKeyStore
from hsm_keys.provisioning.aws import AwsCaller, AwsEnvironment, translate
from hsm_keys.provisioning.grants import GrantRecord, GrantSettings, SupportAccess, trust_policy
from hsm_keys.provisioning.issuer import IssuerScheme, MemoryPublisher
from hsm_keys.provisioning.registry import AccountRegistration, MemoryAccountRegistry
from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm

ACCOUNT = "111122223333"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/DoiT_Management_Role_DO-NOT-DELETE"
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def client(service: str) -> Any:
    return boto3.Session(aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1").client(
        service
    )


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_throttling_is_retried_boundedly_then_reported() -> None:
    iam = client("iam")
    sleeps = Sleeps()
    caller = AwsCaller(attempts=3, base_delay=0.1, sleep=sleeps)
    with Stubber(iam) as stub:
        for _ in range(2):
            stub.add_client_error("get_role", service_error_code="Throttling", http_status_code=400)
        stub.add_response(
            "get_role",
            {
                "Role": {
                    "Path": "/",
                    "RoleName": "DoiT-Support-a",
                    "RoleId": "AROAEXAMPLEEXAMPLE1",
                    "Arn": f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-a",
                    "CreateDate": NOW,
                }
            },
            {"RoleName": "DoiT-Support-a"},
        )
        assert caller.call(iam, "GetRole", RoleName="DoiT-Support-a")["Role"]["RoleName"] == "DoiT-Support-a"
        stub.assert_no_pending_responses()
    assert sleeps == [0.1, 0.2]

    with Stubber(iam) as stub:
        for _ in range(3):
            stub.add_client_error("get_role", service_error_code="Throttling", http_status_code=400)
        with pytest.raises(Exception) as raised:
            caller.call(iam, "GetRole", RoleName="DoiT-Support-a")
        assert isinstance(translate(raised.value, "GetRole"), ThrottledError)
        stub.assert_no_pending_responses()


def test_fresh_errors_are_retried_only_when_asked() -> None:
    iam = client("iam")
    caller = AwsCaller(attempts=4, sleep=Sleeps())
    with Stubber(iam) as stub:
        stub.add_client_error("attach_role_policy", service_error_code="NoSuchEntity", http_status_code=404)
        with pytest.raises(Exception) as raised:
            caller.call(
                iam, "AttachRolePolicy", RoleName="r", PolicyArn="arn:aws:iam::aws:policy/SecurityAudit"
            )
        assert translate(raised.value, "AttachRolePolicy").code == "NoSuchEntity"  # type: ignore[attr-defined]
    with Stubber(iam) as stub:
        stub.add_client_error("attach_role_policy", service_error_code="NoSuchEntity", http_status_code=404)
        stub.add_response("attach_role_policy", {})
        caller.call(
            iam,
            "AttachRolePolicy",
            fresh={"NoSuchEntity"},
            RoleName="r",
            PolicyArn="arn:aws:iam::aws:policy/SecurityAudit",
        )
        stub.assert_no_pending_responses()


@pytest.mark.parametrize("code", ["AccessDenied", "AccessDeniedException", "UnauthorizedOperation"])
def test_access_denied_is_translated_and_not_retried(code: str) -> None:
    iam = client("iam")
    with Stubber(iam) as stub:
        stub.add_client_error(
            "create_role", service_error_code=code, service_message="not allowed", http_status_code=403
        )
        with pytest.raises(Exception) as raised:
            AwsCaller(sleep=Sleeps()).call(
                iam, "CreateRole", RoleName="DoiT-Support-x", AssumeRolePolicyDocument="{}"
            )
        stub.assert_no_pending_responses()
    error = translate(raised.value, "CreateRole")
    assert isinstance(error, AccessDeniedError) and error.operation == "CreateRole" and error.code == code


class StubbedAws(AwsEnvironment):
    """Hands out pre-stubbed clients instead of real ones."""

    def __init__(self, iam: Any, sts: Any) -> None:
        super().__init__(retries=AwsCaller(sleep=Sleeps()))
        self._iam, self._sts = iam, sts

    def management_iam(self, account: str, role_arn: str) -> Any:
        return self._iam

    def client(self, service: str, session: Any = None, **options: Any) -> Any:
        return self._sts if service == "sts" else super().client(service, session, **options)


@pytest.fixture
def stubbed() -> Any:
    iam, sts = client("iam"), client("sts")
    store = MemoryKeyStore()
    registry = MemoryAccountRegistry(clock=lambda: NOW)
    registry.register(
        AccountRegistration(ACCOUNT, ROLE_ARN, f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/s/0", NOW)
    )
    scheme = IssuerScheme("https://idp.example.com")
    access = SupportAccess(
        store,
        registry,
        StubbedAws(iam, sts),
        MemoryPublisher(),
        GrantSettings(issuer=scheme),
        clock=lambda: NOW,
    )
    return access, iam, sts, store, scheme


def role_with_grant(
    scheme: IssuerScheme, kid: str, created: dt.datetime = NOW - dt.timedelta(days=1)
) -> dict[str, Any]:
    binding = Binding("alice", ACCOUNT)
    record = GrantRecord("alice", "CS-1", NOW + dt.timedelta(hours=1), kid, SignatureAlgorithm.ES256)
    return {
        "Role": {
            "Path": "/",
            "RoleName": "DoiT-Support-alice",
            "RoleId": "AROAEXAMPLEEXAMPLE1",
            "Arn": f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-alice",
            "CreateDate": created,
            "Description": record.to_description(),
            "AssumeRolePolicyDocument": json.dumps(
                trust_policy(
                    scheme.provider_arn(binding), scheme.provider_url(binding), "sts.amazonaws.com", "alice"
                )
            ),
        }
    }


def test_credentials_retry_transient_sts_errors_with_a_fresh_token_each_time(stubbed: Any) -> None:
    access, iam, sts, store, scheme = stubbed
    key = store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    tokens: list[str] = []
    sts.meta.events.register(
        "before-parameter-build.sts.AssumeRoleWithWebIdentity",
        lambda params, **_: tokens.append(params["WebIdentityToken"]),
    )
    with Stubber(iam) as iam_stub, Stubber(sts) as sts_stub:
        iam_stub.add_response(
            "get_role", role_with_grant(scheme, key.kid), {"RoleName": "DoiT-Support-alice"}
        )
        sts_stub.add_client_error(
            "assume_role_with_web_identity", service_error_code="IDPCommunicationError", http_status_code=400
        )
        sts_stub.add_client_error(
            "assume_role_with_web_identity",
            service_error_code="InvalidIdentityToken",
            service_message="Couldn't retrieve verification key from your identity provider",
            http_status_code=400,
        )
        sts_stub.add_response(
            "assume_role_with_web_identity",
            {
                "Credentials": {
                    "AccessKeyId": "ASIAEXAMPLEEXAMPLE12",
                    "SecretAccessKey": "s" * 40,
                    "SessionToken": "t" * 40,
                    "Expiration": NOW + dt.timedelta(hours=1),
                }
            },
            {
                "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-alice",
                "RoleSessionName": ANY,
                "WebIdentityToken": ANY,
                "DurationSeconds": 3600,
            },
        )
        session = access.credentials("alice", ACCOUNT)
        sts_stub.assert_no_pending_responses()
    assert session.get_credentials().access_key == "ASIAEXAMPLEEXAMPLE12"
    assert len(tokens) == 3 and len(set(tokens)) == 3  # a fresh token (new jti) for every try


def test_permanent_sts_errors_name_iss_and_aud(stubbed: Any) -> None:
    access, iam, sts, store, scheme = stubbed
    key = store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    with Stubber(iam) as iam_stub, Stubber(sts) as sts_stub:
        iam_stub.add_response(
            "get_role", role_with_grant(scheme, key.kid), {"RoleName": "DoiT-Support-alice"}
        )
        sts_stub.add_client_error(
            "assume_role_with_web_identity",
            service_error_code="InvalidIdentityToken",
            service_message="Incorrect token audience",
            http_status_code=400,
        )
        with pytest.raises(StsExchangeError) as raised:
            access.credentials("alice", ACCOUNT)
        sts_stub.assert_no_pending_responses()
    message = str(raised.value)
    assert f"iss={scheme.issuer(Binding('alice', ACCOUNT))}" in message and "aud=sts.amazonaws.com" in message
    assert raised.value.code == "InvalidIdentityToken"


def test_access_denied_during_grant_surfaces_as_access_denied(stubbed: Any) -> None:
    access, iam, _, store, _ = stubbed
    with Stubber(iam) as stub:
        stub.add_client_error(
            "get_role",
            service_error_code="AccessDenied",
            service_message="explicit deny",
            http_status_code=403,
        )
        with pytest.raises(AccessDeniedError, match="explicit deny"):
            access.grant("alice", ACCOUNT, ticket="CS-1", ttl=dt.timedelta(hours=1))
    assert store.find(Binding("alice", ACCOUNT)) is None  # nothing generated when AWS refuses up front


def test_throttling_past_the_budget_during_grant_is_a_throttled_error(stubbed: Any) -> None:
    access, iam, _, _, _ = stubbed
    with Stubber(iam) as stub:
        for _ in range(access.aws.retries.attempts):
            stub.add_client_error("get_role", service_error_code="Throttling", http_status_code=400)
        with pytest.raises(ThrottledError):
            access.grant("alice", ACCOUNT, ticket="CS-1", ttl=dt.timedelta(hours=1))
        stub.assert_no_pending_responses()


def test_translate_never_leaks_credentials() -> None:
    error = translate(RuntimeError("aws_secret_access_key=abc"), "GetRole")
    assert isinstance(error, AwsError) and "abc" not in str(error)


STS_OK = {
    "Credentials": {
        "AccessKeyId": "ASIAEXAMPLEEXAMPLE12",
        "SecretAccessKey": "s" * 40,
        "SessionToken": "t" * 40,
        "Expiration": NOW + dt.timedelta(hours=1),
    }
}


@pytest.mark.parametrize(
    ("age", "retried"), [(dt.timedelta(seconds=5), True), (dt.timedelta(hours=1), False)]
)
def test_access_denied_from_sts_is_retried_only_for_a_just_created_role(
    stubbed: Any, age: dt.timedelta, retried: bool
) -> None:
    access, iam, sts, store, scheme = stubbed
    key = store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    with Stubber(iam) as iam_stub, Stubber(sts) as sts_stub:
        iam_stub.add_response(
            "get_role", role_with_grant(scheme, key.kid, NOW - age), {"RoleName": "DoiT-Support-alice"}
        )
        sts_stub.add_client_error(
            "assume_role_with_web_identity", service_error_code="AccessDenied", http_status_code=403
        )
        if retried:
            sts_stub.add_response("assume_role_with_web_identity", STS_OK)
            assert access.credentials("alice", ACCOUNT).get_credentials().access_key == "ASIAEXAMPLEEXAMPLE12"
        else:
            with pytest.raises(StsExchangeError, match="AccessDenied"):
                access.credentials("alice", ACCOUNT)
        sts_stub.assert_no_pending_responses()


class StubbedOperations(AwsEnvironment):
    """The real management-role path (AssumeRole from the operations account) over a stubbed STS."""

    def __init__(self, sts: Any) -> None:
        super().__init__(retries=AwsCaller(sleep=Sleeps()))
        self._sts = sts

    def client(self, service: str, session: Any = None, **options: Any) -> Any:
        return self._sts if service == "sts" else super().client(service, session, **options)


@pytest.mark.parametrize("code", ["AccessDenied", "AccessDeniedException"])
def test_a_refused_management_role_is_access_denied(code: str) -> None:
    from hsm_keys.cli import EXIT_DENIED, exit_code_for

    sts = client("sts")
    aws = StubbedOperations(sts)
    registry = MemoryAccountRegistry(clock=lambda: NOW)
    registry.register(
        AccountRegistration(ACCOUNT, ROLE_ARN, f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/s/0", NOW)
    )
    store = MemoryKeyStore()
    access = SupportAccess(
        store, registry, aws, MemoryPublisher(), GrantSettings(issuer=IssuerScheme("https://idp.example.com"))
    )
    with Stubber(sts) as stub:
        for _ in range(3):
            stub.add_client_error(
                "assume_role",
                service_error_code=code,
                service_message="User is not authorized to perform: sts:AssumeRole",
                http_status_code=403,
            )
        for call in (
            lambda: aws.management_role_id(ACCOUNT, ROLE_ARN),
            lambda: access.grant("alice", ACCOUNT, ticket="CS-1", ttl=dt.timedelta(hours=1)),
            lambda: access.list_grants(ACCOUNT),
        ):
            with pytest.raises(AccessDeniedError) as raised:
                call()
            assert isinstance(raised.value, OnboardingError)  # what callers caught before
            assert (raised.value.operation, raised.value.code) == ("AssumeRole", code)
            assert exit_code_for(raised.value) == EXIT_DENIED
        stub.assert_no_pending_responses()
    assert store.list_keys() == []


def test_other_management_role_failures_stay_aws_errors() -> None:
    from hsm_keys.cli import EXIT_AWS, exit_code_for

    sts = client("sts")
    aws = StubbedOperations(sts)
    with Stubber(sts) as stub:
        stub.add_client_error(
            "assume_role", service_error_code="RegionDisabledException", http_status_code=403
        )
        with pytest.raises(OnboardingError) as raised:
            aws.management_role_id(ACCOUNT, ROLE_ARN)
    assert not isinstance(raised.value, AccessDeniedError)
    assert exit_code_for(raised.value) == EXIT_AWS


def test_cancelled_work_sends_no_aws_call() -> None:
    from hsm_keys.errors import WorkCancelledError
    from hsm_keys.provisioning.cancellation import Cancellation, cancellable

    iam = client("iam")
    token = Cancellation()
    with Stubber(iam) as stub, cancellable(token):
        stub.add_response("delete_role", {}, {"RoleName": "DoiT-Support-a"})
        AwsCaller(sleep=Sleeps()).call(iam, "DeleteRole", RoleName="DoiT-Support-a")  # not cancelled yet
        stub.add_response("delete_role", {}, {"RoleName": "DoiT-Support-b"})
        assert token.cancel("answered") is True
        with pytest.raises(WorkCancelledError, match="DeleteRole"):
            AwsCaller(sleep=Sleeps()).call(iam, "DeleteRole", RoleName="DoiT-Support-b")
        with pytest.raises(AssertionError):
            stub.assert_no_pending_responses()  # the second call never reached the client


def test_cancelled_work_destroys_no_key_and_unpublishes_nothing(stubbed: Any) -> None:
    from hsm_keys.errors import WorkCancelledError
    from hsm_keys.provisioning.cancellation import Cancellation, cancellable

    access, _, _, store, _ = stubbed
    key = store.generate(KeySpec.EC_P256, Binding("alice", ACCOUNT))
    access.publisher.publish(f"{ACCOUNT}/alice", {"jwks.json": b"{}"})
    token = Cancellation()
    token.cancel("answered")
    with cancellable(token), pytest.raises(WorkCancelledError):
        access.purge_account_offline(ACCOUNT)
    assert store.find(Binding("alice", ACCOUNT)) == key
    assert access.publisher.published() == [f"{ACCOUNT}/alice"]
    assert len(access.purge_account_offline(ACCOUNT).actions) == 2  # outside the cancelled work: done
