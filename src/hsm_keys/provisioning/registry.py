"""Which customer accounts are onboarded, and through which management role.

The onboarding handler writes here; the access layer reads here to find an account's management
role. The handler may run where the disk does not last (a Lambda function), so this is an interface
with two implementations -- a JSON file for a single host and memory for tests -- and room for a
durable store elsewhere: a backend implements one primitive, :meth:`AccountRegistry._transaction`,
and every rule lives once in the base class.

Besides registrations it keeps *retired stacks*: the ids of stacks whose Delete was handled. A Create
or Update that arrives after its stack's Delete (a late or duplicate delivery) must not bring the
account back, and the retired id is what refuses it. Retired ids are pruned after ``retention``.

A registration may carry the management role's unique id (``AROA...``), learnt by the onboarding
handler when it assumed the role. The role's name is fixed by the template, so one live stack at a time
holds it, and a recreated role gets a new id: the id tells whether the stack that registered an account
is still there. Registering over another stack's registration is never the default -- the caller says
which registration it checked (``replacing``), and the swap happens only if that one is still current.
Files written before role ids were recorded load with ``role_id=None``.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hsm_keys.errors import ConfigurationError, InvalidBindingError, InvalidInputError, OnboardingError

FORMAT_VERSION = 1
DEFAULT_RETENTION = dt.timedelta(days=30)

_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ROLE_ARN_RE = re.compile(
    r"arn:(?P<partition>aws|aws-cn|aws-us-gov):iam::(?P<account>[0-9]{12}):role/(?:[\x21-\x7e]+/)?"
    r"(?P<name>[A-Za-z0-9+=,.@_-]{1,64})"
)
#: IAM unique ids are upper-case letters and digits (``AROA`` + 17 for a role); a little leeway here.
_ROLE_ID_RE = re.compile(r"[A-Z0-9]{8,128}")
_STACK_ID_RE = re.compile(
    r"arn:(?P<partition>aws|aws-cn|aws-us-gov):cloudformation:(?P<region>[a-z0-9-]+):"
    r"(?P<account>[0-9]{12}):stack/(?P<name>[A-Za-z][A-Za-z0-9-]{0,127})/(?P<guid>[A-Za-z0-9-]{1,64})"
)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class AccountRegistration:
    """One onboarded account: its management role and the stack that registered it.

    ``role_id`` is the role's unique id (``AROA...``) when it is known; None for registrations made
    without a role-id lookup or before role ids were recorded.
    """

    account_id: str
    role_arn: str
    stack_id: str
    registered_at: dt.datetime = field(compare=False)
    role_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.account_id, str) or not _ACCOUNT_RE.fullmatch(self.account_id):
            raise InvalidBindingError(f"account id must be exactly 12 digits, got {self.account_id!r}")
        role = _ROLE_ARN_RE.fullmatch(self.role_arn) if isinstance(self.role_arn, str) else None
        if role is None:
            raise InvalidInputError(f"{self.role_arn!r} is not an IAM role ARN")
        if role["account"] != self.account_id:
            raise InvalidInputError(
                f"role {self.role_arn} is in account {role['account']}, not in {self.account_id}"
            )
        stack = _STACK_ID_RE.fullmatch(self.stack_id) if isinstance(self.stack_id, str) else None
        if stack is None:
            raise InvalidInputError(f"{self.stack_id!r} is not a CloudFormation stack id")
        if stack["account"] != self.account_id or stack["partition"] != role["partition"]:
            raise InvalidInputError(f"stack {self.stack_id} does not belong to account {self.account_id}")
        if not isinstance(self.registered_at, dt.datetime) or self.registered_at.tzinfo is None:
            raise InvalidInputError("registered_at must be a timezone-aware datetime")
        if self.role_id is not None and (
            not isinstance(self.role_id, str) or not _ROLE_ID_RE.fullmatch(self.role_id)
        ):
            raise InvalidInputError(f"{str(self.role_id)[:140]!r} is not an IAM role id")

    @property
    def partition(self) -> str:
        """``aws``, ``aws-cn`` or ``aws-us-gov``, from the role ARN."""
        return self.role_arn.split(":", 2)[1]

    def to_json(self) -> dict[str, str]:
        data = {
            "account_id": self.account_id,
            "role_arn": self.role_arn,
            "stack_id": self.stack_id,
            "registered_at": self.registered_at.isoformat(),
        }
        if self.role_id is not None:
            data["role_id"] = self.role_id
        return data

    @classmethod
    def from_json(cls, data: Any) -> AccountRegistration:
        if not isinstance(data, dict):
            raise InvalidInputError("a registration must be a JSON object")
        try:
            return cls(
                account_id=data["account_id"],
                role_arn=data["role_arn"],
                stack_id=data["stack_id"],
                registered_at=dt.datetime.fromisoformat(data["registered_at"]),
                role_id=data.get("role_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed registration ({type(exc).__name__}: {exc})") from exc


@dataclass
class RegistryState:
    """Everything a registry holds; a backend loads and stores it whole, inside one transaction."""

    accounts: dict[str, AccountRegistration] = field(default_factory=dict)
    retired_stacks: dict[str, dt.datetime] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "accounts": {k: v.to_json() for k, v in sorted(self.accounts.items())},
            "retired_stacks": {k: v.isoformat() for k, v in sorted(self.retired_stacks.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> RegistryState:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise InvalidInputError(f"registry format version {version!r}; expected {FORMAT_VERSION}")
        accounts_raw = data.get("accounts", {})
        retired_raw = data.get("retired_stacks", {})
        if not isinstance(accounts_raw, dict) or not isinstance(retired_raw, dict):
            raise InvalidInputError("registry 'accounts' and 'retired_stacks' must be JSON objects")
        accounts = {}
        for key, value in accounts_raw.items():
            registration = AccountRegistration.from_json(value)
            if registration.account_id != key:
                raise InvalidInputError(f"registry entry {key!r} holds account {registration.account_id}")
            accounts[key] = registration
        try:
            retired = {str(k): dt.datetime.fromisoformat(v) for k, v in retired_raw.items()}
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed retired stack time ({exc})") from exc
        if any(when.tzinfo is None for when in retired.values()):
            raise InvalidInputError("retired stack times must be timezone-aware")
        return cls(accounts=accounts, retired_stacks=retired)


class AccountRegistry(abc.ABC):
    """Onboarded accounts. Every method is atomic with respect to every other writer."""

    def __init__(
        self, *, clock: Callable[[], dt.datetime] = _utcnow, retention: dt.timedelta = DEFAULT_RETENTION
    ) -> None:
        self._clock = clock
        self._retention = retention

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[RegistryState]:
        """Yield the current state, exclusively; store it if the block ends without an exception."""

    # Reads ------------------------------------------------------------------------------------------

    def get(self, account_id: str) -> AccountRegistration | None:
        with self._transaction() as state:
            return state.accounts.get(account_id)

    def require(self, account_id: str) -> AccountRegistration:
        """The account's registration, or :class:`OnboardingError` saying it is not onboarded."""
        registration = self.get(account_id)
        if registration is None:
            raise OnboardingError(
                f"account {account_id} is not onboarded (no support-access stack has registered it)",
                code="NotRegistered",
            )
        return registration

    def accounts(self) -> list[AccountRegistration]:
        with self._transaction() as state:
            return [state.accounts[k] for k in sorted(state.accounts)]

    def is_retired(self, stack_id: str) -> bool:
        with self._transaction() as state:
            return stack_id in state.retired_stacks

    # Writes -----------------------------------------------------------------------------------------

    def register(
        self,
        registration: AccountRegistration,
        *,
        take_over: bool = False,
        replacing: AccountRegistration | None = None,
    ) -> bool:
        """Record ``registration``; return False when exactly that was already recorded.

        A retired stack cannot register again. An account registered by another stack is left alone
        (:class:`OnboardingError` ``RegisteredByAnotherStack``) unless the caller has established that
        the other stack is gone: ``replacing`` names the registration it checked, and the swap happens
        only if that is still the current one (a concurrent change makes it fail instead).
        ``take_over=True`` replaces any other stack's registration unchecked -- for tools and tests;
        the onboarding handler never uses it. For the same stack, a registration whose ``role_id``
        is unknown keeps the known one of the same role.
        """
        with self._transaction() as state:
            if registration.stack_id in state.retired_stacks:
                raise OnboardingError(
                    f"stack {registration.stack_id} was deleted; a late request does not register it again",
                    code="StackRetired",
                )
            current = state.accounts.get(registration.account_id)
            if (
                current is not None
                and current.stack_id != registration.stack_id
                and not take_over
                and (replacing is None or replacing != current)
            ):
                raise OnboardingError(
                    f"account {registration.account_id} is registered by another stack ({current.stack_id})",
                    code="RegisteredByAnotherStack",
                )
            if current is not None and current.stack_id == registration.stack_id:
                if registration.role_id is None and registration.role_arn == current.role_arn:
                    registration = replace(registration, role_id=current.role_id)
                if current == registration:
                    return False
                registration = replace(registration, registered_at=current.registered_at)
            state.accounts[registration.account_id] = registration
            self._prune(state)
            return True

    def deregister(self, account_id: str, *, stack_id: str) -> bool:
        """Remove the account if ``stack_id`` registered it; retire the stack in any case.

        Returns whether a registration was removed. Another stack's registration is never touched.
        """
        with self._transaction() as state:
            current = state.accounts.get(account_id)
            removed = current is not None and current.stack_id == stack_id
            if removed:
                del state.accounts[account_id]
            state.retired_stacks[stack_id] = self._clock()
            self._prune(state)
            return removed

    def _prune(self, state: RegistryState) -> None:
        horizon = self._clock() - self._retention
        for stack_id in [s for s, when in state.retired_stacks.items() if when < horizon]:
            del state.retired_stacks[stack_id]


