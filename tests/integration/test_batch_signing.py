"""Batch signing on SoftHSM: order, verification, bounded retries of injected faults, time-outs,
worker processes and forks. Correctness only; the benchmarks measure speed.

Faults are injected at the python-pkcs11 boundary: the key object the store signs with is wrapped
so that its ``sign`` raises python-pkcs11's own exceptions. Anything that runs several threads into
the PKCS#11 module runs in a child interpreter whose exit status is asserted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11.exceptions as p11e
import pytest

from hsm_keys.errors import (
    ConfigurationError,
    KeyStoreError,
    LoginError,
    PoolTimeoutError,
    SessionError,
    SigningError,
)
from hsm_keys.keystore.pkcs11 import ErrorSet, Pin, Pkcs11KeyStore, Quirks
from hsm_keys.keystore.software import verify_signature
from hsm_keys.types import Binding, KeyInfo, KeySpec, SignatureAlgorithm

pytestmark = pytest.mark.softhsm
ACCOUNT = "345678901234"
EDDSA = SignatureAlgorithm.EdDSA


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


@pytest.fixture
def make_store(pkcs11_env: dict[str, str]) -> Iterator[Callable[..., Pkcs11KeyStore]]:
    """Stores with chosen settings; keys made through ``key(store, ...)`` are destroyed afterwards."""
    stores: list[Pkcs11KeyStore] = []

    def make(**options: Any) -> Pkcs11KeyStore:
        store = Pkcs11KeyStore(**options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        if not store.closed:
            store.close()
    with Pkcs11KeyStore(parallelism="threads") as cleaner:
        for info in cleaner.list_keys():
            if info.binding.account == ACCOUNT:
                cleaner.destroy(info.kid)


def key(store: Pkcs11KeyStore, name: str, spec: KeySpec = KeySpec.ED25519) -> KeyInfo:
    return store.generate(spec, Binding(name, ACCOUNT))


def messages(count: int, size: int = 40) -> list[bytes]:
    return [f"{i:06d}".encode() * (size // 6 + 1) for i in range(count)]


def assert_all_verify(info: KeyInfo, signed: list[bytes], sent: list[bytes], alg: SignatureAlgorithm) -> None:
    assert len(signed) == len(sent)
    for index, (signature, message) in enumerate(zip(signed, sent, strict=True)):
        assert verify_signature(info.public_key, signature, message, alg), f"item {index} does not verify"


class FlakyKey:
    """A python-pkcs11 key whose ``sign`` raises ``error`` while ``plan(message)`` says so."""

    def __init__(self, key: Any, error: type[Exception], plan: Callable[[bytes], bool], after: bool) -> None:
        self.key, self.error, self.plan, self.after = key, error, plan, after

    def sign(self, data: bytes, **options: Any) -> bytes:
        if self.plan(data):
            if self.after:  # the token did the work, then reported a failure
                self.key.sign(data, **options)
            raise self.error()
        return bytes(self.key.sign(data, **options))


def inject(
    monkeypatch: pytest.MonkeyPatch,
    store: Pkcs11KeyStore,
    info: KeyInfo,
    error: type[Exception],
    failures: dict[bytes, int],
    *,
    after: bool = False,
) -> dict[bytes, int]:
    """Make signing ``message`` raise ``error`` ``failures[message]`` times, on every session."""
    calls: dict[bytes, int] = {}

    def plan(data: bytes) -> bool:
        calls[data] = calls.get(data, 0) + 1
        return calls[data] <= failures.get(data, 0)

    real = store._key_for

    def flaky_key_for(pooled: Any, kid: str) -> Any:
        found = real(pooled, kid)
        if not isinstance(found, FlakyKey):
            found = pooled.keys[kid] = FlakyKey(found, error, plan, after)  # cached like the real one
        return found

    monkeypatch.setattr(store, "_key_for", flaky_key_for)
    store.pool.forget_key(info.kid)
    return calls


# -- order and verification ---------------------------------------------------------------------


@pytest.mark.parametrize("parallelism", ["threads", "processes"])
@pytest.mark.parametrize(("spec", "alg"), [(KeySpec.EC_P256, "ES256"), (KeySpec.RSA_2048, "PS256")])
def test_order_is_kept_and_every_signature_verifies(
    make_store: Callable[..., Pkcs11KeyStore], parallelism: str, spec: KeySpec, alg: str
) -> None:
    if parallelism == "threads":
        # Threads into C: in a child interpreter, whose exit status tells.
        result = run_python(
            f"""
            from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore
            from hsm_keys.keystore.software import verify_signature
            from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm
            alg = SignatureAlgorithm.{alg}
            with Pkcs11KeyStore(parallelism="threads", pool_size=4) as store:
                info = store.generate(KeySpec.{spec.name}, Binding("order-threads-{alg}", "{ACCOUNT}"))
                sent = [b"%06d" % i * (i % 5 + 1) for i in range(301)]
                for workers in (1, 2, 4, 8):
                    signed = store.sign_many(info.kid, sent, alg, workers=workers, verify=True)
                    pairs = enumerate(zip(signed, sent))
                    bad = [i for i, (s, m) in pairs if not verify_signature(info.public_key, s, m, alg)]
                    assert len(signed) == len(sent) and not bad, (workers, bad)
                assert store.pool.stats().high_water <= 4
                store.destroy(info.kid)
            print("ok")
            """
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "ok"
        return
    store = make_store(parallelism="processes", max_processes=2)
    info = key(store, f"order-processes-{alg}", spec)
    sent = messages(301)
    for workers in (1, 2, 4):
        signed = store.sign_many(info.kid, sent, alg, workers=workers)
        assert_all_verify(info, signed, sent, SignatureAlgorithm.parse(alg))
    assert store.workers is not None and store.workers.stats()["workers"] == 2


def test_a_single_signature_never_leaves_the_calling_thread(
    make_store: Callable[..., Pkcs11KeyStore],
) -> None:
    store = make_store(parallelism="processes")
    info = key(store, "single")
    signature = store.sign(info.kid, b"one", EDDSA, verify=True)
    assert verify_signature(info.public_key, signature, b"one", EDDSA)
    assert store.workers is None and store._executor is None


# -- injected session failures ------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        p11e.SessionHandleInvalid,
        p11e.SessionClosed,
        p11e.DeviceError,
        p11e.DeviceRemoved,
        p11e.TokenNotPresent,
    ],
)
@pytest.mark.parametrize("after", [False, True], ids=["before-signing", "after-signing"])
def test_broken_sessions_are_replaced_and_items_retried(
    make_store: Callable[..., Pkcs11KeyStore],
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
    after: bool,
) -> None:
    store = make_store(parallelism="threads", max_retries=2)
    info = key(store, f"broken-{error.__name__}")
    sent = messages(20)
    calls = inject(monkeypatch, store, info, error, {sent[5]: 2, sent[12]: 1}, after=after)
    before = store.pool.stats().discarded_total
    signed = store.sign_many(info.kid, sent, EDDSA, workers=1)
    assert_all_verify(info, signed, sent, EDDSA)
    assert calls[sent[5]] == 3 and calls[sent[12]] == 2 and calls[sent[0]] == 1
    assert store.pool.stats().discarded_total - before == 3  # one fresh session per failure


def test_failures_beyond_the_budget_belong_to_their_item_only(
    make_store: Callable[..., Pkcs11KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(parallelism="threads", max_retries=2)
    info = key(store, "beyond-budget")
    sent = messages(10)
    calls = inject(monkeypatch, store, info, p11e.SessionHandleInvalid, {sent[7]: 99})
    results = store.sign_many_results(info.kid, sent, EDDSA, workers=1)
    assert calls[sent[7]] == 3  # the first try and two retries, no more
    assert [r.ok for r in results] == [i != 7 for i in range(10)]
    error = results[7].error
    assert isinstance(error, SessionError) and "gave up after 2 retries" in str(error)
    assert_all_verify(info, [r.signature or b"" for r in results if r.ok], sent[:7] + sent[8:], EDDSA)
    with pytest.raises(SigningError) as raised:
        store.sign_many(info.kid, sent, EDDSA, workers=1)
    assert len(raised.value.results) == 10 and not raised.value.results[7].ok
    with pytest.raises(SessionError):
        store.sign(info.kid, sent[7], EDDSA)


def test_throttling_is_waited_out_on_the_same_session(
    make_store: Callable[..., Pkcs11KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    quirks = Quirks(throttle_errors=("CKR_FUNCTION_FAILED",), throttle_backoff=0.001)
    store = make_store(parallelism="threads", max_retries=3, quirks=quirks)
    info = key(store, "throttled")
    sent = messages(6)
    calls = inject(monkeypatch, store, info, p11e.FunctionFailed, {sent[2]: 3})
    before = store.pool.stats()
    signed = store.sign_many(info.kid, sent, EDDSA, workers=1)
    assert_all_verify(info, signed, sent, EDDSA)
    assert calls[sent[2]] == 4
    after = store.pool.stats()
    assert after.discarded_total == before.discarded_total  # busy is not broken
    assert after.opened_total == before.opened_total


def test_without_the_quirk_throttling_is_not_retried(
    make_store: Callable[..., Pkcs11KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(parallelism="threads")
    info = key(store, "not-throttled")
    sent = messages(3)
    calls = inject(monkeypatch, store, info, p11e.FunctionFailed, {sent[1]: 1})
    results = store.sign_many_results(info.kid, sent, EDDSA, workers=1)
    assert calls[sent[1]] == 1
    assert [r.ok for r in results] == [True, False, True]
    assert type(results[1].error) is KeyStoreError and "FunctionFailed" in str(results[1].error)


def test_a_stale_key_handle_is_looked_up_again(
    make_store: Callable[..., Pkcs11KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(parallelism="threads")
    info = key(store, "stale-handle")
    sent = messages(4)
    calls = inject(monkeypatch, store, info, p11e.KeyHandleInvalid, {sent[0]: 1})
    before = store.pool.stats().discarded_total
    assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA, workers=1), sent, EDDSA)
    assert calls[sent[0]] == 2 and store.pool.stats().discarded_total == before


def test_other_errors_are_not_retried(
    make_store: Callable[..., Pkcs11KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(parallelism="threads")
    info = key(store, "general-error")
    sent = messages(5)
    calls = inject(monkeypatch, store, info, p11e.GeneralError, {sent[3]: 1})
    results = store.sign_many_results(info.kid, sent, EDDSA, workers=1)
    assert calls[sent[3]] == 1 and [r.ok for r in results] == [True, True, True, False, True]


def test_failures_under_threads_are_recovered_in_a_child_interpreter(pkcs11_env: dict[str, str]) -> None:
    result = run_python(
        f"""
        import random
        import pkcs11.exceptions as p11e
        from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore
        from hsm_keys.keystore.software import verify_signature
        from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm

        class Flaky:
            def __init__(self, key):
                self.key = key
            def sign(self, data, **options):
                if random.random() < 0.05:
                    raise random.choice([p11e.SessionHandleInvalid, p11e.DeviceError])()
                return self.key.sign(data, **options)

        alg = SignatureAlgorithm.ES256
        store = Pkcs11KeyStore(parallelism="threads", pool_size=4, max_retries=6)
        info = store.generate(KeySpec.EC_P256, Binding("flaky-threads", "{ACCOUNT}"))
        real = store._key_for
        def flaky_key_for(pooled, kid):
            found = real(pooled, kid)
            if not isinstance(found, Flaky):
                found = pooled.keys[kid] = Flaky(found)
            return found
        store._key_for = flaky_key_for
        sent = [b"%05d" % i for i in range(2000)]
        signed = store.sign_many(info.kid, sent, alg, workers=4)
        assert all(verify_signature(info.public_key, s, m, alg) for s, m in zip(signed, sent))
        stats = store.pool.stats()
        assert stats.discarded_total > 20 and stats.high_water <= 4, stats
        store._key_for = real
        store.destroy(info.kid)
        store.close()
        print(stats.discarded_total)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]


