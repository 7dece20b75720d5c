"""Account registry: the same rules for every backend, and a file that survives crashes and rivals."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from hsm_keys.errors import ConfigurationError, InvalidBindingError, InvalidInputError, OnboardingError
from hsm_keys.provisioning.registry import (
    AccountRegistration,
    AccountRegistry,
    FileAccountRegistry,
    MemoryAccountRegistry,
    parse_role_arn,
    parse_stack_id,
)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
ROLE = "DoiT_Management_Role_DO-NOT-DELETE"


def stack(account: str, guid: str = "1fd0cbc7-16ea-462b-ac47-e251b3b57bc2", name: str = "support") -> str:
    return f"arn:aws:cloudformation:us-east-1:{account}:stack/{name}/{guid}"


def registration(
    account: str = "111122223333", *, guid: str = "g-1", when: dt.datetime = T0
) -> AccountRegistration:
    return AccountRegistration(
        account_id=account,
        role_arn=f"arn:aws:iam::{account}:role/{ROLE}",
        stack_id=stack(account, guid),
        registered_at=when,
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(params=["memory", "file"])
def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., AccountRegistry]:
    def make(**kwargs: object) -> AccountRegistry:
        if request.param == "memory":
            return MemoryAccountRegistry(**kwargs)  # type: ignore[arg-type]
        return FileAccountRegistry(tmp_path / "registry.json", **kwargs)  # type: ignore[arg-type]

    return make


def test_register_get_require_and_list(make_registry: Callable[..., AccountRegistry]) -> None:
    registry = make_registry()
    assert registry.get("111122223333") is None
    with pytest.raises(OnboardingError) as caught:
        registry.require("111122223333")
    assert caught.value.code == "NotRegistered"
    assert registry.register(registration("222233334444")) is True
    assert registry.register(registration("111122223333")) is True
    assert registry.require("111122223333") == registration("111122223333")
    assert [r.account_id for r in registry.accounts()] == ["111122223333", "222233334444"]
    assert registry.require("111122223333").partition == "aws"


def test_repeated_registration_is_unchanged_and_keeps_its_time(
    make_registry: Callable[..., AccountRegistry],
) -> None:
    registry = make_registry()
    assert registry.register(registration(when=T0)) is True
    assert registry.register(registration(when=T0 + dt.timedelta(hours=1))) is False
    assert registry.require("111122223333").registered_at == T0


def test_create_takes_over_update_does_not(make_registry: Callable[..., AccountRegistry]) -> None:
    registry = make_registry()
    registry.register(registration(guid="old"))
    with pytest.raises(OnboardingError) as caught:
        registry.register(registration(guid="new"), take_over=False)
    assert caught.value.code == "RegisteredByAnotherStack"
    assert registry.require("111122223333").stack_id == stack("111122223333", "old")
    assert registry.register(registration(guid="new"), take_over=True) is True
    assert registry.require("111122223333").stack_id == stack("111122223333", "new")


def test_deregister_only_what_the_stack_owns_and_retire_the_stack(
    make_registry: Callable[..., AccountRegistry],
) -> None:
    registry = make_registry()
    registry.register(registration(guid="new"))
    assert registry.deregister("111122223333", stack_id=stack("111122223333", "old")) is False
    assert registry.get("111122223333") is not None  # another stack's registration is left alone
    assert registry.is_retired(stack("111122223333", "old"))
    assert registry.deregister("111122223333", stack_id=stack("111122223333", "new")) is True
    assert registry.get("111122223333") is None
    assert registry.deregister("111122223333", stack_id=stack("111122223333", "new")) is False


def test_a_retired_stack_cannot_register_again(make_registry: Callable[..., AccountRegistry]) -> None:
    registry = make_registry()
    registry.register(registration())
    registry.deregister("111122223333", stack_id=registration().stack_id)
    with pytest.raises(OnboardingError) as caught:
        registry.register(registration())
    assert caught.value.code == "StackRetired"
    assert registry.get("111122223333") is None
    assert registry.register(registration(guid="a-new-stack")) is True


def test_retired_stacks_are_forgotten_after_the_retention(
    make_registry: Callable[..., AccountRegistry],
) -> None:
    clock = Clock()
    registry = make_registry(clock=clock, retention=dt.timedelta(days=1))
    registry.deregister("111122223333", stack_id=stack("111122223333", "gone"))
    clock.now += dt.timedelta(days=2)
    registry.deregister("222233334444", stack_id=stack("222233334444", "other"))  # any write prunes
    assert not registry.is_retired(stack("111122223333", "gone"))
    assert registry.is_retired(stack("222233334444", "other"))


@pytest.mark.parametrize(
    ("account", "role_arn", "stack_id", "error"),
    [
        ("11112222333", f"arn:aws:iam::11112222333:role/{ROLE}", stack("111122223333"), InvalidBindingError),
        ("111122223333", f"arn:aws:iam::999988887777:role/{ROLE}", stack("111122223333"), InvalidInputError),
        ("111122223333", f"arn:aws:iam::111122223333:user/{ROLE}", stack("111122223333"), InvalidInputError),
        ("111122223333", f"arn:aws:iam::111122223333:role/{ROLE}", stack("999988887777"), InvalidInputError),
        ("111122223333", f"arn:aws:iam::111122223333:role/{ROLE}", "stack/support", InvalidInputError),
        (
            "111122223333",
            f"arn:aws-cn:iam::111122223333:role/{ROLE}",
            stack("111122223333"),
            InvalidInputError,
        ),
    ],
)
def test_registrations_are_validated(
    account: str, role_arn: str, stack_id: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        AccountRegistration(account_id=account, role_arn=role_arn, stack_id=stack_id, registered_at=T0)


def test_registration_time_must_be_aware() -> None:
    with pytest.raises(InvalidInputError):
        registration(when=dt.datetime(2025, 1, 1))


def test_parsers() -> None:
    assert parse_stack_id(stack("111122223333")) == {
        "partition": "aws",
        "region": "us-east-1",
        "account": "111122223333",
        "name": "support",
        "guid": "1fd0cbc7-16ea-462b-ac47-e251b3b57bc2",
    }
    assert parse_stack_id("arn:aws:cloudformation:us-east-1:111122223333:stack/support") is None
    assert parse_role_arn(f"arn:aws:iam::111122223333:role/path/{ROLE}") == {
        "partition": "aws",
        "account": "111122223333",
        "name": ROLE,
    }
    assert parse_role_arn("arn:aws:iam::111122223333:role/") is None


# -- the file backend -----------------------------------------------------------------------------


def test_file_survives_a_new_instance_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "registry.json"
    FileAccountRegistry(path).register(registration())
    assert FileAccountRegistry(path).require("111122223333") == registration()
    assert sorted(p.name for p in path.parent.iterdir()) == ["registry.json", "registry.json.lock"]
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["accounts"]["111122223333"]["role_arn"].endswith(ROLE)


def test_reads_do_not_rewrite_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = FileAccountRegistry(path)
    registry.register(registration())
    inode = path.stat().st_ino
    registry.get("111122223333")
    registry.accounts()
    assert registry.register(registration()) is False
    assert path.stat().st_ino == inode


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"version": 2, "accounts": {}}', '{"version": 1, "accounts": {"1": {}}}', "[]"],
)
def test_an_unreadable_file_is_an_error_and_is_left_as_it_was(tmp_path: Path, content: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(content)
    registry = FileAccountRegistry(path)
    with pytest.raises(ConfigurationError):
        registry.get("111122223333")
    with pytest.raises(ConfigurationError):
        registry.register(registration())
    assert path.read_text() == content


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.json"
    registry = FileAccountRegistry(path)
    registry.register(registration("111122223333"))
    before = path.read_text()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        registry.register(registration("222233334444"))
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "registry.json.lock"]


def test_a_held_lock_times_out_clearly(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = FileAccountRegistry(path, lock_timeout=0.05)
    registry.accounts()  # creates the lock file
    with open(f"{path}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OnboardingError) as caught:
            registry.register(registration())
        assert caught.value.code == "RegistryLocked"
    assert registry.register(registration()) is True


def _register_many(path: str, first: int, count: int) -> None:
    registry = FileAccountRegistry(path)
    for number in range(first, first + count):
        registry.register(registration(f"{number:012d}"))


def test_concurrent_processes_and_threads_lose_no_write(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.json")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_register_many, args=(path, 100 + 20 * i, 20)) for i in range(4)]
    threads = [threading.Thread(target=_register_many, args=(path, 1000 + 20 * i, 20)) for i in range(4)]
    for worker in [*processes, *threads]:
        worker.start()
    for thread in threads:
        thread.join()
    for process in processes:
        process.join()
        assert process.exitcode == 0
    accounts = {r.account_id for r in FileAccountRegistry(path).accounts()}
    assert len(accounts) == 160


# -- the management role's unique id ----------------------------------------------------------------

ROLE_ID = "AROAEXAMPLEROLEID0001"


def test_the_role_id_is_kept_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    with_id = replace(registration(), role_id=ROLE_ID)
    assert FileAccountRegistry(path).register(with_id) is True
    assert FileAccountRegistry(path).require("111122223333").role_id == ROLE_ID
    assert json.loads(path.read_text())["accounts"]["111122223333"]["role_id"] == ROLE_ID


def test_a_file_without_role_ids_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    legacy = registration().to_json()
    assert "role_id" not in legacy  # a registration without a known role id is written as before
    path.write_text(json.dumps({"version": 1, "accounts": {"111122223333": legacy}, "retired_stacks": {}}))
    loaded = FileAccountRegistry(path).require("111122223333")
    assert loaded.role_id is None
    assert loaded == registration()


@pytest.mark.parametrize("role_id", ["", "AROA with spaces", "AROA:session", 42, "A" * 200])
def test_malformed_role_ids_are_refused(role_id: object) -> None:
    with pytest.raises(InvalidInputError):
        replace(registration(), role_id=role_id)


def test_the_same_stack_records_a_role_id_and_an_unknown_one_does_not_erase_it(
    make_registry: Callable[..., AccountRegistry],
) -> None:
    registry = make_registry()
    registry.register(registration())
    assert registry.register(replace(registration(), role_id=ROLE_ID)) is True  # learnt later
    assert registry.require("111122223333").role_id == ROLE_ID
    assert registry.register(registration()) is False  # "unknown" keeps what is known
    assert registry.require("111122223333").role_id == ROLE_ID
    assert registry.register(replace(registration(), role_id="AROAEXAMPLEROLEID0002")) is True
    assert registry.require("111122223333").role_id == "AROAEXAMPLEROLEID0002"


def test_taking_over_is_never_the_default(make_registry: Callable[..., AccountRegistry]) -> None:
    registry = make_registry()
    registry.register(registration(guid="old"))
    with pytest.raises(OnboardingError) as caught:
        registry.register(registration(guid="new"))
    assert caught.value.code == "RegisteredByAnotherStack"
    assert registry.require("111122223333").stack_id == stack("111122223333", "old")


def test_a_take_over_replaces_only_the_registration_that_was_checked(
    make_registry: Callable[..., AccountRegistry],
) -> None:
    registry = make_registry()
    checked = replace(registration(guid="old"), role_id=ROLE_ID)
    registry.register(checked)
    raced = replace(registration(guid="raced"), role_id="AROAEXAMPLEROLEID0003")
    assert registry.register(raced, replacing=checked) is True  # what was checked is still there
    with pytest.raises(OnboardingError) as caught:  # `checked` is no longer what is registered
        registry.register(registration(guid="late"), replacing=checked)
    assert caught.value.code == "RegisteredByAnotherStack"
    assert registry.require("111122223333") == raced


# -- unreadable files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe{\x00}\x00",  # UTF-16
        b'{"version": 1, "accounts": {}, "retired_stacks": {"\xe9": "2025-01-01T00:00:00+00:00"}}',
        b"[" * 100_000 + b"]" * 100_000,  # deep enough to exhaust the parser's recursion
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"version": 1, "accounts": {}, "retired_stacks": {"s": "2025-01-01T00:00:00"}}',  # naive time
        b'{"version": 1, "accounts": {}, "retired_stacks": {"s": 1}}',
        b'{"version": 1, "accounts": {"111122223333": {"account_id": "111122223333", "role_arn": '
        b'"arn:aws:iam::111122223333:role/r", "stack_id": '
        b'"arn:aws:cloudformation:us-east-1:111122223333:stack/s/g", '
        b'"registered_at": "2025-01-01T00:00:00+00:00", "role_id": ["AROA"]}}}',
        b'{"version": 1, "accounts": {"111122223333": {"account_id": "111122223333", "role_arn": '
        b'"arn:aws:iam::111122223333:role/r", "stack_id": '
        b'"arn:aws:cloudformation:us-east-1:111122223333:stack/s/g", "registered_at": 20250101}}}',
        b'{"version": 1, "accounts": [], "retired_stacks": {}}',
        b'{"version": 1, "accounts": {}, "retired_stacks": {}, "x": ' + b"9" * 5000 + b"}",  # int limit
    ],
)
def test_undecodable_or_malformed_files_are_configuration_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "registry.json"
    path.write_bytes(content)
    registry = FileAccountRegistry(path)
    with pytest.raises(ConfigurationError) as caught:
        registry.get("111122223333")
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigurationError):
        registry.register(registration())
    with pytest.raises(ConfigurationError):
        registry.deregister("111122223333", stack_id=registration().stack_id)
    assert path.read_bytes() == content


def test_a_registry_path_that_cannot_be_read_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(ConfigurationError) as caught:
        FileAccountRegistry(path).get("111122223333")
    assert "unreadable" in str(caught.value)
