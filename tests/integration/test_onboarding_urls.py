"""Pieces of the onboarding handler that need no server: ResponseURL checks, ids, response bodies."""

from __future__ import annotations

import json

import pytest

from hsm_keys.errors import InvalidInputError
from hsm_keys.provisioning.onboarding import (
    MAX_RESPONSE_BYTES,
    CustomResourceResponse,
    Status,
    allow_loopback_response_urls,
    check_response_url,
    physical_resource_id,
    redact_url,
)

SIGV4 = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20250101T000000Z&X-Amz-SignedHeaders=host"
    "&X-Amz-Expires=7200&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=0123456789abcdef"
)
SIGV2 = "AWSAccessKeyId=AKIAEXAMPLE&Expires=1735689600&Signature=abc%2Bdef%3D"
OBJECT = "arn%3Aaws%3Acloudformation%3Aus-east-1%3A111122223333%3Astack/s/g%7CNotifyHook%7Creq"
STACK = "arn:aws:cloudformation:us-east-1:111122223333:stack/support/1fd0cbc7-16ea-462b-ac47-e251b3b57bc2"

ACCEPTED = [
    f"https://cloudformation-custom-resource-response-useast1.s3.amazonaws.com/{OBJECT}?{SIGV4}",
    f"https://cloudformation-custom-resource-response-useast1.s3.amazonaws.com/{OBJECT}?{SIGV2}",
    f"https://cloudformation-custom-resource-response-euwest1.s3.eu-west-1.amazonaws.com/{OBJECT}?{SIGV4}",
    f"https://s3.amazonaws.com/bucket/{OBJECT}?{SIGV4}",
    f"https://s3-us-west-2.amazonaws.com/bucket/{OBJECT}?{SIGV4}",
    f"https://bucket.s3.dualstack.us-east-1.amazonaws.com/{OBJECT}?{SIGV4}",
    f"https://cloudformation-custom-resource-response-cnnorth1.s3.cn-north-1.amazonaws.com.cn/{OBJECT}?{SIGV4}",
    f"https://bucket.s3.us-gov-west-1.amazonaws.com:443/{OBJECT}?{SIGV4}",
]
REFUSED = [
    None,
    "",
    f"http://cloudformation-custom-resource-response-useast1.s3.amazonaws.com/{OBJECT}?{SIGV4}",  # not https
    f"https://s3.amazonaws.com.evil.example/{OBJECT}?{SIGV4}",  # suffix trick
    f"https://evil-s3.amazonaws.com/{OBJECT}?{SIGV4}",
    f"https://sts.amazonaws.com/{OBJECT}?{SIGV4}",  # AWS, but not S3
    f"https://abc.execute-api.us-east-1.amazonaws.com/{OBJECT}?{SIGV4}",
    f"https://169.254.169.254/latest/meta-data?{SIGV4}",
    f"https://s3.amazonaws.com:8443/bucket/{OBJECT}?{SIGV4}",  # odd port
    f"https://user:pw@s3.amazonaws.com/bucket/{OBJECT}?{SIGV4}",  # user info
    f"https://s3.amazonaws.com@evil.example/{OBJECT}?{SIGV4}",
    f"https://s3.amazonaws.com/bucket/{OBJECT}",  # not pre-signed
    f"https://s3.amazonaws.com/bucket/{OBJECT}?X-Amz-Signature=x",  # half a signature
    f"https://s3.amazonaws.com/?{SIGV4}",  # no object
    f"https://s3.amazonaws.com/bucket/{OBJECT}?{SIGV4}#frag",
    f"https://s3.amazonaws.com/bucket/a b?{SIGV4}",  # not a URL CloudFormation sends
    f"https://s3.amazonaws.com/bucket/\u00e9?{SIGV4}",
    f"https://s3.amazonaws.com/bucket/{OBJECT}?{SIGV4}\r\nX-Injected: 1",
    f"https://s3.amazonaws.com:99999/bucket/{OBJECT}?{SIGV4}",
    "https://s3.amazonaws.com/" + "a" * 9000 + f"?{SIGV4}",
    f"http://127.0.0.1:8080/{OBJECT}?{SIGV4}",  # loopback only with the test override
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_pre_signed_s3_urls_are_accepted(url: str) -> None:
    check_response_url(url)
    allow_loopback_response_urls(url)


@pytest.mark.parametrize("url", REFUSED)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        check_response_url(url)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/x?y=1", "http://[::1]:9/x", "https://localhost:1/x", "http://127.8.9.10/x"]
)
def test_the_test_override_accepts_loopback_only(url: str) -> None:
    allow_loopback_response_urls(url)
    with pytest.raises(InvalidInputError):
        check_response_url(url)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/x", "http://example.com/x", "ftp://127.0.0.1/x", "http://user@127.0.0.1/x"]
)
def test_the_test_override_still_refuses_the_rest(url: str) -> None:
    with pytest.raises(InvalidInputError):
        allow_loopback_response_urls(url)