# -- settings, time-outs --------------------------------------------------------------------------


def test_retry_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        Quirks(throttle_errors=("CKR_NO_SUCH_THING",))
    with pytest.raises(ConfigurationError):
        Quirks(session_errors=("SESSION_CLOSED",))
    with pytest.raises(ConfigurationError):
        Quirks(throttle_backoff=-1)
    vendor = ErrorSet.of([0x80000001])
    assert vendor.matches(p11e.PKCS11Error("Unmapped error code 0x80000001"))
    assert not vendor.matches(p11e.PKCS11Error("Unmapped error code 0x80000002"))
    assert set(ErrorSet.of(Quirks.cloudhsm().throttle_errors).classes) == {
        p11e.FunctionFailed,
        p11e.OperationActive,
    }


@pytest.mark.parametrize(
    "options", [{"parallelism": "fibers"}, {"max_processes": 0}, {"worker_timeout": 0}, {"max_retries": -1}]
)
def test_bad_store_settings_are_configuration_errors(
    pkcs11_env: dict[str, str], options: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError):
        Pkcs11KeyStore(**options)


def test_the_wait_timeout_fires_when_every_session_is_busy(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(parallelism="threads", pool_size=1, wait_timeout=0.1)
    info = key(store, "timeout")
    with store.pool.borrow():
        started = time.monotonic()
        with pytest.raises(PoolTimeoutError):
            store.sign(info.kid, b"x", EDDSA)
        results = store.sign_many_results(info.kid, messages(3), EDDSA)
        assert all(isinstance(r.error, PoolTimeoutError) for r in results)
        assert time.monotonic() - started < 5
    store.sign(info.kid, b"x", EDDSA)


# -- worker processes ------------------------------------------------------------------------------


def _worker_pids(store: Pkcs11KeyStore) -> list[int]:
    assert store.workers is not None
    return store.workers.pids()


def test_workers_get_the_pin_over_their_socket_only(
    make_store: Callable[..., Pkcs11KeyStore], pkcs11_env: dict[str, str]
) -> None:
    store = make_store(parallelism="processes", max_processes=2)
    assert store.start_workers() == 2
    pin = pkcs11_env["HSM_KEYS_PIN"].encode()
    for pid in _worker_pids(store):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline, open(f"/proc/{pid}/environ", "rb") as environ:
            assert pin not in cmdline.read()
            assert pin not in environ.read()


def test_a_dead_worker_is_replaced_and_its_items_retried(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(parallelism="processes", max_processes=2)
    info = key(store, "worker-death")
    store.start_workers()
    for pid in _worker_pids(store):
        os.kill(pid, signal.SIGKILL)
    sent = messages(200)
    assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA), sent, EDDSA)
    assert store.workers is not None and store.workers.stats()["died_total"] >= 1


