"""The custom-resource answer: always valid JSON of at most 4,096 bytes, whatever the request echoed."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm_keys.provisioning.onboarding import MAX_RESPONSE_BYTES, CustomResourceResponse, Status

# Any code point, lone surrogates included: echoed fields come from JSON the requester wrote.
_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=3000)
_FIELD = st.one_of(
    st.text(max_size=80), _ANY_TEXT, st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 5000))
)


_KEYS = {
    "request_id": "RequestId",
    "logical_resource_id": "LogicalResourceId",
    "stack_id": "StackId",
    "physical_resource_id": "PhysicalResourceId",
}


def _response(**fields: object) -> CustomResourceResponse:
    values: dict[str, object] = {
        "status": Status.FAILED,
        "physical_resource_id": "hsm-keys-onboarding-111122223333-0123456789abcdef",
        "stack_id": "arn:aws:cloudformation:us-east-1:111122223333:stack/s/guid",
        "request_id": "6a7d3b2e-5b1f-4f0e-9d59-3a8a1c1f0e4b",
        "logical_resource_id": "NotifyHook",
        "reason": "failed",
    }
    values.update(fields)
    return CustomResourceResponse(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [["request_id"], ["stack_id", "physical_resource_id"], list(_KEYS)])
@pytest.mark.parametrize("text", ["é" * 2000, "\U0001f600" * 700, "\\" * 3000, '"' * 3000, "\ud800" * 1000])
def test_long_echoed_text_still_gives_valid_json_within_the_limit(fields: list[str], text: str) -> None:
    body = _response(**dict.fromkeys(fields, text)).body()
    assert len(body) <= MAX_RESPONSE_BYTES
    document = json.loads(body)
    assert document["Status"] == "FAILED"
    for field in fields:
        assert text.startswith(document[_KEYS[field]])  # cut in characters, never inside an escape


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.sampled_from(Status),
    physical=_FIELD,
    stack=_FIELD,
    request=_FIELD,
    logical=_FIELD,
    reason=_FIELD,
    data=st.dictionaries(st.text(max_size=20), st.text(max_size=300), max_size=4),
)
def test_the_body_is_always_valid_json_of_at_most_4096_bytes(
    status: Status,
    physical: str,
    stack: str,
    request: str,
    logical: str,
    reason: str,
    data: dict[str, str],
) -> None:
    response = CustomResourceResponse(
        status=status,
        physical_resource_id=physical,
        stack_id=stack,
        request_id=request,
        logical_resource_id=logical,
        reason=reason,
        data=data,
    )
    body = response.body()
    assert len(body) <= MAX_RESPONSE_BYTES
    document = json.loads(body)
    assert document["Status"] == status.value and document["NoEcho"] is False
    echoed = {
        "PhysicalResourceId": physical,
        "StackId": stack,
        "RequestId": request,
        "LogicalResourceId": logical,
    }
    for key, sent in echoed.items():
        assert sent.startswith(document[key])
    if sum(len(json.dumps(v)) for v in echoed.values()) + len(json.dumps(data)) <= 3000:
        # fields that leave room for an answer are echoed exactly; only the reason is cut
        assert {key: document[key] for key in echoed} == echoed
        assert document.get("Data", {}) == data
        assert reason.startswith(document["Reason"].removesuffix("...")) or document["Reason"] == "failed"
