"""Support-access grants end to end: SoftHSM or memory keys, a moto server over HTTP, a loopback HTTPS issuer.

moto enforces no IAM policy, so every recorded IAM call is also evaluated against the customers'
management policy by a real policy evaluator (tests/policy), and tokens are checked with PyJWT.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest
from cryptography.hazmat.primitives import hashes

from hsm_keys import templates
from hsm_keys.errors import (
    AccessDeniedError,
    HsmKeysError,
    InvalidBindingError,
    InvalidInputError,
    NotOwnedError,
    OnboardingError,
    UnsupportedAlgorithmError,
)
from hsm_keys.keystore import KeyStore, MemoryKeyStore
from hsm_keys.local.environment import LocalEnvironment
from hsm_keys.provisioning.aws import AwsCaller, AwsEnvironment
from hsm_keys.provisioning.grants import MARKER, GrantRecord, SupportAccess
from hsm_keys.provisioning.issuer import IssuerScheme, https_get
from hsm_keys.provisioning.recorder import CallRecorder
from hsm_keys.provisioning.registry import AccountRegistration
from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy"))
from iam_policy_evaluator import PolicyEvaluator

pytestmark = pytest.mark.aws
ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
# moto keeps one state per process, shared by every server in it: this test gets its own account.
SOFTHSM_ACCOUNT = "777788889999"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnvironment]:
    with MemoryKeyStore() as store, LocalEnvironment(tmp_path_factory.mktemp("grants"), store) as environment:
        environment.onboard(ACCOUNT)
        environment.onboard(OTHER_ACCOUNT)
        yield environment


@pytest.fixture(scope="module")
def evaluator() -> PolicyEvaluator:
    found = PolicyEvaluator.find()
    if found is None:
        pytest.fail("node is required for the IAM policy evaluation (make test installs it)")
    return found


@pytest.fixture(autouse=True)
def recorder(env: LocalEnvironment, evaluator: PolicyEvaluator) -> Iterator[CallRecorder]:
    """Record every IAM call each test makes through the management role; afterwards a real IAM
    policy evaluator must allow every one of them under the customers' management policy."""
    calls = CallRecorder()
    hook = lambda client, account: calls.attach(client, account_id=account)  # noqa: E731
    env.access.aws.client_hooks.append(hook)
    try:
        yield calls
    finally:
        env.access.aws.client_hooks.remove(hook)
    PolicyEvaluator.assert_all_allowed(evaluator.evaluate_recorded(calls))


@pytest.fixture
def operations_calls(env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch) -> CallRecorder:
    """Every call made with the operations account's session (STS AssumeRole of management roles)."""
    calls = CallRecorder()
    session = env.aws.operations_session()
    calls.attach(session)
    monkeypatch.setattr(env.access.aws, "session", session)
    return calls


def admin_iam(env: LocalEnvironment, account: str = ACCOUNT) -> Any:
    return env.aws.client("iam", env.aws.session_in(account))


def doit_roles(env: LocalEnvironment, account: str = ACCOUNT) -> list[str]:
    return sorted(
        r["RoleName"]
        for r in admin_iam(env, account).list_roles()["Roles"]
        if r["RoleName"].startswith("DoiT-")
    )


def providers(env: LocalEnvironment, account: str = ACCOUNT) -> list[str]:
    return sorted(
        p["Arn"]
        for p in admin_iam(env, account).list_open_id_connect_providers()["OpenIDConnectProviderList"]
    )


def doit_policies(env: LocalEnvironment, account: str = ACCOUNT) -> list[str]:
    listed = admin_iam(env, account).list_policies(Scope="Local")["Policies"]
    return sorted(p["PolicyName"] for p in listed if p["PolicyName"].startswith("DoiT-"))


def assert_nothing_left(env: LocalEnvironment, staff: str, account: str = ACCOUNT) -> None:
    assert f"DoiT-Support-{staff}" not in doit_roles(env, account)
    assert not [p for p in providers(env, account) if p.endswith(f"/{staff.lower()}")]
    assert f"DoiT-Support-{staff}" not in doit_policies(env, account)
    assert env.store.find(Binding(staff, account)) is None