def test_redacted_urls_keep_no_signature() -> None:
    redacted = redact_url(ACCEPTED[0])
    assert redacted == f"https://cloudformation-custom-resource-response-useast1.s3.amazonaws.com/{OBJECT}"
    assert "Signature" not in redact_url(ACCEPTED[1])
    assert redact_url("https://user:secret@host/p?q") == "https://host/p"
    assert redact_url(None) == "<NoneType>"


def test_physical_resource_id_is_a_pure_function_of_the_stack() -> None:
    first = physical_resource_id(STACK, "111122223333")
    assert first == physical_resource_id(STACK, "111122223333")
    assert first.startswith("hsm-keys-onboarding-111122223333-")
    assert first != physical_resource_id(STACK.replace("support", "other"), "111122223333")
    assert len(first) < 100


def _response(reason: str, status: Status = Status.FAILED) -> CustomResourceResponse:
    return CustomResourceResponse(
        status=status,
        physical_resource_id=physical_resource_id(STACK, "111122223333"),
        stack_id=STACK,
        request_id="5d478078-13e9-baf0-464a-7ef285ecc786",
        logical_resource_id="NotifyHook",
        reason=reason,
        data={"AccountId": "111122223333"},
    )


def test_response_body_has_every_field_cloudformation_needs() -> None:
    body = json.loads(_response("because", Status.SUCCESS).body())
    assert body == {
        "Status": "SUCCESS",
        "Reason": "because",
        "PhysicalResourceId": physical_resource_id(STACK, "111122223333"),
        "StackId": STACK,
        "RequestId": "5d478078-13e9-baf0-464a-7ef285ecc786",
        "LogicalResourceId": "NotifyHook",
        "NoEcho": False,
        "Data": {"AccountId": "111122223333"},
    }
    assert json.loads(_response("").body())["Reason"] == "failed"  # FAILED always says something


@pytest.mark.parametrize("character", ["x", "\u00e9", "\U0001f600", '"', "\n"])
def test_long_reasons_are_cut_to_fit_4096_bytes(character: str) -> None:
    long_response = _response(character * 20_000)
    body = long_response.body()
    assert len(body) <= MAX_RESPONSE_BYTES
    decoded = json.loads(body)
    assert decoded["Reason"].endswith("...")
    assert decoded["Reason"].startswith(character * 10)
    assert decoded["StackId"] == STACK


def test_oversized_echoed_fields_still_give_a_bounded_body() -> None:
    bogus = CustomResourceResponse(
        status=Status.FAILED,
        physical_resource_id="p" * 5000,
        stack_id="s" * 5000,
        request_id="r" * 5000,
        logical_resource_id="l" * 5000,
        reason="bad request",
    )
    assert len(bogus.body()) <= MAX_RESPONSE_BYTES
