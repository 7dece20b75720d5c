"""One exception tree for the whole library.

Every public call raises only these (or a plain ``TypeError`` for a wrong argument type). Each
backend translates its own library's errors in exactly one function, always ``raise ... from exc``,
so the original error stays on ``__cause__`` for debugging while callers catch one family::

    HsmKeysError
    ├── InvalidInputError (ValueError)          bad input, rejected before any side effect
    │   ├── InvalidBindingError                 staff id / account id that IAM would refuse
    │   ├── UnsupportedAlgorithmError           key spec / algorithm pair not allowed
    │   ├── EncodingError                       malformed DER, JWK, base64url, EC point, ...
    │   ├── InvalidTokenError                   a JWT that fails signature, time, iss or aud checks
    │   └── ConfigurationError                  missing or inconsistent settings
    ├── KeyNotFoundError (LookupError)          no key with that kid (or binding)
    ├── KeyExistsError                          the binding already has a key
    ├── KeyStoreError                           the HSM or its library failed
    │   ├── TokenNotFoundError                  no token with that label (lists the labels seen)
    │   ├── LoginError                          wrong PIN, locked PIN, ...
    │   ├── MechanismNotSupportedError          the token does not offer what the algorithm needs
    │   ├── SessionError                        a session went bad (transient: retried by the pool)
    │   └── PoolTimeoutError                    no session became free in time
    ├── WorkCancelledError                      work whose answer was already given stopped before a write
    ├── SigningError                            a batch had failures; ``results`` holds each item's outcome
    ├── CertificateError                        a certificate could not be built or parsed
    ├── TlsError                                a TLS endpoint could not be reached or read
    └── AwsError                                an AWS call failed (``operation``, ``code`` attached)
        ├── AccessDeniedError                   AWS (or our local scope check) refused the call
        │   └── ManagementRoleDeniedError       AssumeRole into a management role refused (also an
        │                                       OnboardingError)
        ├── ThrottledError                      AWS kept throttling past the retry budget
        ├── NotOwnedError                       an IAM entity exists that this library did not create
        ├── OnboardingError                     an account is not registered / cannot be assumed
        └── StsExchangeError                    AssumeRoleWithWebIdentity refused the token

Messages never contain a PIN, a credential or message contents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class HsmKeysError(Exception):
    """Root of every error this library raises on purpose."""


class InvalidInputError(HsmKeysError, ValueError):
    """Input rejected before anything was changed."""


class InvalidBindingError(InvalidInputError):
    """A staff id or account id that would not make a valid IAM grant."""


class UnsupportedAlgorithmError(InvalidInputError):
    """The key spec and signature algorithm do not go together (or the algorithm is not allowed here)."""


class EncodingError(InvalidInputError):
    """Bytes or documents that do not decode to what was expected."""


class InvalidTokenError(InvalidInputError):
    """A token that is well formed but must not be accepted (signature, expiry, issuer, audience)."""


class ConfigurationError(InvalidInputError):
    """Settings that are missing or contradict each other."""


class KeyNotFoundError(HsmKeysError, LookupError):
    """No key with that kid or binding."""


class KeyExistsError(HsmKeysError):
    """The binding already has a key; rotation is a separate operation."""


class KeyStoreError(HsmKeysError):
    """The HSM or its PKCS#11 library reported a failure."""


class TokenNotFoundError(KeyStoreError):
    """No token with the requested label is present."""


class LoginError(KeyStoreError):
    """The token refused the login (wrong or locked PIN, ...)."""


class MechanismNotSupportedError(KeyStoreError):
    """The token does not offer a mechanism the operation needs."""


class SessionError(KeyStoreError):
    """A session became unusable; the pool replaces it and retries the item."""


class PoolTimeoutError(KeyStoreError):
    """Every session stayed busy for longer than the pool's wait timeout."""


class SigningError(HsmKeysError):
    """Some items of a batch failed; ``results`` has one outcome per item, in order."""

    def __init__(self, message: str, results: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.results = list(results)


class CertificateError(HsmKeysError):
    """A certificate could not be built or parsed."""


class TlsError(HsmKeysError):
    """A TLS endpoint could not be reached, or served nothing usable."""


class AwsError(HsmKeysError):
    """An AWS call failed; ``operation`` and ``code`` say which and why."""

    def __init__(self, message: str, *, operation: str = "", code: str = "") -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code


class AccessDeniedError(AwsError):
    """AWS, or our own check of the management policy's scope, refused the call."""


class ThrottledError(AwsError):
    """AWS kept throttling after the bounded retries."""


class NotOwnedError(AwsError):
    """An IAM entity in our namespace exists that this library did not create; it is left alone."""


class OnboardingError(AwsError):
    """The account is not registered, or its management role cannot be used."""


class StsExchangeError(AwsError):
    """STS refused to exchange the web-identity token."""


class ManagementRoleDeniedError(AccessDeniedError, OnboardingError):
    """STS refused ``AssumeRole`` into a customer's management role (AccessDenied).

    The role is gone, or no longer trusts the operations account. It is an :class:`AccessDeniedError`
    (what the CLI reports as access denied) and still an :class:`OnboardingError`, which callers of
    the management role have always caught.
    """


class WorkCancelledError(HsmKeysError):
    """The work was cancelled (its answer was already given); this write was not made."""


__all__ = [
    "AccessDeniedError",
    "AwsError",
    "CertificateError",
    "ConfigurationError",
    "EncodingError",
    "HsmKeysError",
    "InvalidBindingError",
    "InvalidInputError",
    "InvalidTokenError",
    "KeyExistsError",
    "KeyNotFoundError",
    "KeyStoreError",
    "LoginError",
    "ManagementRoleDeniedError",
    "MechanismNotSupportedError",
    "NotOwnedError",
    "OnboardingError",
    "PoolTimeoutError",
    "SessionError",
    "SigningError",
    "StsExchangeError",
    "ThrottledError",
    "TlsError",
    "TokenNotFoundError",
    "UnsupportedAlgorithmError",
    "WorkCancelledError",
]