def test_full_flow_grant_verify_credentials_revoke(env: LocalEnvironment, recorder: CallRecorder) -> None:
    grant = env.access.grant("alice", ACCOUNT, ticket="CS-1", ttl=dt.timedelta(hours=2))
    assert grant.role_arn == f"arn:aws:iam::{ACCOUNT}:role/DoiT-Support-alice"
    assert grant.provider_arn == f"arn:aws:iam::{ACCOUNT}:oidc-provider/idp.hsm-keys.test/{ACCOUNT}/alice"
    assert grant.issuer == f"https://idp.hsm-keys.test/{ACCOUNT}/alice"
    assert grant.alg is SignatureAlgorithm.ES256

    iam = admin_iam(env)
    role = iam.get_role(RoleName="DoiT-Support-alice")["Role"]
    record = GrantRecord.from_description(role["Description"])
    assert record is not None and (record.ticket, record.kid) == ("CS-1", grant.kid)
    trust = role["AssumeRolePolicyDocument"]
    statement = trust["Statement"][0]
    assert statement["Principal"] == {"Federated": grant.provider_arn}
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    provider_url = grant.issuer.removeprefix("https://")
    assert statement["Condition"]["StringEquals"] == {
        f"{provider_url}:aud": "sts.amazonaws.com",
        f"{provider_url}:sub": "alice",
    }
    attached = {
        p["PolicyArn"]
        for p in iam.list_attached_role_policies(RoleName="DoiT-Support-alice")["AttachedPolicies"]
    }
    assert attached == {"arn:aws:iam::aws:policy/SecurityAudit", grant.staff_policy_arn}
    provider = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=grant.provider_arn)
    assert provider["ClientIDList"] == ["sts.amazonaws.com"]
    # the provider's thumbprint is the intermediate CA's (the top certificate the server sends)
    assert provider["ThumbprintList"] == [env.pki.intermediate.fingerprint(hashes.SHA1()).hex()]

    report = env.access.verify("alice", ACCOUNT)
    assert report.ok, str(report)
    assert [c.name for c in report.checks] == [
        "onboarded",
        "role",
        "key",
        "discovery",
        "jwks",
        "provider",
        "thumbprint",
        "trust",
        "token",
    ]

    session = env.access.credentials("alice", ACCOUNT)
    identity = env.aws.client("sts", session).get_caller_identity()
    assert identity["Account"] == ACCOUNT
    assert ":assumed-role/DoiT-Support-alice/" in identity["Arn"]

    # an independent JWT library accepts the HSM-signed token against the published JWKS
    token = env.access.mint_token(Binding("alice", ACCOUNT), grant.kid, grant.alg)
    status, body = https_get(f"{grant.issuer}/jwks.json", env.https)
    assert status == 200
    jwk = jwt.PyJWK(json.loads(body)["keys"][0])
    claims = jwt.decode(
        token, jwk.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer=grant.issuer
    )
    assert claims["sub"] == "alice" and jwt.get_unverified_header(token)["kid"] == grant.kid

    actions = env.access.revoke("alice", ACCOUNT)
    assert {a.action for a in actions} >= {
        "deleted role",
        "deleted policy",
        "deleted provider",
        "destroyed key",
    }
    assert_nothing_left(env, "alice")
    status, _ = https_get(f"{grant.issuer}/jwks.json", env.https)
    assert status == 404

    operations = {call.operation for call in recorder.calls}
    assert operations >= {
        "CreateOpenIDConnectProvider",
        "CreateRole",
        "AttachRolePolicy",
        "CreatePolicy",
        "DetachRolePolicy",
        "DeleteRole",
        "DeletePolicy",
        "DeleteOpenIDConnectProvider",
    }


def test_repeat_grant_reuses_everything_and_updates_ticket_and_expiry(env: LocalEnvironment) -> None:
    first = env.access.grant("bob", ACCOUNT, ticket="CS-2", ttl=dt.timedelta(hours=1))
    second = env.access.grant("bob", ACCOUNT, ticket="CS-3", ttl=dt.timedelta(hours=5))
    assert (second.kid, second.role_arn, second.provider_arn, second.staff_policy_arn) == (
        first.kid,
        first.role_arn,
        first.provider_arn,
        first.staff_policy_arn,
    )
    assert second.ticket == "CS-3" and second.expires_at > first.expires_at
    record = GrantRecord.from_description(
        admin_iam(env).get_role(RoleName="DoiT-Support-bob")["Role"]["Description"]
    )
    assert record is not None and record.ticket == "CS-3"
    assert len([k for k in env.store.list_keys() if k.binding.staff == "bob"]) == 1
    # the same staff id in another case is the same IAM role, so the same grant
    third = env.access.grant("BOB", ACCOUNT, ticket="CS-4", ttl=dt.timedelta(hours=1))
    assert third.kid == first.kid and third.role_arn == first.role_arn
    grants = env.access.list_grants(ACCOUNT)
    assert [(g.staff, g.ticket) for g in grants if g.staff == "bob"] == [("bob", "CS-4")]
    env.access.revoke("bob", ACCOUNT)
    assert env.access.revoke("bob", ACCOUNT) == []  # safe to repeat
    assert_nothing_left(env, "bob")


def test_one_key_per_staff_and_account(env: LocalEnvironment) -> None:
    a = env.access.grant("carol", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    b = env.access.grant("carol", OTHER_ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1), alg="RS256")
    assert a.kid != b.kid and b.alg is SignatureAlgorithm.RS256
    assert env.access.verify("carol", OTHER_ACCOUNT).ok
    env.access.revoke("carol", ACCOUNT)
    env.access.revoke("carol", OTHER_ACCOUNT)
    assert_nothing_left(env, "carol", OTHER_ACCOUNT)


