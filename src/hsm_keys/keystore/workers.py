"""Signing in worker processes, for tokens whose signing burns this machine's CPUs (SoftHSM).

Why processes: SoftHSM's ECDSA scales only 1.4-1.7x across threads on 2 cores (contention inside
the module) but about 1.9x across processes. Each worker is a fresh interpreter started with
``subprocess`` (never a fork of a threaded parent, whose module state and locks it would inherit),
with its own module initialisation, login and session. It gets its configuration and the PIN over
a private socket, never through argv or the environment, and exits when that socket closes, so a
parent that dies leaves no workers behind.

The parent splits a batch into chunks, keeps two chunks in flight per worker (the next one is
already queued when one finishes), and reassembles the outcomes in order. A worker that dies or
stops answering is killed and replaced; its chunks are retried ``max_retries`` times, then each of
their items carries a ``SessionError``. No call waits for ever.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

import hsm_keys
from hsm_keys import errors
from hsm_keys.errors import (
    ConfigurationError,
    HsmKeysError,
    KeyStoreError,
    LoginError,
    PoolTimeoutError,
    SessionError,
)
from hsm_keys.types import SignatureAlgorithm

if TYPE_CHECKING:
    from hsm_keys.keystore.pkcs11 import Pin, Quirks

# Items per message to a worker: large enough to amortise a round trip (tens of microseconds),
# small enough to balance the load and keep a dead worker's lost work small.
MAX_CHUNK = 64
IN_FLIGHT_PER_WORKER = 2
START_TIMEOUT = 60.0
START_ATTEMPTS = 3
STOP_TIMEOUT = 5.0

_PIN_VARIABLES = frozenset({"HSM_KEYS_PIN", "HSM_KEYS_PKCS11_URI"})
_WORKER_CODE = "import sys; from hsm_keys.keystore.workers import serve; serve(int(sys.argv[1]))"


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to open its own store; the PIN travels separately, over the socket."""

    module: str
    token_label: str
    serial: str | None
    max_retries: int
    open_interval: float
    wait_timeout: float
    quirks: Quirks


Outcome = bytes | HsmKeysError


def _encode_outcome(outcome: Outcome) -> bytes | tuple[str, str]:
    if isinstance(outcome, HsmKeysError):
        return (type(outcome).__name__, str(outcome))
    return outcome


def _decode_outcome(outcome: bytes | tuple[str, str]) -> Outcome:
    if isinstance(outcome, bytes):
        return outcome
    name, message = outcome
    error_type = getattr(errors, name, None)
    if not (isinstance(error_type, type) and issubclass(error_type, HsmKeysError)):
        error_type = KeyStoreError
    try:
        return error_type(message)
    except TypeError:  # an error type with a different constructor
        return KeyStoreError(message)


# -- the worker side --------------------------------------------------------------------------------


