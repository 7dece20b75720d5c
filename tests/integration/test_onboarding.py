"""The Custom::Hook handler against a real local HTTP server acting as CloudFormation's ResponseURL.

The customer's stack is deployed by moto's CloudFormation (without the hook, which moto cannot
deliver) and the handler gets the event CloudFormation would send. Every path must PUT exactly one
answer, and the handler must never raise.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from hsm_keys.errors import AwsError, OnboardingError
from hsm_keys.keystore import MemoryKeyStore
from hsm_keys.local.environment import LocalEnvironment, hook_event
from hsm_keys.provisioning.aws import AwsEnvironment
from hsm_keys.provisioning.cancellation import Cancellation
from hsm_keys.provisioning.onboarding import (
    MAX_RESPONSE_BYTES,
    OnboardingHandler,
    allow_loopback_response_urls,
    physical_resource_id,
    put_response,
)
from hsm_keys.provisioning.registry import AccountRegistration, FileAccountRegistry, MemoryAccountRegistry

SIGNATURE = "c0ffee0123456789abcdef"
ACCOUNT = "111122223333"
GUID = "1fd0cbc7-16ea-462b-ac47-e251b3b57bc2"
STACK = f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/DoiT-support-access/{GUID}"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/DoiT_Management_Role_DO-NOT-DELETE"


# -- a ResponseURL sink ---------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def document(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None


@dataclass
class Sink:
    """A loopback HTTP server that records each request and answers with queued status codes."""

    base: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, stack_id: str = STACK, request_id: str = "r") -> str:
        """A URL shaped like CloudFormation's: an encoded object key and a SigV4 query."""
        key = f"{stack_id}|NotifyHook|{request_id}".replace(":", "%3A").replace("|", "%7C")
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20250101T000000Z&X-Amz-SignedHeaders=host"
            "&X-Amz-Expires=7200&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Signature={SIGNATURE}"
        )
        return f"{self.base}/{key}?{query}"

    def only(self) -> Received:
        assert len(self.received) == 1, f"expected exactly one answer, got {len(self.received)}"
        return self.received[0]