@pytest.mark.parametrize(
    ("staff", "account", "options", "error"),
    [
        ("x" * 52, ACCOUNT, {}, InvalidBindingError),  # DoiT-Support- + 52 = 65 characters
        ("dave", "12345678901", {}, InvalidBindingError),
        ("dave", "1234567890123", {}, InvalidBindingError),
        ("da ve", ACCOUNT, {}, InvalidBindingError),
        ("dave", ACCOUNT, {"alg": "PS256"}, UnsupportedAlgorithmError),
        ("dave", ACCOUNT, {"alg": "EdDSA"}, UnsupportedAlgorithmError),
        ("dave", ACCOUNT, {"ticket": "bad ticket"}, InvalidInputError),
        ("dave", ACCOUNT, {"ttl": dt.timedelta(0)}, InvalidInputError),
        ("dave", ACCOUNT, {"ttl": dt.timedelta(days=400)}, InvalidInputError),
    ],
)
def test_bad_input_is_rejected_before_any_aws_call(
    env: LocalEnvironment,
    operations_calls: CallRecorder,
    recorder: CallRecorder,
    staff: str,
    account: str,
    options: dict[str, Any],
    error: type,
) -> None:
    arguments = {"ticket": "T-9", "ttl": dt.timedelta(hours=1)} | options
    with pytest.raises(error):
        env.access.grant(staff, account, **arguments)
    assert operations_calls.calls == []  # not even AssumeRole of the management role
    assert recorder.calls == []
    assert env.store.find(Binding("dave", ACCOUNT)) is None


def test_the_operations_recorder_sees_assume_role(
    env: LocalEnvironment, operations_calls: CallRecorder
) -> None:
    """What makes the checks above meaningful: a valid request's first AWS call is recorded."""
    env.access.list_grants(ACCOUNT)
    assert [(c.service, c.operation) for c in operations_calls.calls] == [("sts", "AssumeRole")]


@pytest.mark.parametrize(
    "base",
    [
        "http://idp.example.com",
        "https://idp.example.com:8443",
        "https://idp.example.com/x?y=1",
        "https://idp.example.com/#f",
        "https://user@idp.example.com",
        "https://IDP.example.com",
    ],
)
def test_issuer_bases_iam_would_refuse_are_rejected(base: str) -> None:
    with pytest.raises(InvalidInputError):
        IssuerScheme(base)


def test_unregistered_account_is_refused(env: LocalEnvironment) -> None:
    with pytest.raises(OnboardingError, match="not onboarded"):
        env.access.grant("erin", "999999999999", ticket="T-1", ttl=dt.timedelta(hours=1))
    assert env.store.find(Binding("erin", "999999999999")) is None