def serve(fd: int) -> None:
    """Worker entry point: open a store from the configuration sent by the parent, sign until the
    socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    conn = Connection(fd)
    try:
        _serve(conn)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def _serve(conn: Connection) -> None:
    from hsm_keys.keystore.pkcs11 import Pin, Pkcs11KeyStore  # noqa: PLC0415 - pkcs11 imports this module

    _, config, pin = conn.recv()
    try:
        store = Pkcs11KeyStore(
            module=config.module,
            token_label=config.token_label or None,
            uri=f"pkcs11:serial={config.serial}" if config.serial else None,
            pin=Pin(pin.decode("utf-8")),
            pool_size=1,
            wait_timeout=config.wait_timeout,
            open_interval=config.open_interval,
            max_retries=config.max_retries,
            parallelism="threads",
            quirks=config.quirks,
        )
    except HsmKeysError as exc:
        conn.send(("failed", _encode_outcome(exc)))
        return
    del pin
    with store:
        conn.send(("ready", os.getpid()))
        while True:
            request = conn.recv()
            if request[0] != "sign":
                break
            _, job, kid, alg_name, messages = request
            alg = SignatureAlgorithm(alg_name)
            try:
                done = store._sign_items(kid, messages, alg, range(len(messages)))
                outcomes = [_encode_outcome(outcome) for _, outcome in sorted(done, key=lambda d: d[0])]
            except HsmKeysError as exc:
                outcomes = [_encode_outcome(exc)] * len(messages)
            conn.send(("done", job, outcomes))


# -- the parent side --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    pid: int = 0
    jobs: deque[_Job] = field(default_factory=deque)
    busy_since: float = 0.0

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Ask politely (the worker closes its session), then kill if it does not go."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("stop",))
        with contextlib.suppress(OSError):
            self.conn.close()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def describe(self) -> str:
        code = self.process.poll()
        state = f"exited with status {code}" if code is not None else "stopped answering"
        return f"signing worker process {self.pid or self.process.pid} {state}"


@dataclass(frozen=True)
class _Batch:
    kid: str
    alg: SignatureAlgorithm
    messages: Sequence[bytes]


@dataclass
class _Job:
    start: int
    end: int
    attempt: int = 0


class ProcessSigner:
    """A bounded pool of worker processes; each ``sign`` call borrows up to ``count`` of them."""

    def __init__(
        self,
        config: WorkerConfig,
        pin: Pin,
        *,
        max_workers: int,
        wait_timeout: float = 30.0,
        call_timeout: float = 60.0,
        max_retries: int = 2,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self._config = config
        self._pin = pin
        self.max_workers = max_workers
        self.wait_timeout = wait_timeout
        self.call_timeout = call_timeout
        self.max_retries = max_retries
        self.start_timeout = start_timeout
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive or starting
        self._closed = False
        self._pid = os.getpid()
        self._background: threading.Thread | None = None
        self.started_total = 0
        self.died_total = 0
        self._all: list[_Worker] = []  # every worker started, for close and for tests
        # Workers exit when their socket closes anyway; this stops them when the signer is dropped.
        weakref.finalize(self, _stop_all, self._all, self._pid)

    # -- starting workers ---------------------------------------------------------------------------

    def start(self, count: int) -> int:
        """Start workers until ``count`` exist (at most ``max_workers``); returns how many are idle."""
        with self._cond:
            wanted = max(0, min(count, self.max_workers) - self._count)
            self._count += wanted
        if wanted:
            try:
                started = self._spawn(wanted)
            finally:
                with self._cond:
                    self._count -= wanted
            with self._cond:
                self._count += len(started)
                if self._closed:
                    for worker in started:
                        worker.stop()
                else:
                    self._idle.extend(started)
                self._cond.notify_all()
        with self._cond:
            return len(self._idle)

    def ready(self, count: int, *, start: bool = False) -> bool:
        """True when ``count`` workers exist; with ``start``, begin starting them in the background."""
        with self._cond:
            if self._count >= count and self._background is None:
                return True
            if start and self._background is None and not self._closed:
                self._background = threading.Thread(
                    target=self._start_in_background, args=(count,), name="hsm-keys-workers", daemon=True
                )
                self._background.start()
        return False

    def _start_in_background(self, count: int) -> None:
        with contextlib.suppress(HsmKeysError):
            self.start(count)
        with self._cond:
            self._background = None

    def _spawn(self, count: int) -> list[_Worker]:
        """``_spawn_once``, retried: SoftHSM read by a starting process while another writes the
        token (key generation) can show it uninitialised for that process's whole life."""
        for attempt in range(START_ATTEMPTS):
            try:
                return self._spawn_once(count)
            except (LoginError, ConfigurationError):
                raise
            except HsmKeysError:
                if attempt + 1 == START_ATTEMPTS:
                    raise
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    def _spawn_once(self, count: int) -> list[_Worker]:
        """Start ``count`` workers in parallel and wait for each to log in."""
        # The PIN reaches the worker over the socket only; drop the variables that may carry it.
        env = {k: v for k, v in os.environ.items() if k not in _PIN_VARIABLES}
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(hsm_keys.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
        launched: list[_Worker] = []
        try:
            for _ in range(count):
                parent_end, child_end = socket.socketpair()
                try:
                    process = subprocess.Popen(
                        [sys.executable, "-c", _WORKER_CODE, str(child_end.fileno())],
                        pass_fds=(child_end.fileno(),),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        env=env,
                    )
                finally:
                    child_end.close()
                worker = _Worker(process, Connection(parent_end.detach()))
                launched.append(worker)
                worker.conn.send(("init", self._config, self._pin.reveal()))
            deadline = time.monotonic() + self.start_timeout
            for worker in launched:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not worker.conn.poll(remaining):
                    raise SessionError(
                        f"{worker.describe()} while starting (timeout {self.start_timeout:g} s)"
                    )
                reply = worker.conn.recv()
                if reply[0] != "ready":
                    error = _decode_outcome(reply[1])
                    assert isinstance(error, HsmKeysError)
                    raise error
                worker.pid = int(reply[1])
        except BaseException as exc:
            for worker in launched:
                worker.kill()
            if isinstance(exc, (EOFError, OSError)):
                raise SessionError(f"a signing worker process failed to start: {exc!r}") from exc
            raise
        with self._cond:
            self.started_total += len(launched)
            self._all[:] = [w for w in self._all if w.process.poll() is None] + launched
        return launched

    # -- borrowing ----------------------------------------------------------------------------------

    def _checkout(self, count: int) -> list[_Worker]:
        """Up to ``count`` workers, at least one: idle ones first, new ones while below the bound."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            with self._cond:
                if self._closed:
                    raise PoolTimeoutError("the signing worker pool is closed")
                taken = self._idle[-count:]
                del self._idle[len(self._idle) - len(taken) :]
                missing = min(count - len(taken), self.max_workers - self._count)
                if taken or missing > 0:
                    self._count += max(missing, 0)
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolTimeoutError(
                        f"no signing worker process became free within {self.wait_timeout:g} s "
                        f"({self.max_workers} workers, all in use)"
                    )
                self._cond.wait(remaining)
        if missing > 0:
            try:
                started = self._spawn(missing)
            except BaseException:
                with self._cond:
                    self._count -= missing
                    self._cond.notify_all()
                if taken:
                    return taken  # sign with the workers we have
                raise
            taken.extend(started)
        return taken

    def _checkin(self, workers: Sequence[_Worker]) -> None:
        with self._cond:
            for worker in workers:
                if self._closed:
                    worker.stop()
                    self._count -= 1
                else:
                    self._idle.append(worker)
            self._cond.notify_all()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            self._count -= 1
            self.died_total += 1
            self._cond.notify_all()

    # -- signing ------------------------------------------------------------------------------------

    def sign(self, kid: str, alg: SignatureAlgorithm, messages: Sequence[bytes], count: int) -> list[Outcome]:
        """Sign ``messages`` across up to ``count`` workers; one outcome per message, in order."""
        total = len(messages)
        results: list[Outcome | None] = [None] * total
        try:
            workers = self._checkout(max(1, count))
        except HsmKeysError as exc:
            return [exc] * total
        size = max(1, min(MAX_CHUNK, math.ceil(total / (len(workers) * 4))))
        pending = deque(_Job(start, min(start + size, total)) for start in range(0, total, size))
        live = list(workers)
        try:
            self._run(_Batch(kid, alg, messages), pending, live, results)
        finally:
            self._checkin([w for w in live if not w.jobs])
            for worker in live:
                if worker.jobs:  # interrupted mid-batch: its replies would confuse the next batch
                    self._discard(worker)
        return [
            r if r is not None else SessionError(f"item {i} was not signed") for i, r in enumerate(results)
        ]

    def _run(
        self,
        batch: _Batch,
        pending: deque[_Job],
        live: list[_Worker],
        results: list[Outcome | None],
    ) -> None:
        def feed(worker: _Worker) -> None:
            while len(worker.jobs) < IN_FLIGHT_PER_WORKER and pending:
                job = pending.popleft()
                if not worker.jobs:
                    worker.busy_since = time.monotonic()
                worker.jobs.append(job)
                chunk = list(batch.messages[job.start : job.end])
                worker.conn.send(("sign", id(job), batch.kid, batch.alg.value, chunk))

        def lose(worker: _Worker) -> None:
            """The worker died or hung: kill it, give its chunks another try or their error."""
            reason = worker.describe()
            live.remove(worker)
            jobs, worker.jobs = list(worker.jobs), deque()
            self._discard(worker)
            for job in jobs:
                if job.attempt < self.max_retries:
                    job.attempt += 1
                    pending.appendleft(job)
                else:
                    error = SessionError(f"{reason}; gave up after {job.attempt} retries")
                    results[job.start : job.end] = [error] * (job.end - job.start)
            if pending and not live:
                try:
                    live.extend(self._checkout(1))
                except HsmKeysError as exc:
                    while pending:
                        job = pending.popleft()
                        results[job.start : job.end] = [exc] * (job.end - job.start)

        def feed_all() -> None:
            for worker in list(live):
                try:
                    feed(worker)
                except OSError:
                    lose(worker)

        feed_all()
        while any(w.jobs for w in live):
            busy = [w for w in live if w.jobs]
            now = time.monotonic()
            overdue = [w for w in busy if now - w.busy_since > self.call_timeout]
            for worker in overdue:
                lose(worker)
            if overdue:
                feed_all()
                continue
            timeout = min(w.busy_since for w in busy) + self.call_timeout - now
            by_conn = {w.conn: w for w in busy}
            for conn in wait(list(by_conn), timeout=max(timeout, 0.0)):
                worker = by_conn[conn]  # type: ignore[index]
                try:
                    reply = worker.conn.recv()
                except (EOFError, OSError):
                    lose(worker)
                    continue
                job = worker.jobs.popleft()
                worker.busy_since = time.monotonic()
                if reply[0] != "done" or reply[1] != id(job) or len(reply[2]) != job.end - job.start:
                    worker.jobs.appendleft(job)
                    lose(worker)  # a confused worker is a dead worker
                    continue
                results[job.start : job.end] = [_decode_outcome(o) for o in reply[2]]
            feed_all()

    # -- shutting down ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "workers": self._count,
                "idle": len(self._idle),
                "started_total": self.started_total,
                "died_total": self.died_total,
            }

    def pids(self) -> list[int]:
        return [w.pid for w in list(self._all) if w.process.poll() is None]

    def close(self) -> None:
        """Stop idle workers now; busy ones are stopped when their batch returns them."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            worker.stop()

    def abandon(self) -> None:
        """In a forked child: close this process's copies of the sockets, never stop the parent's
        workers (they go on serving the parent). Takes no lock (see ``SessionPool.abandon``)."""
        self._cond = threading.Condition()
        self._closed = True
        for worker in list(self._all):
            with contextlib.suppress(OSError):
                worker.conn.close()
        self._idle = []
        self._all[:] = []


def _stop_all(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return
    for worker in list(workers):
        if worker.process.poll() is None:
            worker.stop()


__all__ = ["ProcessSigner", "WorkerConfig", "serve"]