def test_worker_deaths_beyond_the_budget_are_per_item_errors(
    make_store: Callable[..., Pkcs11KeyStore],
) -> None:
    store = make_store(parallelism="processes", max_processes=2, max_retries=0)
    info = key(store, "worker-death-budget")
    store.start_workers()
    for pid in _worker_pids(store):
        os.kill(pid, signal.SIGKILL)
    sent = messages(200)
    results = store.sign_many_results(info.kid, sent, EDDSA)
    failed = [r for r in results if not r.ok]
    assert failed and all(isinstance(r.error, SessionError) for r in failed)
    assert "signing worker process" in str(failed[0].error)
    for result in results:
        if result.ok:
            assert result.signature is not None
            assert verify_signature(info.public_key, result.signature, sent[result.index], EDDSA)


def test_a_hung_worker_is_killed_after_the_worker_timeout(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(parallelism="processes", max_processes=2, worker_timeout=1.0)
    info = key(store, "worker-hang")
    store.start_workers()
    stopped = _worker_pids(store)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        sent = messages(100)
        assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA), sent, EDDSA)
        assert time.monotonic() - started < 30
        assert stopped not in _worker_pids(store)
    finally:
        if os.path.exists(f"/proc/{stopped}"):
            os.kill(stopped, signal.SIGKILL)