def test_pre_existing_role_not_created_by_us_is_reported_not_adopted(env: LocalEnvironment) -> None:
    iam = admin_iam(env)
    iam.create_role(
        RoleName="DoiT-Support-frank",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": ACCOUNT}, "Action": "sts:AssumeRole"}],
            }
        ),
        Description="made by hand",
    )
    with pytest.raises(NotOwnedError, match="not created by hsm-keys"):
        env.access.grant("frank", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    with pytest.raises(NotOwnedError):
        env.access.revoke("frank", ACCOUNT)
    assert iam.get_role(RoleName="DoiT-Support-frank")["Role"]["Description"] == "made by hand"
    assert env.store.find(Binding("frank", ACCOUNT)) is None
    assert "frank" not in [g.staff for g in env.access.list_grants(ACCOUNT)]
    iam.delete_role(RoleName="DoiT-Support-frank")


STALE = [f"{i:040x}" for i in range(1, 6)]


def test_a_provider_full_of_stale_thumbprints_is_rotated_on_a_repeat_grant(env: LocalEnvironment) -> None:
    """IAM holds at most five thumbprints: a repeat grant puts the served one first and keeps the most
    recent four others (the library writes newest first), instead of failing for ever."""
    first = env.access.grant("gina", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    served = env.pki.intermediate.fingerprint(hashes.SHA1()).hex()
    assert first.thumbprints == (served,) and first.notes == ()
    iam = admin_iam(env)
    iam.update_open_id_connect_provider_thumbprint(
        OpenIDConnectProviderArn=first.provider_arn, ThumbprintList=STALE
    )
    assert not env.access.verify("gina", ACCOUNT).ok
    again = env.access.grant("gina", ACCOUNT, ticket="T-2", ttl=dt.timedelta(hours=1))
    assert again.thumbprints == (served, *STALE[:4])
    assert len(again.notes) == 1 and served in again.notes[0] and STALE[4] in again.notes[0]  # reported
    assert again.to_json()["notes"] == list(again.notes)
    provider = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=first.provider_arn)
    assert provider["ThumbprintList"] == [served, *STALE[:4]]
    assert env.access.verify("gina", ACCOUNT).ok
    assert env.access.grant("gina", ACCOUNT, ticket="T-3", ttl=dt.timedelta(hours=1)).notes == ()
    env.access.revoke("gina", ACCOUNT)
    assert_nothing_left(env, "gina")


def test_reconcile_notices_a_provider_without_the_served_thumbprint(env: LocalEnvironment) -> None:
    grant = env.access.grant("gus", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    served = grant.thumbprints[0]
    iam = admin_iam(env)
    iam.update_open_id_connect_provider_thumbprint(
        OpenIDConnectProviderArn=grant.provider_arn, ThumbprintList=STALE
    )
    actions = env.access.reconcile(ACCOUNT)
    assert [(a.action, a.target, a.detail) for a in actions] == [
        ("completed grant", "DoiT-Support-gus", "thumbprint of the served chain")
    ]
    provider = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=grant.provider_arn)
    assert provider["ThumbprintList"][0] == served
    assert env.access.verify("gus", ACCOUNT).ok
    assert env.access.reconcile(ACCOUNT) == []
    env.access.revoke("gus", ACCOUNT)


def test_expire_revokes_only_what_is_past_its_expiry(env: LocalEnvironment) -> None:
    env.access.grant("hank", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    env.access.grant("ivy", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=3))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    actions = env.access.expire(later)
    assert any(a.action == "expired" and a.target == "DoiT-Support-hank" for a in actions)
    assert_nothing_left(env, "hank")
    assert "DoiT-Support-ivy" in doit_roles(env)
    env.access.revoke("ivy", ACCOUNT)


def test_reconcile_removes_half_made_grants_and_orphans(env: LocalEnvironment) -> None:
    scheme = env.access.scheme
    # 1. a key with no role (a grant that died after key generation)
    orphan_key = env.store.generate(KeySpec.EC_P256, Binding("jack", ACCOUNT))
    # 2. a grant whose key was destroyed behind its back
    env.access.grant("kate", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    kate_key = env.store.find(Binding("kate", ACCOUNT))
    assert kate_key is not None
    env.store.destroy(kate_key.kid)
    # 3. a provider of ours with neither key nor role
    admin_iam(env).create_open_id_connect_provider(
        Url=scheme.issuer(Binding("liam", ACCOUNT)),
        ClientIDList=["sts.amazonaws.com"],
        ThumbprintList=["a" * 40],
    )
    # 4. a provider that is not ours: left alone
    foreign = admin_iam(env).create_open_id_connect_provider(
        Url="https://token.actions.githubusercontent.com",
        ClientIDList=["sts.amazonaws.com"],
        ThumbprintList=["b" * 40],
    )["OpenIDConnectProviderArn"]

    actions = env.access.reconcile(ACCOUNT)
    text = "\n".join(str(a) for a in actions)
    assert orphan_key.kid in text and "DoiT-Support-kate" in text and "liam" in text
    for staff in ("jack", "kate", "liam"):
        assert_nothing_left(env, staff)
    assert foreign in providers(env)
    assert env.access.reconcile(ACCOUNT) == []  # nothing left to repair
    admin_iam(env).delete_open_id_connect_provider(OpenIDConnectProviderArn=foreign)


def test_reconcile_completes_a_grant_missing_its_provider(env: LocalEnvironment) -> None:
    grant = env.access.grant("mia", ACCOUNT, ticket="T-7", ttl=dt.timedelta(hours=1))
    admin_iam(env).delete_open_id_connect_provider(OpenIDConnectProviderArn=grant.provider_arn)
    assert not env.access.verify("mia", ACCOUNT).ok
    actions = env.access.reconcile(ACCOUNT)
    assert [a.action for a in actions] == ["completed grant"]
    assert env.access.verify("mia", ACCOUNT).ok
    env.access.revoke("mia", ACCOUNT)


def test_verify_names_what_is_wrong(env: LocalEnvironment) -> None:
    grant = env.access.grant("noah", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    env.access.publisher.unpublish(f"{ACCOUNT}/noah")
    report = env.access.verify("noah", ACCOUNT)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert "discovery" in failed and "404" in failed["discovery"]
    assert {c.name for c in report.checks if c.ok} >= {
        "onboarded",
        "role",
        "key",
        "provider",
        "thumbprint",
        "trust",
    }
    env.access.revoke("noah", ACCOUNT)
    assert grant.kid not in {k.kid for k in env.store.list_keys()}


def test_inline_policy_added_by_someone_else_is_a_clear_conflict(env: LocalEnvironment) -> None:
    env.access.grant("olga", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    admin_iam(env).put_role_policy(
        RoleName="DoiT-Support-olga",
        PolicyName="extra",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
            }
        ),
    )
    with pytest.raises(AccessDeniedError, match="DeleteRolePolicy"):
        env.access.revoke("olga", ACCOUNT)
    admin_iam(env).delete_role_policy(RoleName="DoiT-Support-olga", PolicyName="extra")
    env.access.revoke("olga", ACCOUNT)
    assert_nothing_left(env, "olga")


def test_role_description_carries_the_marker_and_fits_iam_limits(env: LocalEnvironment) -> None:
    staff = "p" * 51
    env.access.grant(staff, ACCOUNT, ticket="T" * 64, ttl=dt.timedelta(hours=1), alg="ES512")
    description = admin_iam(env).get_role(RoleName=f"DoiT-Support-{staff}")["Role"]["Description"]
    assert description.startswith(MARKER) and len(description) <= 1000
    env.access.revoke(staff, ACCOUNT)


@pytest.mark.softhsm
def test_full_flow_on_softhsm(pkcs11_env: dict[str, str], tmp_path: Path) -> None:
    from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore

    store: KeyStore
    with Pkcs11KeyStore() as store, LocalEnvironment(tmp_path, store) as local:
        local.onboard(SOFTHSM_ACCOUNT)
        grant = local.access.grant(
            "quinn", SOFTHSM_ACCOUNT, ticket="CS-9", ttl=dt.timedelta(hours=1), alg="RS256"
        )
        assert local.access.verify("quinn", SOFTHSM_ACCOUNT).ok
        identity = local.aws.client(
            "sts", local.access.credentials("quinn", SOFTHSM_ACCOUNT)
        ).get_caller_identity()
        assert identity["Account"] == SOFTHSM_ACCOUNT
        local.access.revoke("quinn", SOFTHSM_ACCOUNT)
        assert store.find(Binding("quinn", SOFTHSM_ACCOUNT)) is None
        assert grant.kid not in {k.kid for k in store.list_keys()}
        response = local.send_hook("Delete", SOFTHSM_ACCOUNT)
        assert response["Status"] == "SUCCESS" and local.registry.get(SOFTHSM_ACCOUNT) is None


def test_a_foreign_staff_policy_stops_the_grant_before_anything_is_written(env: LocalEnvironment) -> None:
    iam = admin_iam(env)
    arn = iam.create_policy(
        PolicyName="DoiT-Support-pat",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:List*", "Resource": "*"}],
            }
        ),
    )["Policy"]["Arn"]
    with pytest.raises(NotOwnedError, match="DoiT-Support-pat"):
        env.access.grant("pat", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    assert "DoiT-Support-pat" not in doit_roles(env)
    assert not [p for p in providers(env) if p.endswith("/pat")]
    assert env.store.find(Binding("pat", ACCOUNT)) is None
    iam.delete_policy(PolicyArn=arn)


def test_a_new_grant_that_fails_half_way_leaves_no_usable_access(
    env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AccessDeniedError(
            "CreatePolicy failed: AccessDenied", operation="CreatePolicy", code="AccessDenied"
        )

    monkeypatch.setattr(env.access, "_ensure_staff_policy", refuse)
    with pytest.raises(AccessDeniedError):
        env.access.grant("quin", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    monkeypatch.undo()
    assert_nothing_left(env, "quin")


def test_duplicate_keys_left_by_a_race_are_cleaned_up(env: LocalEnvironment) -> None:
    grant = env.access.grant("rita", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    binding = Binding("Rita", ACCOUNT)
    # what a second process generating at the same moment would have left (bypasses the in-process lock)
    duplicate = env.store._generate(KeySpec.EC_P256, binding, "hsm-keys/dup", dt.datetime.now(dt.UTC))
    actions = env.access.reconcile(ACCOUNT)
    assert [(a.action, a.target) for a in actions] == [("destroyed duplicate key", duplicate.kid)]
    assert env.access.verify("rita", ACCOUNT).ok
    assert {k.kid for k in env.store.list_keys() if k.binding.same_as(binding)} == {grant.kid}
    # and revoke destroys every key of the binding, duplicates included
    env.store._generate(KeySpec.EC_P256, binding, "hsm-keys/dup2", dt.datetime.now(dt.UTC))
    env.access.revoke("rita", ACCOUNT)
    assert_nothing_left(env, "rita")


@pytest.mark.parametrize(
    "ttl", [dt.timedelta(microseconds=1), dt.timedelta(seconds=59), -dt.timedelta(hours=1)]
)
def test_ttl_below_a_minute_is_rejected(env: LocalEnvironment, ttl: dt.timedelta) -> None:
    with pytest.raises(InvalidInputError, match="ttl"):
        env.access.grant("sam", ACCOUNT, ticket="T-1", ttl=ttl)


def test_expire_carries_on_past_an_account_it_cannot_clean(env: LocalEnvironment) -> None:
    env.access.grant("tess", OTHER_ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    admin_iam(env, OTHER_ACCOUNT).put_role_policy(
        RoleName="DoiT-Support-tess",
        PolicyName="x",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
            }
        ),
    )
    env.access.grant("uma", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    actions = env.access.expire(dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    failed = [a for a in actions if not a.ok]
    assert [(a.account, a.target) for a in failed] == [(OTHER_ACCOUNT, "DoiT-Support-tess")]
    assert_nothing_left(env, "uma")
    admin_iam(env, OTHER_ACCOUNT).delete_role_policy(RoleName="DoiT-Support-tess", PolicyName="x")
    env.access.revoke("tess", OTHER_ACCOUNT)


def test_a_role_whose_description_names_another_staff_member_is_not_ours(env: LocalEnvironment) -> None:
    env.access.grant("vera", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    vera = env.access.list_grants(ACCOUNT)
    forged = GrantRecord("vera", "T-1", dt.datetime.now(dt.UTC), "x" * 43, SignatureAlgorithm.ES256)
    iam = admin_iam(env)
    iam.create_role(
        RoleName="DoiT-Support-walt",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": ACCOUNT}, "Action": "sts:AssumeRole"}],
            }
        ),
        Description=forged.to_description(),
    )
    assert env.access.list_grants(ACCOUNT) == vera
    assert env.access.reconcile(ACCOUNT) == []
    assert env.access.verify("vera", ACCOUNT).ok
    # revoke and grant ask the same question as list_grants and reconcile: walt's role is not ours
    with pytest.raises(NotOwnedError):
        env.access.revoke("walt", ACCOUNT)
    with pytest.raises(NotOwnedError):
        env.access.grant("walt", ACCOUNT, ticket="T-2", ttl=dt.timedelta(hours=1))
    with pytest.raises(OnboardingError, match="no grant"):
        env.access.credentials("walt", ACCOUNT)
    role = iam.get_role(RoleName="DoiT-Support-walt")["Role"]
    assert role["Description"] == forged.to_description()
    assert env.store.find(Binding("walt", ACCOUNT)) is None
    iam.delete_role(RoleName="DoiT-Support-walt")
    env.access.revoke("vera", ACCOUNT)


def test_a_staff_policy_whose_description_names_another_staff_member_is_not_ours(
    env: LocalEnvironment,
) -> None:
    iam = admin_iam(env)
    arn = iam.create_policy(
        PolicyName="DoiT-Support-xena",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:List*", "Resource": "*"}],
            }
        ),
        Description=f"{MARKER}; staff=yuri; extra read-only support permissions",
    )["Policy"]["Arn"]
    with pytest.raises(NotOwnedError, match="DoiT-Support-xena"):
        env.access.grant("xena", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))
    actions = env.access.revoke("xena", ACCOUNT)
    assert [a.action for a in actions] == ["left alone"]
    assert iam.get_policy(PolicyArn=arn)["Policy"]["PolicyName"] == "DoiT-Support-xena"
    iam.delete_policy(PolicyArn=arn)


def test_concurrent_grants_of_one_pair_leave_one_working_grant(
    env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads grant the same pair at once; neither may undo what the other made."""
    barrier = threading.Barrier(2, timeout=1.0)
    original = env.access._check_staff_policy_owned

    def racing(*args: Any) -> None:
        original(*args)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # both past their reads, if nothing serialises them

    monkeypatch.setattr(env.access, "_check_staff_policy_owned", racing)
    results: list[object] = []

    def run(ticket: str) -> None:
        try:
            results.append(env.access.grant("yann", ACCOUNT, ticket=ticket, ttl=dt.timedelta(hours=1)))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(f"T-{i}",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    monkeypatch.undo()
    assert not [r for r in results if isinstance(r, BaseException)], results
    kids = {r.kid for r in results}  # type: ignore[attr-defined]
    assert len(kids) == 1
    assert {k.kid for k in env.store.list_keys() if k.binding.same_as(Binding("yann", ACCOUNT))} == kids
    report = env.access.verify("yann", ACCOUNT)
    assert report.ok, str(report)
    env.access.revoke("yann", ACCOUNT)
    assert_nothing_left(env, "yann")


@pytest.mark.parametrize(
    ("point", "error"),
    [
        ("_check_staff_policy_owned", "already has key"),  # the loser's key generation fails
        ("_ensure_provider", "EntityAlreadyExists"),  # the loser made the key, the winner the role
    ],
)
def test_a_losing_grant_rolls_back_only_what_it_created(
    env: LocalEnvironment, monkeypatch: pytest.MonkeyPatch, point: str, error: str
) -> None:
    """A grant of the same pair (another process, here run re-entrantly) completes between the
    loser's reads and its writes; the loser fails, and its rollback must leave the winner intact."""
    original = getattr(env.access, point)
    winners: list[object] = []

    def interleaved(*args: Any, **kwargs: Any) -> Any:
        if not winners:
            winners.append("running")
            winners[0] = env.access.grant("zoe", ACCOUNT, ticket="WIN-1", ttl=dt.timedelta(hours=1))
        return original(*args, **kwargs)

    monkeypatch.setattr(env.access, point, interleaved)
    with pytest.raises(HsmKeysError, match=error):
        env.access.grant("zoe", ACCOUNT, ticket="LOSE-1", ttl=dt.timedelta(hours=1))
    monkeypatch.undo()
    report = env.access.verify("zoe", ACCOUNT)
    assert report.ok, str(report)
    assert [g.ticket for g in env.access.list_grants(ACCOUNT) if g.staff == "zoe"] == ["WIN-1"]
    env.access.revoke("zoe", ACCOUNT)
    assert_nothing_left(env, "zoe")


def test_an_account_in_another_partition_is_granted_with_its_own_arns(
    env: LocalEnvironment, evaluator: PolicyEvaluator
) -> None:
    """aws-cn: every ARN (scope check, provider, SecurityAudit, staff policy) is in the account's
    partition, taken from its registered management role ARN."""
    account, region = "486248624862", "cn-north-1"
    operations = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=region
    )
    admin = operations.client("sts", endpoint_url=env.aws.endpoint_url).assume_role(
        RoleArn=f"arn:aws-cn:iam::{account}:role/customer-admin", RoleSessionName="customer-admin"
    )["Credentials"]
    customer = boto3.Session(
        aws_access_key_id=admin["AccessKeyId"],
        aws_secret_access_key=admin["SecretAccessKey"],
        aws_session_token=admin["SessionToken"],
        region_name=region,
    )
    cloudformation = customer.client("cloudformation", endpoint_url=env.aws.endpoint_url)
    stack_id = cloudformation.create_stack(
        StackName="DoiT-support-access",
        TemplateBody=templates.template_json(exclude_types={templates.HOOK_RESOURCE_TYPE}),
        Parameters=[
            {"ParameterKey": "AccountNumberParameter", "ParameterValue": "123456789012"},
            {"ParameterKey": "ServiceToken", "ParameterValue": "arn:aws-cn:sns:cn-north-1:123456789012:t"},
        ],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )["StackId"]
    outputs = cloudformation.describe_stacks(StackName=stack_id)["Stacks"][0]["Outputs"]
    role_arn = next(o["OutputValue"] for o in outputs if o["OutputKey"] == "ManagementRoleArn")
    assert role_arn.startswith("arn:aws-cn:iam::")
    env.registry.register(AccountRegistration(account, role_arn, stack_id, dt.datetime.now(dt.UTC)))

    china = AwsEnvironment(
        session=operations,
        region=region,
        endpoint_url=env.aws.endpoint_url,
        retries=AwsCaller(base_delay=0.05),
    )
    calls = CallRecorder()
    china.client_hooks.append(lambda client, acct: calls.attach(client, account_id=acct, partition="aws-cn"))
    access = SupportAccess(env.store, env.registry, china, env.access.publisher, env.access.settings)
    try:
        grant = access.grant("li.wei", account, ticket="CN-1", ttl=dt.timedelta(hours=1))
        assert grant.role_arn == f"arn:aws-cn:iam::{account}:role/DoiT-Support-li.wei"
        assert (
            grant.provider_arn
            == f"arn:aws-cn:iam::{account}:oidc-provider/idp.hsm-keys.test/{account}/li.wei"
        )
        assert grant.staff_policy_arn == f"arn:aws-cn:iam::{account}:policy/DoiT-Support-li.wei"
        iam = customer.client("iam", endpoint_url=env.aws.endpoint_url)
        attached = {
            p["PolicyArn"]
            for p in iam.list_attached_role_policies(RoleName="DoiT-Support-li.wei")["AttachedPolicies"]
        }
        assert attached == {"arn:aws-cn:iam::aws:policy/SecurityAudit", grant.staff_policy_arn}
        trust = iam.get_role(RoleName="DoiT-Support-li.wei")["Role"]["AssumeRolePolicyDocument"]
        assert trust["Statement"][0]["Principal"] == {"Federated": grant.provider_arn}
        report = access.verify("li.wei", account)
        assert report.ok, str(report)
        identity = china.client("sts", access.credentials("li.wei", account)).get_caller_identity()
        assert identity["Account"] == account  # (moto names web-identity sessions in aws-cn user/moto)
        assert [g.staff for g in access.list_grants(account)] == ["li.wei"]
        assert access.reconcile(account) == []
        access.revoke("li.wei", account)
        assert not [r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("DoiT-Support")]
        assert iam.list_open_id_connect_providers()["OpenIDConnectProviderList"] == []
        assert env.store.find(Binding("li.wei", account)) is None
    finally:
        env.registry.deregister(account, stack_id=stack_id)
    assert {c.partition for c in calls.calls} == {"aws-cn"} and calls.calls
    PolicyEvaluator.assert_all_allowed(evaluator.evaluate_recorded(calls, partition="aws-cn"))


def test_reconcile_removes_staff_policies_and_issuer_documents_left_without_key_and_role(
    env: LocalEnvironment, recorder: CallRecorder
) -> None:
    iam = admin_iam(env)
    document = json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:List*", "Resource": "*"}]}
    )
    ours = iam.create_policy(
        PolicyName="DoiT-Support-hal",
        PolicyDocument=document,
        Description=f"{MARKER}; staff=hal; extra read-only support permissions",
    )["Policy"]["Arn"]
    foreign = iam.create_policy(PolicyName="DoiT-Support-ian", PolicyDocument=document)["Policy"]["Arn"]
    env.access.publisher.publish(f"{ACCOUNT}/jill", {"jwks.json": b'{"keys": []}\n'})
    kept = env.access.grant("kim", ACCOUNT, ticket="T-1", ttl=dt.timedelta(hours=1))  # a live grant stays

    actions = env.access.reconcile(ACCOUNT)
    assert sorted((a.action, a.target, a.detail) for a in actions) == [
        ("deleted policy", ours, "no key and no role"),
        ("unpublished issuer", f"https://idp.hsm-keys.test/{ACCOUNT}/jill", "no key"),
    ]
    assert "DoiT-Support-hal" not in doit_policies(env) and "DoiT-Support-ian" in doit_policies(env)
    assert f"{ACCOUNT}/jill" not in env.access.publisher.published()
    assert env.access.verify("kim", ACCOUNT).ok and kept.kid == env.access.list_grants(ACCOUNT)[0].kid
    assert env.access.reconcile(ACCOUNT) == []
    iam.delete_policy(PolicyArn=foreign)
    env.access.revoke("kim", ACCOUNT)