@pytest.fixture
def sink() -> Iterator[Sink]:
    state = Sink(base="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.received.append(Received("PUT", self.path, list(self.headers.items()), body))
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- fakes ----------------------------------------------------------------------------------------


@dataclass
class Report:
    complete: bool = True
    text: str = "2 grants revoked"

    def summary(self) -> str:
        return self.text


@dataclass
class FakeRevoker:
    """Records calls; ``revoke`` / ``purge`` are a Report to return or an exception to raise."""

    revoke: Report | BaseException = field(default_factory=Report)
    purge: Report | BaseException = field(default_factory=lambda: Report(text="keys destroyed"))
    calls: list[tuple[str, str]] = field(default_factory=list)
    gate: threading.Event | None = None

    def revoke_account(self, account_id: str) -> Report:
        self.calls.append(("revoke", account_id))
        if self.gate is not None:
            self.gate.wait()
        if isinstance(self.revoke, BaseException):
            raise self.revoke
        return self.revoke

    def purge_account_offline(self, account_id: str) -> Report:
        self.calls.append(("purge", account_id))
        if isinstance(self.purge, BaseException):
            raise self.purge
        return self.purge


@dataclass
class Context:
    millis: int

    def get_remaining_time_in_millis(self) -> int:
        return self.millis


def make_event(
    sink: Sink,
    request_type: str = "Create",
    *,
    stack_id: str = STACK,
    account: str = ACCOUNT,
    role_arn: str = ROLE_ARN,
    physical_id: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    request_id = str(uuid.uuid4())
    event: dict[str, Any] = {
        "RequestType": request_type,
        "ServiceToken": "arn:aws:sns:us-east-1:123456789012:hsm-keys-onboarding",
        "ResponseURL": sink.url(stack_id, request_id),
        "StackId": stack_id,
        "RequestId": request_id,
        "LogicalResourceId": "NotifyHook",
        "ResourceType": "Custom::Hook",
        # Version is a resource attribute of the hook: CloudFormation does not send it as a property.
        "ResourceProperties": {
            "ServiceToken": "arn:aws:sns:us-east-1:123456789012:hsm-keys-onboarding",
            "RoleArn": role_arn,
            "AccountId": account,
        },
    }
    if request_type != "Create":
        event["PhysicalResourceId"] = physical_id or physical_resource_id(stack_id, account)
    if request_type == "Update":
        event["OldResourceProperties"] = dict(event["ResourceProperties"])
    event.update(overrides)
    return event


def make_handler(registry: Any = None, revoker: Any = None, **kwargs: Any) -> OnboardingHandler:
    return OnboardingHandler(
        registry if registry is not None else MemoryAccountRegistry(),
        revoker if revoker is not None else FakeRevoker(),
        response_url_check=allow_loopback_response_urls,
        sleep=lambda _: None,
        **kwargs,
    )


# -- the main flow, on a stack moto really deployed ------------------------------------------------


def test_create_update_delete_of_a_deployed_stack(
    sink: Sink, deployed_stack: Any, assume_role: Any, tmp_path: Path
) -> None:
    registry = FileAccountRegistry(tmp_path / "registry.json")
    revoker = FakeRevoker()

    def role_check(registration: AccountRegistration) -> None:
        assume_role(registration.role_arn)  # the management role really is assumable

    handler = make_handler(registry, revoker, role_check=role_check)
    properties = deployed_stack.hook_properties()
    account, stack_id = deployed_stack.account_id, deployed_stack.stack_id

    create = make_event(sink, stack_id=stack_id, account=account, ResourceProperties=properties)
    result = handler(create, Context(60_000))
    answer = sink.only()
    assert answer.method == "PUT"
    assert answer.path == create["ResponseURL"].removeprefix(sink.base)  # byte for byte
    assert answer.header("Content-Type") == ""
    assert answer.header("Content-Length") == str(len(answer.body))
    assert len(answer.body) <= MAX_RESPONSE_BYTES
    document = answer.document
    expected_id = physical_resource_id(stack_id, account)
    assert document == {
        "Status": "SUCCESS",
        "Reason": f"account {account} registered with role {deployed_stack.role_arn}",
        "PhysicalResourceId": expected_id,
        "StackId": stack_id,
        "RequestId": create["RequestId"],
        "LogicalResourceId": "NotifyHook",
        "NoEcho": False,
        "Data": {"AccountId": account, "RoleArn": deployed_stack.role_arn},
    }
    assert result["outcomes"][0]["status"] == "SUCCESS" and result["outcomes"][0]["sent"] is True
    registration = FileAccountRegistry(tmp_path / "registry.json").require(account)
    assert (registration.role_arn, registration.stack_id) == (deployed_stack.role_arn, stack_id)

    sink.received.clear()
    update = make_event(sink, "Update", stack_id=stack_id, account=account, ResourceProperties=properties)
    handler(update, Context(60_000))
    assert sink.only().document["Status"] == "SUCCESS"
    assert sink.only().document["PhysicalResourceId"] == expected_id
    assert revoker.calls == []  # Update never deletes

    sink.received.clear()
    delete = make_event(sink, "Delete", stack_id=stack_id, account=account, ResourceProperties=properties)
    handler(delete, Context(60_000))
    assert sink.only().document["Status"] == "SUCCESS"
    assert sink.only().document["PhysicalResourceId"] == expected_id
    assert revoker.calls == [("revoke", account)]
    assert registry.get(account) is None


def test_create_fails_when_the_role_cannot_be_assumed(
    sink: Sink, deployed_stack: Any, assume_role: Any
) -> None:
    registry = MemoryAccountRegistry()

    def role_check(registration: AccountRegistration) -> None:
        raise OnboardingError(f"cannot assume {registration.role_arn}", code="AccessDenied")

    handler = make_handler(registry, role_check=role_check)
    event = make_event(
        sink,
        stack_id=deployed_stack.stack_id,
        account=deployed_stack.account_id,
        ResourceProperties=deployed_stack.hook_properties(),
    )
    handler(event)
    assert sink.only().document["Status"] == "FAILED"
    assert "cannot assume" in sink.only().document["Reason"]
    assert registry.get(deployed_stack.account_id) is None


# -- delivery ---------------------------------------------------------------------------------------


def test_sns_wrapped_events_are_each_answered(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    other_stack = STACK.replace(ACCOUNT, "222233334444")
    events = [
        make_event(sink),
        make_event(
            sink,
            stack_id=other_stack,
            account="222233334444",
            role_arn=ROLE_ARN.replace(ACCOUNT, "222233334444"),
        ),
    ]
    wrapped = {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "Sns": {"Type": "Notification", "Message": json.dumps(e)},
            }
            for e in events
        ]
    }
    result = make_handler(registry)(wrapped, Context(60_000))
    assert [o["status"] for o in result["outcomes"]] == ["SUCCESS", "SUCCESS"]
    assert sorted(r.document["RequestId"] for r in sink.received) == sorted(e["RequestId"] for e in events)
    assert {r.account_id for r in registry.accounts()} == {ACCOUNT, "222233334444"}


def test_duplicate_create_is_harmless_and_keeps_its_id(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    handler = make_handler(registry)
    event = make_event(sink)
    handler(event)
    handler(event)
    assert [r.document["Status"] for r in sink.received] == ["SUCCESS", "SUCCESS"]
    assert len({r.document["PhysicalResourceId"] for r in sink.received}) == 1
    assert "already registered" in sink.received[1].document["Reason"]
    assert len(registry.accounts()) == 1


def test_late_create_after_delete_does_not_register_again(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    handler = make_handler(registry)
    create = make_event(sink)
    handler(create)
    handler(make_event(sink, "Delete"))
    handler(create)  # a late redelivery
    assert [r.document["Status"] for r in sink.received] == ["SUCCESS", "SUCCESS", "FAILED"]
    assert registry.get(ACCOUNT) is None
    handler(make_event(sink, "Update"))  # a late update neither
    assert registry.get(ACCOUNT) is None


def test_transient_send_failures_are_retried_and_a_refused_url_is_not(sink: Sink) -> None:
    sink.statuses = [503, 500]
    make_handler()(make_event(sink), Context(60_000))
    assert [r.document["RequestId"] for r in sink.received] == [sink.received[0].document["RequestId"]] * 3
    sink.received.clear()
    sink.statuses = [403]
    result = make_handler()(make_event(sink), Context(60_000))
    assert len(sink.received) == 1
    assert result["outcomes"][0]["sent"] is False


def test_an_unreachable_url_is_retried_boundedly_and_never_raises() -> None:
    attempts: list[float] = []

    def sender(url: str, body: bytes, timeout: float) -> None:
        attempts.append(timeout)
        raise OnboardingError("could not send the response (ConnectionRefusedError)", code="SendFailed")

    handler = make_handler(sender=sender, send_attempts=3)
    result = handler(make_event(Sink(base="http://127.0.0.1:9")), Context(60_000))
    assert len(attempts) == 3 and all(0 < t <= 10 for t in attempts)
    assert result["outcomes"][0]["sent"] is False


def test_put_response_to_a_closed_port_raises_without_the_url() -> None:
    url = Sink(base="http://127.0.0.1:9").url()
    with pytest.raises(OnboardingError) as caught:
        put_response(url, b"{}", 2.0)
    assert SIGNATURE not in str(caught.value) and caught.value.__cause__ is None


# -- Delete ----------------------------------------------------------------------------------------


def _registered(registry: MemoryAccountRegistry, stack_id: str = STACK) -> None:
    registry.register(
        AccountRegistration(ACCOUNT, ROLE_ARN, stack_id, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    )


def test_delete_after_a_failed_create_touches_nothing(sink: Sink) -> None:
    registry, revoker = MemoryAccountRegistry(), FakeRevoker()
    handler = make_handler(registry, revoker)
    handler(make_event(sink, role_arn=ROLE_ARN.replace(ACCOUNT, "999988887777")))  # Create fails
    failed = sink.received[0].document
    assert failed["Status"] == "FAILED"
    handler(make_event(sink, "Delete", physical_id=failed["PhysicalResourceId"]))
    assert sink.received[1].document["Status"] == "SUCCESS"
    assert sink.received[1].document["PhysicalResourceId"] == failed["PhysicalResourceId"]
    assert revoker.calls == []


@pytest.mark.parametrize(
    "physical_id",
    ["not-ours", physical_resource_id(STACK.replace("1fd0cbc7", "00000000"), ACCOUNT), ""],
)
def test_delete_of_something_unknown_touches_nothing(sink: Sink, physical_id: str) -> None:
    registry, revoker = MemoryAccountRegistry(), FakeRevoker()
    _registered(registry)
    event = make_event(sink, "Delete")
    event["PhysicalResourceId"] = physical_id
    make_handler(registry, revoker)(event)
    assert sink.only().document["Status"] == "SUCCESS"
    assert revoker.calls == [] and registry.get(ACCOUNT) is not None


def test_delete_of_an_account_another_stack_registered_touches_nothing(sink: Sink) -> None:
    registry, revoker = MemoryAccountRegistry(), FakeRevoker()
    newer = STACK.replace("1fd0cbc7", "99999999")
    _registered(registry, newer)
    make_handler(registry, revoker)(make_event(sink, "Delete"))  # the older stack goes away
    assert sink.only().document["Status"] == "SUCCESS"
    assert revoker.calls == []
    assert registry.require(ACCOUNT).stack_id == newer


def test_delete_when_the_role_is_gone_purges_offline_and_succeeds(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    _registered(registry)
    revoker = FakeRevoker(revoke=OnboardingError("cannot assume the management role", code="AccessDenied"))
    make_handler(registry, revoker)(make_event(sink, "Delete"))
    answer = sink.only().document
    assert answer["Status"] == "SUCCESS"
    assert "keys destroyed and issuers unpublished instead" in answer["Reason"]
    assert revoker.calls == [("revoke", ACCOUNT), ("purge", ACCOUNT)]
    assert registry.get(ACCOUNT) is None


def test_incomplete_revocation_also_purges(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    _registered(registry)
    revoker = FakeRevoker(revoke=Report(complete=False, text="1 role could not be deleted"))
    make_handler(registry, revoker)(make_event(sink, "Delete"))
    assert sink.only().document["Status"] == "SUCCESS"
    assert revoker.calls == [("revoke", ACCOUNT), ("purge", ACCOUNT)]


def test_delete_fails_and_keeps_the_account_when_nothing_could_be_revoked(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    _registered(registry)
    revoker = FakeRevoker(revoke=AwsError("throttled"), purge=RuntimeError("HSM unreachable"))
    make_handler(registry, revoker)(make_event(sink, "Delete"))
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert "retry the stack deletion" in answer["Reason"]
    assert "HSM unreachable" not in answer["Reason"]  # foreign exception text stays in our logs
    assert registry.get(ACCOUNT) is not None


def _join_late_work() -> None:
    """Wait for onboarding work threads that outlived their answer."""
    for thread in threading.enumerate():
        if thread.name == "hsm-keys-onboarding":
            thread.join(timeout=10)
            assert not thread.is_alive()


def test_the_deadline_is_answered_before_lambda_stops(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    _registered(registry)
    gate = threading.Event()
    revoker = FakeRevoker(gate=gate)
    try:
        result = make_handler(registry, revoker)(make_event(sink, "Delete"), Context(600))
    finally:
        gate.set()
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert "deadline" in answer["Reason"]
    assert result["outcomes"][0]["sent"] is True
    # the revocation returns after the answer: the late work must not deregister (nor purge)
    _join_late_work()
    assert revoker.calls == [("revoke", ACCOUNT)]
    assert registry.require(ACCOUNT).stack_id == STACK and not registry.is_retired(STACK)
    assert len(sink.received) == 1


def test_a_create_answered_failed_at_the_deadline_never_registers_later(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    gate = threading.Event()
    checked: list[str] = []

    def slow_role_check(registration: AccountRegistration) -> None:
        gate.wait(10)
        checked.append(registration.account_id)

    try:
        make_handler(registry, role_check=slow_role_check)(make_event(sink), Context(600))
    finally:
        gate.set()
    assert sink.only().document["Status"] == "FAILED" and "deadline" in sink.only().document["Reason"]
    _join_late_work()
    assert checked == [ACCOUNT]  # the late work did go on ...
    assert registry.get(ACCOUNT) is None  # ... and could not commit
    assert len(sink.received) == 1


def test_a_commit_in_progress_at_the_deadline_is_waited_for_and_answered_truly(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowRegistry(MemoryAccountRegistry):
        def register(self, registration: AccountRegistration, **kwargs: Any) -> bool:
            entered.set()
            release.wait(10)
            return super().register(registration, **kwargs)

    original = Cancellation.cancel

    def cancel(self: Cancellation, reason: str, *, timeout: float | None = None) -> bool:
        assert entered.is_set()
        release.set()  # the registry write in progress ends while the deadline path waits for it
        return original(self, reason, timeout=timeout)

    monkeypatch.setattr(Cancellation, "cancel", cancel)
    registry = SlowRegistry()
    try:
        make_handler(registry, response_reserve=0.5)(make_event(sink), Context(1500))
    finally:
        release.set()
    assert sink.only().document["Status"] == "SUCCESS"  # it was registered: saying FAILED would lie
    assert registry.require(ACCOUNT).role_arn == ROLE_ARN


def test_no_time_left_still_answers_without_working(sink: Sink) -> None:
    revoker = FakeRevoker()
    registry = MemoryAccountRegistry()
    _registered(registry)
    make_handler(registry, revoker)(make_event(sink, "Delete"), Context(0))
    assert sink.only().document["Status"] == "FAILED"
    assert revoker.calls == []


# -- bad input: one FAILED answer each, nothing registered -----------------------------------------


def _props(**changes: Any) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "ServiceToken": "arn:aws:sns:us-east-1:123456789012:hsm-keys-onboarding",
        "RoleArn": ROLE_ARN,
        "AccountId": ACCOUNT,
    }
    properties.update(changes)
    return {k: v for k, v in properties.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"ResourceProperties": _props(RoleArn=None)}, "RoleArn"),
        ({"ResourceProperties": _props(AccountId=None)}, "AccountId"),
        ({"ResourceProperties": _props(AccountId="12345")}, "AccountId"),
        ({"ResourceProperties": _props(AccountId=111122223333)}, "AccountId"),
        ({"ResourceProperties": _props(AccountId="222233334444")}, "accounts disagree"),
        (
            {"ResourceProperties": _props(RoleArn=ROLE_ARN.replace(ACCOUNT, "222233334444"))},
            "accounts disagree",
        ),
        ({"ResourceProperties": _props(RoleArn=ROLE_ARN.replace("arn:aws:", "arn:aws-cn:"))}, "partition"),
        ({"ResourceProperties": _props(RoleArn=f"arn:aws:iam::{ACCOUNT}:user/x")}, "RoleArn"),
        ({"ResourceProperties": _props(Version="2.0")}, "Version"),
        ({"ResourceProperties": _props(ServiceToken=None)}, "ServiceToken"),
        ({"ResourceProperties": "not a mapping"}, "ResourceProperties"),
        ({"ResourceProperties": None}, "ResourceProperties"),
        ({"StackId": STACK.replace(ACCOUNT, "222233334444")}, "accounts disagree"),
        ({"StackId": "not-a-stack"}, "StackId"),
        ({"RequestType": "Rollback"}, "unknown RequestType"),
        ({"RequestType": None}, "unknown RequestType"),
        ({"LogicalResourceId": None}, "LogicalResourceId"),
    ],
)
def test_bad_requests_get_one_failed_answer(sink: Sink, overrides: dict[str, Any], reason: str) -> None:
    registry = MemoryAccountRegistry()
    event = make_event(sink)
    event.update(overrides)
    result = make_handler(registry)(event, Context(60_000))
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert reason in answer["Reason"]
    assert answer["PhysicalResourceId"].startswith("hsm-keys-onboarding-")
    assert registry.accounts() == []
    assert result["outcomes"][0]["sent"] is True


@pytest.mark.parametrize("properties", [_props(), _props(Version="1.0")], ids=["without", "with-1.0"])
def test_version_is_optional_in_the_properties_but_checked_when_sent(
    sink: Sink, properties: dict[str, Any]
) -> None:
    """The template's Version is a resource attribute, so CloudFormation sends no Version property."""
    registry = MemoryAccountRegistry()
    make_handler(registry)(make_event(sink, ResourceProperties=properties), Context(60_000))
    assert sink.only().document["Status"] == "SUCCESS", sink.only().document["Reason"]
    assert registry.require(ACCOUNT).role_arn == ROLE_ARN


def test_update_with_bad_properties_fails_and_keeps_everything(sink: Sink) -> None:
    registry, revoker = MemoryAccountRegistry(), FakeRevoker()
    _registered(registry)
    event = make_event(sink, "Update", ResourceProperties=_props(Version="9"))
    make_handler(registry, revoker)(event)
    answer = sink.only().document
    assert (answer["Status"], answer["PhysicalResourceId"]) == ("FAILED", event["PhysicalResourceId"])
    assert registry.get(ACCOUNT) is not None and revoker.calls == []


def test_update_cannot_move_or_steal_an_onboarding(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    newer = STACK.replace("1fd0cbc7", "99999999")
    _registered(registry, newer)
    handler = make_handler(registry)
    handler(make_event(sink, "Update"))  # an older stack's late update
    handler(make_event(sink, "Update", physical_id="hsm-keys-onboarding-222233334444-0000"))
    assert [r.document["Status"] for r in sink.received] == ["FAILED", "FAILED"]
    assert sink.received[1].document["PhysicalResourceId"] == "hsm-keys-onboarding-222233334444-0000"
    assert registry.require(ACCOUNT).stack_id == newer


def test_unexpected_errors_answer_failed_without_internals(sink: Sink) -> None:
    class BrokenRegistry(MemoryAccountRegistry):
        def register(self, registration: AccountRegistration, *, take_over: bool = True) -> bool:
            raise KeyError("internal detail /srv/secret/path")

    make_handler(BrokenRegistry())(make_event(sink))
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert "KeyError" in answer["Reason"] and "/srv/secret" not in answer["Reason"]


@pytest.mark.parametrize(
    "url",
    [
        None,
        "https://evil.example/x?X-Amz-Signature=1",
        "http://10.0.0.1/x",
        f"https://s3.amazonaws.com/b/k?X-Amz-Signature={SIGNATURE}",  # not fully pre-signed
    ],
)
def test_refused_response_urls_get_no_request_at_all(
    sink: Sink, url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[str] = []
    handler = make_handler(sender=lambda u, b, t: sent.append(u))
    event = make_event(sink, ResponseURL=url)
    with caplog.at_level(logging.INFO, logger="hsm_keys"):
        result = handler(event)
    assert sent == [] and sink.received == []
    assert result["outcomes"][0]["sent"] is False and result["outcomes"][0]["status"] is None
    assert SIGNATURE not in caplog.text


def test_the_response_url_signature_is_never_logged(sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="hsm_keys"):
        make_handler()(make_event(sink))
        sink.statuses = [500, 500, 500]
        make_handler()(make_event(sink))
    assert "answered" in caplog.text
    assert SIGNATURE not in caplog.text


@pytest.mark.parametrize(
    "event", [None, [], "text", 42, {}, {"Records": "x"}, {"Records": [None, {"Sns": {"Message": "{bad"}}]}]
)
def test_garbage_never_raises(event: Any) -> None:
    result = make_handler()(event, Context(1000))
    assert all(o["sent"] is False for o in result["outcomes"])


def test_a_broken_lambda_context_runs_without_a_deadline(sink: Sink) -> None:
    class BrokenContext:
        def get_remaining_time_in_millis(self) -> int:
            raise RuntimeError("no")

    make_handler()(make_event(sink), BrokenContext())
    assert sink.only().document["Status"] == "SUCCESS"


# -- ownership: a stack takes over an account only when the registered stack's role is gone -------------

EVIL_STACK = f"arn:aws:cloudformation:us-east-1:{ACCOUNT}:stack/evil/6d1c55aa-0a61-4be3-9d8e-2f0c3f2ad0e1"
NEW_STACK = STACK.replace("1fd0cbc7", "99999999")
ROLE_ID = "AROAREALMANAGEMENT001"


@dataclass
class FakeRoles:
    """What assuming each role from the operations account shows: its unique id, or an error.

    A role it does not know cannot be assumed (AccessDenied, as STS answers for a deleted role).
    """

    ids: dict[str, str | BaseException] = field(default_factory=lambda: {ROLE_ARN: ROLE_ID})
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, account_id: str, role_arn: str) -> str:
        self.calls.append((account_id, role_arn))
        found = self.ids.get(role_arn)
        if found is None:
            raise OnboardingError(
                f"cannot assume the management role of account {account_id}: AssumeRole failed: "
                "AccessDenied: not authorized",
                operation="AssumeRole",
                code="AccessDenied",
            )
        if isinstance(found, BaseException):
            raise found
        return found


def _registered_with(
    registry: MemoryAccountRegistry,
    stack_id: str = STACK,
    role_arn: str = ROLE_ARN,
    role_id: str | None = ROLE_ID,
) -> AccountRegistration:
    registration = AccountRegistration(
        ACCOUNT, role_arn, stack_id, dt.datetime(2025, 1, 1, tzinfo=dt.UTC), role_id=role_id
    )
    registry.register(registration)
    return registration


def test_create_records_the_role_id_and_a_duplicate_changes_nothing(sink: Sink) -> None:
    registry, roles = MemoryAccountRegistry(), FakeRoles()
    handler = make_handler(registry, role_id_lookup=roles)
    create = make_event(sink)
    handler(create)
    handler(create)
    assert [r.document["Status"] for r in sink.received] == ["SUCCESS", "SUCCESS"]
    assert "already registered" in sink.received[1].document["Reason"]
    assert registry.require(ACCOUNT).role_id == ROLE_ID
    assert roles.calls == [(ACCOUNT, ROLE_ARN)] * 2


def test_a_forged_create_and_delete_cannot_take_over_a_live_account(sink: Sink) -> None:
    """The review's attack: a made-up stack in the victim's account naming the victim's real role."""
    registry, revoker, roles = MemoryAccountRegistry(), FakeRevoker(), FakeRoles()
    handler = make_handler(registry, revoker, role_id_lookup=roles)
    handler(make_event(sink))  # the real stack onboards
    real = registry.require(ACCOUNT)

    handler(make_event(sink, stack_id=EVIL_STACK))  # forged Create
    forged = sink.received[1].document
    assert forged["Status"] == "FAILED"
    assert f"account {ACCOUNT} is already registered by a live stack" in forged["Reason"]
    assert registry.require(ACCOUNT) == real and registry.require(ACCOUNT).stack_id == STACK

    handler(make_event(sink, "Delete", stack_id=EVIL_STACK))  # forged Delete, its physical id computed
    assert sink.received[2].document["Status"] == "SUCCESS"
    assert revoker.calls == []
    assert registry.require(ACCOUNT) == real

    handler(make_event(sink, "Update", stack_id=EVIL_STACK))  # nor can a forged Update
    assert sink.received[3].document["Status"] == "FAILED"
    assert registry.require(ACCOUNT) == real

    handler(make_event(sink, "Delete"))  # the real stack's Delete still does its work
    assert sink.received[4].document["Status"] == "SUCCESS"
    assert revoker.calls == [("revoke", ACCOUNT)]
    assert registry.get(ACCOUNT) is None


@pytest.mark.parametrize("request_type", ["Create", "Update"])
def test_a_new_stack_takes_over_once_the_old_role_was_recreated(sink: Sink, request_type: str) -> None:
    registry, revoker = MemoryAccountRegistry(), FakeRevoker()
    _registered_with(registry)  # the old stack's Delete never arrived; its role was deleted with it
    roles = FakeRoles(ids={ROLE_ARN: "AROARECREATEDROLE0002"})  # the new stack's role: same name, new id
    handler = make_handler(registry, revoker, role_id_lookup=roles)
    handler(make_event(sink, request_type, stack_id=NEW_STACK))
    answer = sink.only().document
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    current = registry.require(ACCOUNT)
    assert (current.stack_id, current.role_id) == (NEW_STACK, "AROARECREATEDROLE0002")
    handler(make_event(sink, "Delete"))  # the old stack's late Delete touches nothing
    assert sink.received[-1].document["Status"] == "SUCCESS"
    assert revoker.calls == [] and registry.require(ACCOUNT).stack_id == NEW_STACK


def test_a_new_stack_takes_over_when_the_registered_role_cannot_be_assumed(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    old_role = f"arn:aws:iam::{ACCOUNT}:role/old-path/DoiT_Management_Role_DO-NOT-DELETE"
    _registered_with(registry, role_arn=old_role)
    roles = FakeRoles(ids={ROLE_ARN: "AROARECREATEDROLE0002"})  # the old role answers AccessDenied
    make_handler(registry, role_id_lookup=roles)(make_event(sink, stack_id=NEW_STACK))
    assert sink.only().document["Status"] == "SUCCESS"
    assert registry.require(ACCOUNT).stack_id == NEW_STACK
    assert (ACCOUNT, old_role) in roles.calls


@pytest.mark.parametrize(
    "failure",
    [
        AwsError("AssumeRole failed: Throttling: Rate exceeded", operation="AssumeRole", code="Throttling"),
        OnboardingError("AssumeRole failed: EndpointConnectionError", operation="AssumeRole"),
        RuntimeError("socket closed"),
    ],
)
def test_an_unclear_answer_about_the_registered_role_takes_nothing_over(
    sink: Sink, failure: BaseException
) -> None:
    registry = MemoryAccountRegistry()
    old_role = f"arn:aws:iam::{ACCOUNT}:role/old-path/DoiT_Management_Role_DO-NOT-DELETE"
    registered = _registered_with(registry, role_arn=old_role)
    roles = FakeRoles(ids={ROLE_ARN: "AROARECREATEDROLE0002", old_role: failure})
    make_handler(registry, role_id_lookup=roles)(make_event(sink, stack_id=NEW_STACK))
    assert sink.only().document["Status"] == "FAILED"
    assert registry.require(ACCOUNT) == registered


def test_a_create_whose_own_role_cannot_be_assumed_registers_nothing(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    make_handler(registry, role_id_lookup=FakeRoles(ids={}))(make_event(sink))
    answer = sink.only().document
    assert answer["Status"] == "FAILED" and "cannot assume" in answer["Reason"]
    assert registry.get(ACCOUNT) is None


def test_without_a_role_id_lookup_no_stack_takes_over_another(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    registered = _registered_with(registry, role_id=None)
    make_handler(registry)(make_event(sink, stack_id=NEW_STACK))
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert "already registered by another stack" in answer["Reason"]
    assert registry.require(ACCOUNT) == registered


def test_a_registration_without_a_role_id_is_kept_while_its_role_is_assumable(sink: Sink) -> None:
    registry = MemoryAccountRegistry()
    registered = _registered_with(registry, role_id=None)  # written before role ids were recorded
    handler = make_handler(registry, role_id_lookup=FakeRoles())
    handler(make_event(sink, stack_id=EVIL_STACK))
    assert sink.received[0].document["Status"] == "FAILED"
    assert "live stack" in sink.received[0].document["Reason"]
    assert registry.require(ACCOUNT) == registered
    handler(make_event(sink, "Update"))  # its own stack's next request records the role id
    assert sink.received[1].document["Status"] == "SUCCESS"
    assert registry.require(ACCOUNT).role_id == ROLE_ID


@pytest.mark.parametrize("version", [["1.0"], {"1.0": "1.0"}, [], {}, 1.0, None, True])
def test_a_version_that_is_not_a_string_is_refused_cleanly(
    sink: Sink, version: Any, caplog: pytest.LogCaptureFixture
) -> None:
    registry = MemoryAccountRegistry()
    event = make_event(sink, ResourceProperties={**_props(), "Version": version})
    with caplog.at_level(logging.DEBUG, logger="hsm_keys"):
        make_handler(registry)(event)
    answer = sink.only().document
    assert answer["Status"] == "FAILED"
    assert "Version" in answer["Reason"] and "invalid" in answer["Reason"]
    assert "internal error" not in answer["Reason"]
    assert not [r for r in caplog.records if r.exc_info]
    assert registry.accounts() == []


# -- the role id from a real AssumeRole (moto server) ------------------------------------------------


def _operations(moto_server: str) -> AwsEnvironment:
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return AwsEnvironment(session=session, region="us-east-1", endpoint_url=moto_server)


@pytest.mark.aws
def test_the_management_role_id_is_stable_and_changes_with_a_recreated_role(
    deployed_stack: Any, deploy_support_stack: Any, moto_client: Any
) -> None:
    aws = _operations(deployed_stack.endpoint_url)
    account, role_arn = deployed_stack.account_id, deployed_stack.role_arn
    role_id = aws.management_role_id(account, role_arn)
    iam = moto_client("iam", deployed_stack.admin_credentials)
    assert role_id == iam.get_role(RoleName=deployed_stack.role_name)["Role"]["RoleId"]
    assert role_id.startswith("AROA")
    assert aws.management_role_id(account, role_arn) == role_id  # stable while the role lives
    assert aws.management_session(account, role_arn) is not None  # the session API is unchanged

    moto_client("cloudformation", deployed_stack.admin_credentials).delete_stack(
        StackName=deployed_stack.stack_id
    )
    # moto lets anyone assume a role that does not exist, with a fresh random id each time; STS refuses.
    gone = aws.management_role_id(account, role_arn)
    assert gone != role_id and gone != aws.management_role_id(account, role_arn)

    again = deploy_support_stack(account)
    assert again.role_arn == role_arn and again.stack_id != deployed_stack.stack_id
    new_id = aws.management_role_id(account, role_arn)
    assert new_id != role_id and new_id == aws.management_role_id(account, role_arn)

    with pytest.raises(OnboardingError):
        aws.management_role_id("999988887777", role_arn)  # the role must be in the account named


@pytest.mark.aws
def test_forged_events_cannot_take_over_a_deployed_stack(
    sink: Sink, deployed_stack: Any, tmp_path: Path
) -> None:
    registry, revoker = FileAccountRegistry(tmp_path / "registry.json"), FakeRevoker()
    aws = _operations(deployed_stack.endpoint_url)
    handler = make_handler(registry, revoker, role_id_lookup=aws.management_role_id)
    account, stack_id = deployed_stack.account_id, deployed_stack.stack_id
    properties = deployed_stack.hook_properties()
    handler(make_event(sink, stack_id=stack_id, account=account, ResourceProperties=properties))
    assert sink.received[0].document["Status"] == "SUCCESS"
    real = registry.require(account)
    assert real.role_id == aws.management_role_id(account, deployed_stack.role_arn)

    evil = f"arn:aws:cloudformation:us-east-1:{account}:stack/evil/{uuid.uuid4()}"
    handler(make_event(sink, stack_id=evil, account=account, ResourceProperties=properties))
    assert sink.received[1].document["Status"] == "FAILED"
    assert "live stack" in sink.received[1].document["Reason"]
    handler(make_event(sink, "Delete", stack_id=evil, account=account, ResourceProperties=properties))
    assert sink.received[2].document["Status"] == "SUCCESS"
    assert revoker.calls == [] and registry.require(account) == real


@pytest.mark.aws
def test_a_redeployed_stack_takes_over_after_a_lost_delete(
    sink: Sink, deployed_stack: Any, deploy_support_stack: Any, moto_client: Any, tmp_path: Path
) -> None:
    registry, revoker = FileAccountRegistry(tmp_path / "registry.json"), FakeRevoker()
    aws = _operations(deployed_stack.endpoint_url)
    handler = make_handler(registry, revoker, role_id_lookup=aws.management_role_id)
    account = deployed_stack.account_id
    handler(
        make_event(
            sink,
            stack_id=deployed_stack.stack_id,
            account=account,
            ResourceProperties=deployed_stack.hook_properties(),
        )
    )
    assert sink.received[0].document["Status"] == "SUCCESS"
    # The customer deletes the stack and its Delete never reaches us; then deploys it again.
    moto_client("cloudformation", deployed_stack.admin_credentials).delete_stack(
        StackName=deployed_stack.stack_id
    )
    again = deploy_support_stack(account)
    handler(
        make_event(sink, stack_id=again.stack_id, account=account, ResourceProperties=again.hook_properties())
    )
    assert sink.received[1].document["Status"] == "SUCCESS", sink.received[1].document["Reason"]
    current = registry.require(account)
    assert current.stack_id == again.stack_id
    assert current.role_id == aws.management_role_id(account, again.role_arn)
    assert revoker.calls == []


@pytest.mark.aws
def test_the_local_environment_records_role_ids_and_refuses_forged_creates(tmp_path: Path) -> None:
    account = f"{secrets.randbelow(9 * 10**11) + 10**11}"  # moto's state is shared by the process
    with MemoryKeyStore() as store, LocalEnvironment(tmp_path, store) as env:
        assert env.onboard(account)["Status"] == "SUCCESS"
        registration = env.registry.require(account)
        assert registration.role_id is not None and registration.role_id.startswith("AROA")
        customer = env.customers[account]
        forged = hook_event(
            "Create",
            stack_id=f"arn:aws:cloudformation:us-east-1:{account}:stack/evil/{uuid.uuid4()}",
            role_arn=customer.role_arn,
            account=account,
            response_url=env.sink.url("forged"),
        )
        env.handler(forged)
        assert env.sink.responses[-1]["Status"] == "FAILED"
        assert env.registry.require(account) == registration