class MemoryAccountRegistry(AccountRegistry):
    """In-process registry for tests and single-process tools; the state is copied on every write."""

    def __init__(
        self, *, clock: Callable[[], dt.datetime] = _utcnow, retention: dt.timedelta = DEFAULT_RETENTION
    ) -> None:
        super().__init__(clock=clock, retention=retention)
        self._lock = threading.RLock()
        self._state = RegistryState()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[RegistryState]:
        with self._lock:
            working = RegistryState(dict(self._state.accounts), dict(self._state.retired_stacks))
            yield working
            self._state = working


class FileAccountRegistry(AccountRegistry):
    """A JSON file, replaced atomically on every change and guarded by a lock file.

    Writers take an exclusive ``flock`` on ``<path>.lock`` (so processes and threads serialise),
    write a temporary file in the same directory, fsync it, ``os.replace`` it over the registry and
    fsync the directory: a reader sees the old file or the new one, never a torn one, and a crash
    loses at most the change in flight. A file that does not parse is an error, never reset.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        retention: dt.timedelta = DEFAULT_RETENTION,
        lock_timeout: float = 30.0,
    ) -> None:
        super().__init__(clock=clock, retention=retention)
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_timeout = lock_timeout
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                deadline = time.monotonic() + self._lock_timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise OnboardingError(
                                f"account registry {self.path} stayed locked for {self._lock_timeout:g} s",
                                code="RegistryLocked",
                            ) from None
                        time.sleep(0.01)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _read(self) -> RegistryState:
        """The file's state; any file that is not a valid registry is a :class:`ConfigurationError`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return RegistryState()
        except OSError as exc:
            raise ConfigurationError(
                f"account registry {self.path} is unreadable: {exc.strerror or type(exc).__name__}"
            ) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(
                f"account registry {self.path} is unreadable: not UTF-8 (byte {exc.start})"
            ) from None
        try:
            return RegistryState.from_json(json.loads(text))
        except RecursionError:
            raise ConfigurationError(
                f"account registry {self.path} is unreadable: its JSON is nested too deeply"
            ) from None
        except (ValueError, TypeError, InvalidInputError) as exc:
            raise ConfigurationError(f"account registry {self.path} is unreadable: {exc}") from exc

    def _write(self, state: RegistryState) -> None:
        data = (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode()
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[RegistryState]:
        with self._locked():
            state = self._read()
            before = state.to_json()
            yield state
            if state.to_json() != before:
                self._write(state)


def parse_stack_id(stack_id: str) -> dict[str, str] | None:
    """``partition``, ``region``, ``account``, ``name``, ``guid`` of a stack ARN, or None."""
    match = _STACK_ID_RE.fullmatch(stack_id) if isinstance(stack_id, str) else None
    return match.groupdict() if match else None


def parse_role_arn(role_arn: str) -> dict[str, str] | None:
    """``partition``, ``account``, ``name`` of an IAM role ARN, or None."""
    match = _ROLE_ARN_RE.fullmatch(role_arn) if isinstance(role_arn, str) else None
    return match.groupdict() if match else None


__all__ = [
    "DEFAULT_RETENTION",
    "AccountRegistration",
    "AccountRegistry",
    "FileAccountRegistry",
    "MemoryAccountRegistry",
    "RegistryState",
    "parse_role_arn",
    "parse_stack_id",
]