def test_reconcile_of_an_unregistered_account_cleans_its_keys_and_issuers_without_aws(
    env: LocalEnvironment, recorder: CallRecorder, operations_calls: CallRecorder
) -> None:
    gone = "999988887777"  # its stack was deleted while the Delete never reached us
    key = env.store.generate(KeySpec.EC_P256, Binding("lena", gone))
    env.access.publisher.publish(f"{gone}/lena", {"jwks.json": b'{"keys": []}\n'})
    env.access.publisher.publish(f"{gone}/mo", {"jwks.json": b'{"keys": []}\n'})
    assert gone in env.access.orphaned_accounts()
    assert ACCOUNT not in env.access.orphaned_accounts()

    actions = env.access.reconcile(gone)
    assert sorted((a.account, a.action, a.target, a.detail) for a in actions) == [
        (gone, "destroyed key", key.kid, "account not registered"),
        (gone, "unpublished issuer", f"https://idp.hsm-keys.test/{gone}/lena", "account not registered"),
        (gone, "unpublished issuer", f"https://idp.hsm-keys.test/{gone}/mo", "account not registered"),
    ]
    assert recorder.calls == [] and operations_calls.calls == []  # nothing in AWS was touched
    assert env.store.find(Binding("lena", gone)) is None
    assert not [p for p in env.access.publisher.published() if p.startswith(gone)]
    assert gone not in env.access.orphaned_accounts()
    assert env.access.reconcile(gone) == []
    with pytest.raises(InvalidBindingError):
        env.access.reconcile("12345")