def test_workers_that_cannot_log_in_fail_each_item_with_the_login_error(
    make_store: Callable[..., Pkcs11KeyStore],
) -> None:
    store = make_store(parallelism="processes", max_processes=2)
    info = key(store, "worker-login")
    store._pin = Pin("not-the-pin")  # what the workers will be given
    results = store.sign_many_results(info.kid, messages(10), EDDSA)
    assert all(isinstance(r.error, LoginError) for r in results)
    with pytest.raises(LoginError):
        store.start_workers()


def test_close_stops_the_workers(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(parallelism="processes", max_processes=2)
    store.start_workers()
    pids = _worker_pids(store)
    store.close()
    for pid in pids:
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} still runs"


def test_auto_moves_large_batches_to_workers_on_softhsm(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(max_processes=2)
    assert store.parallelism == "auto" and store.cpu_bound
    info = key(store, "auto")
    sent = messages(64)
    deadline = time.monotonic() + 60
    while store.workers is None or store.workers.stats()["workers"] < 2:
        assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA), sent, EDDSA)
        assert time.monotonic() < deadline, "workers never started"
        time.sleep(0.05)
    assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA), sent, EDDSA)


# -- forks ----------------------------------------------------------------------------------------


def _wait_for_child(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


def test_a_forked_child_never_closes_the_parents_sessions_or_workers(
    make_store: Callable[..., Pkcs11KeyStore],
) -> None:
    store = make_store(parallelism="processes", max_processes=2)
    info = key(store, "fork-close")
    store.start_workers()
    worker_pids = _worker_pids(store)
    with store.pool.borrow() as pooled:
        parent_handle = pooled.session.handle
    parent_sessions = [p.session for p in store.pool._idle]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            closed: list[object] = []
            store._close_session = closed.append  # type: ignore[method-assign]
            signature = store.sign(info.kid, b"child", EDDSA, verify=True)
            store.close()
            # it closed its own new session, never one of the parent's
            inherited = [s for s in closed if any(s is p for p in parent_sessions)]
            code = 0 if signature and closed and not inherited else 2
        finally:
            os._exit(code)
    assert _wait_for_child(pid) == 0
    assert store._lib.session_state(parent_handle) is not None  # still open, still ours
    assert _worker_pids(store) == worker_pids
    sent = messages(50)
    assert_all_verify(info, store.sign_many(info.kid, sent, EDDSA), sent, EDDSA)


def test_a_child_forked_while_a_lock_was_held_can_sign(make_store: Callable[..., Pkcs11KeyStore]) -> None:
    store = make_store(parallelism="threads")
    info = key(store, "fork-lock")
    store._state_lock.acquire()
    store.pool._cond.acquire()  # as if other threads were inside the store at fork time
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signature = store.sign(info.kid, b"child", EDDSA, verify=True)
                code = 0 if signature else 2
            finally:
                os._exit(code)
    finally:
        store.pool._cond.release()
        store._state_lock.release()
    assert _wait_for_child(pid) == 0
    assert store.sign(info.kid, b"parent", EDDSA, verify=True)
