"""Provisioning: onboarding customer accounts, the account registry, the management scope, access grants.

Names are loaded on first use (PEP 562): importing the package pulls in neither boto3 nor the grant
machinery, and the submodules can import each other without cycles through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsm_keys.provisioning.grants import SupportAccess
    from hsm_keys.provisioning.onboarding import (
        AccountRevoker,
        OnboardingHandler,
        RevocationReport,
        allow_loopback_response_urls,
        check_response_url,
        physical_resource_id,
    )
    from hsm_keys.provisioning.recorder import CallRecorder, RecordedCall
    from hsm_keys.provisioning.registry import (
        AccountRegistration,
        AccountRegistry,
        FileAccountRegistry,
        MemoryAccountRegistry,
    )
    from hsm_keys.provisioning.scope import AuthorizationRequest, ManagementScope, check_call

_WHERE = {
    "SupportAccess": "grants",
    "AccountRevoker": "onboarding",
    "OnboardingHandler": "onboarding",
    "RevocationReport": "onboarding",
    "allow_loopback_response_urls": "onboarding",
    "check_response_url": "onboarding",
    "physical_resource_id": "onboarding",
    "CallRecorder": "recorder",
    "RecordedCall": "recorder",
    "AccountRegistration": "registry",
    "AccountRegistry": "registry",
    "FileAccountRegistry": "registry",
    "MemoryAccountRegistry": "registry",
    "AuthorizationRequest": "scope",
    "ManagementScope": "scope",
    "check_call": "scope",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "AccountRegistration",
    "AccountRegistry",
    "AccountRevoker",
    "AuthorizationRequest",
    "CallRecorder",
    "FileAccountRegistry",
    "ManagementScope",
    "MemoryAccountRegistry",
    "OnboardingHandler",
    "RecordedCall",
    "RevocationReport",
    "SupportAccess",
    "allow_loopback_response_urls",
    "check_call",
    "check_response_url",
    "physical_resource_id",
]