def test_stack_delete_revokes_every_live_grant_through_onboarding(
    env: LocalEnvironment, recorder: CallRecorder
) -> None:
    """The customer deletes the stack: the real handler and SupportAccess remove everything while the
    management role still exists and answer SUCCESS; every IAM call is evaluated (``recorder``)."""
    account = "313131313131"
    assert env.onboard(account)["Status"] == "SUCCESS"
    grants = [
        env.access.grant("nia", account, ticket="T-1", ttl=dt.timedelta(hours=1)),
        env.access.grant("omar", account, ticket="T-2", ttl=dt.timedelta(hours=2), alg="RS256"),
    ]
    env.store.generate(KeySpec.EC_P256, Binding("pia", account))  # and a half-made grant's key
    assert all(env.access.verify(g.staff, account).ok for g in grants)
    start = len(recorder.calls)  # (the recorder keeps every call: all are evaluated at teardown)

    response = env.send_hook("Delete", account)
    assert response["Status"] == "SUCCESS", response["Reason"]
    assert response["PhysicalResourceId"] == env.customers[account].physical_resource_id
    assert env.registry.get(account) is None
    assert doit_roles(env, account) == []
    assert providers(env, account) == []
    assert doit_policies(env, account) == []
    assert not [k for k in env.store.list_keys() if k.binding.account == account]
    assert not [p for p in env.access.publisher.published() if f"/{account}/" in f"/{p}/"]
    operations = [call.operation for call in recorder.calls[start:]]
    assert operations.count("DeleteRole") == 2 and operations.count("DeleteOpenIDConnectProvider") == 2
    assert operations.count("DeletePolicy") == 2
    # a repeated Delete (CloudFormation retries) answers SUCCESS and touches nothing
    start = len(recorder.calls)
    assert env.send_hook("Delete", account)["Status"] == "SUCCESS"
    assert recorder.calls[start:] == []
