"""A bounded pool of PKCS#11 sessions (the crypto11 shape: borrow a session, give it back).

Sessions open lazily up to ``max_size`` (never above what the token allows), optionally paced
(CloudHSM refuses fast bursts of session opens), and a borrower waits at most ``wait_timeout``
before ``PoolTimeoutError``. A session that went bad is discarded rather than returned, so the next
borrower gets a fresh one. Each pooled session carries its own key-handle cache: a signature never
pays an object lookup. The pool is generic over the session object so tests can drive it with fakes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hsm_keys.errors import ConfigurationError, PoolTimeoutError

S = TypeVar("S")


@dataclass(eq=False)
class PooledSession(Generic[S]):
    """A session plus what is cached against it (key handles by kid)."""

    session: S
    keys: dict[str, Any] = field(default_factory=dict)
    uses: int = 0


@dataclass(frozen=True)
class PoolStats:
    open: int
    idle: int
    in_use: int
    opened_total: int
    discarded_total: int
    high_water: int


class SessionPool(Generic[S]):
    """Thread-safe bounded pool. ``opener`` opens (and logs in) a session; ``closer`` closes one."""

    def __init__(
        self,
        opener: Callable[[], S],
        closer: Callable[[S], None],
        *,
        max_size: int,
        wait_timeout: float = 30.0,
        open_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_size < 1:
            raise ConfigurationError(f"pool size must be at least 1, got {max_size}")
        if wait_timeout <= 0:
            raise ConfigurationError(f"pool wait timeout must be positive, got {wait_timeout}")
        if open_interval < 0:
            raise ConfigurationError(f"session open interval must not be negative, got {open_interval}")
        self._opener = opener
        self._closer = closer
        self.max_size = max_size
        self.wait_timeout = wait_timeout
        self.open_interval = open_interval
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._idle: list[PooledSession[S]] = []
        self._open = 0  # sessions that exist (idle + in use + being opened)
        self._opened_total = 0
        self._discarded_total = 0
        self._high_water = 0
        self._next_open_at = 0.0
        self._waiting = 0  # borrowers blocked in acquire()
        self._closed = False

    def acquire(self, timeout: float | None = None) -> PooledSession[S]:
        with self._cond:
            # Fast path (every signature takes it in steady state): an idle session, no clock read.
            if self._idle and not self._closed:
                pooled = self._idle.pop()
                pooled.uses += 1
                return pooled
            deadline = self._clock() + (self.wait_timeout if timeout is None else timeout)
            while True:
                if self._closed:
                    raise PoolTimeoutError("the session pool is closed")
                if self._idle:
                    pooled = self._idle.pop()
                    pooled.uses += 1
                    return pooled
                if self._open < self.max_size:
                    self._open += 1
                    self._high_water = max(self._high_water, self._open)
                    wait_until = self._next_open_at
                    self._next_open_at = max(self._clock(), wait_until) + self.open_interval
                    break
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise PoolTimeoutError(
                        f"no PKCS#11 session became free within {self.wait_timeout:g} s "
                        f"(pool size {self.max_size}, all in use)"
                    )
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
        # Open outside the lock: opening (and pacing) must not block borrowers of idle sessions.
        try:
            delay = wait_until - self._clock()
            if delay > 0:
                self._sleep(delay)
            session = self._opener()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._opened_total += 1
        return PooledSession(session, uses=1)

    def release(self, pooled: PooledSession[S], *, broken: bool = False) -> None:
        """Return a session; a broken one (or any, once the pool is closed) is closed instead."""
        with self._cond:
            keep = not broken and not self._closed
            if keep:
                self._idle.append(pooled)
            else:
                self._open -= 1
                self._discarded_total += int(broken)
            if self._waiting:  # Condition.notify costs a deque even with nobody to wake
                self._cond.notify()
        if not keep:
            self._close_quietly(pooled)

    @contextlib.contextmanager
    def borrow(self, timeout: float | None = None) -> Iterator[PooledSession[S]]:
        pooled = self.acquire(timeout)
        try:
            yield pooled
        except BaseException:
            # The caller decides on brokenness through ``release(broken=True)`` paths; an exception
            # escaping here leaves the session's state unknown, so it is not reused.
            self.release(pooled, broken=True)
            raise
        self.release(pooled)

    def forget_key(self, kid: str) -> None:
        """Drop a key's cached handle from every idle session (in-use ones re-check on failure)."""
        with self._cond:
            for pooled in self._idle:
                pooled.keys.pop(kid, None)

    def close(self) -> None:
        """Close idle sessions now; sessions in use are closed when they come back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            self._close_quietly(pooled)

    def abandon(self) -> None:
        """Forget every session without closing it (after a fork: they belong to the parent).

        Takes no lock: in a forked child the lock may have been held by a parent thread that does
        not exist here, and waiting for it would hang forever.
        """
        self._cond = threading.Condition()
        self._closed = True
        self._idle = []
        self._open = 0

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                open=self._open,
                idle=len(self._idle),
                in_use=self._open - len(self._idle),
                opened_total=self._opened_total,
                discarded_total=self._discarded_total,
                high_water=self._high_water,
            )

    def _close_quietly(self, pooled: PooledSession[S]) -> None:
        with contextlib.suppress(Exception):
            self._closer(pooled.session)
