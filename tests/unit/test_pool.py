"""The session pool with fake sessions: bounded, lazy, paced, timed out, replacing broken sessions."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from hsm_keys.errors import ConfigurationError, PoolTimeoutError
from hsm_keys.keystore.pool import SessionPool


@dataclass
class FakeToken:
    """Opens numbered fake sessions and records what happens to them."""

    opened: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> int:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("token refused")
            handle = len(self.opened) + 1
            self.opened.append(handle)
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
            return handle

    def close(self, handle: int) -> None:
        with self.lock:
            self.closed.append(handle)
            self.open_now -= 1


def make_pool(token: FakeToken, **options: float) -> SessionPool[int]:
    size = int(options.pop("max_size", 3))
    return SessionPool(token.open, token.close, max_size=size, **options)


def test_sessions_open_lazily_and_are_reused() -> None:
    token = FakeToken()
    pool = make_pool(token)
    assert token.opened == []
    first = pool.acquire()
    pool.release(first)
    second = pool.acquire()
    assert second is first and second.uses == 2
    pool.release(second)
    assert token.opened == [1]


def test_pool_never_exceeds_its_bound_under_contention() -> None:
    token = FakeToken()
    pool = make_pool(token, max_size=4, wait_timeout=10.0)
    in_use, most_in_use, guard = [0], [0], threading.Lock()

    def work() -> None:
        for _ in range(200):
            pooled = pool.acquire()
            with guard:
                in_use[0] += 1
                most_in_use[0] = max(most_in_use[0], in_use[0])
            time.sleep(0)
            with guard:
                in_use[0] -= 1
            pool.release(pooled, broken=pooled.uses % 17 == 0)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most_in_use[0] <= 4
    assert token.most_open <= 4
    stats = pool.stats()
    assert stats.high_water <= 4 and stats.in_use == 0
    assert stats.discarded_total == len(token.closed) > 0  # broken sessions were closed and replaced


def test_wait_timeout_raises_pool_timeout_error() -> None:
    token = FakeToken()
    pool = make_pool(token, max_size=1, wait_timeout=0.05)
    held = pool.acquire()
    started = time.monotonic()
    with pytest.raises(PoolTimeoutError, match=r"within 0\.05 s"):
        pool.acquire()
    assert time.monotonic() - started >= 0.04
    pool.release(held)
    pool.release(pool.acquire(timeout=0.01))


def test_a_waiter_gets_the_session_released_by_another_thread() -> None:
    token = FakeToken()
    pool = make_pool(token, max_size=1, wait_timeout=5.0)
    held = pool.acquire()
    timer = threading.Timer(0.05, pool.release, args=(held,))
    timer.start()
    assert pool.acquire() is held
    timer.join()


def test_broken_sessions_are_closed_and_replaced() -> None:
    token = FakeToken()
    pool = make_pool(token, max_size=1)
    first = pool.acquire()
    pool.release(first, broken=True)
    assert token.closed == [first.session]
    second = pool.acquire()
    assert second.session != first.session and second.keys == {}
    assert pool.stats().discarded_total == 1


def test_a_failed_open_frees_its_slot() -> None:
    token = FakeToken(fail_next=1)
    pool = make_pool(token, max_size=1, wait_timeout=0.05)
    with pytest.raises(RuntimeError):
        pool.acquire()
    pool.release(pool.acquire())  # the slot is free again: no timeout


def test_opens_are_paced() -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(round(seconds, 6))
        now[0] += seconds

    token = FakeToken()
    pool = SessionPool(
        token.open, token.close, max_size=3, open_interval=0.5, clock=lambda: now[0], sleep=sleep
    )
    held = [pool.acquire() for _ in range(3)]
    assert sleeps == [0.5, 0.5]  # the first open is immediate, each later one waits its turn
    for pooled in held:
        pool.release(pooled)


def test_close_closes_idle_now_and_busy_sessions_on_return() -> None:
    token = FakeToken()
    pool = make_pool(token, max_size=2)
    busy, idle = pool.acquire(), pool.acquire()
    pool.release(idle)
    pool.close()
    assert token.closed == [idle.session]
    pool.release(busy)
    assert sorted(token.closed) == [1, 2]
    with pytest.raises(PoolTimeoutError):
        pool.acquire()


def test_abandon_closes_nothing_and_ignores_a_held_lock() -> None:
    """After a fork the parent's sessions must not be closed, and a lock some parent thread held
    at fork time must not be waited for."""
    token = FakeToken()
    pool = make_pool(token, max_size=2)
    pool.release(pool.acquire())
    pool._cond.acquire()  # as if another thread held it when the process forked
    done = threading.Event()
    threading.Thread(target=lambda: (pool.abandon(), done.set()), daemon=True).start()
    assert done.wait(2.0), "abandon() waited for a lock"
    assert token.closed == []
    assert pool.stats().open == 0


def test_forget_key_drops_cached_handles_from_idle_sessions() -> None:
    token = FakeToken()
    pool = make_pool(token)
    pooled = pool.acquire()
    pooled.keys["kid"] = object()
    pool.release(pooled)
    pool.forget_key("kid")
    assert pool.acquire().keys == {}


@pytest.mark.parametrize("options", [{"max_size": 0}, {"wait_timeout": 0}, {"open_interval": -1}])
def test_bad_settings_are_configuration_errors(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        make_pool(FakeToken(), **options)
