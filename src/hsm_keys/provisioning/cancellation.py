"""Cancellation of late work: once an answer has been given, work still running must change nothing.

The onboarding handler runs its work in a thread against the Lambda deadline and answers FAILED when
the deadline comes first. Python cannot stop that thread, so the work is made unable to write: it runs
under a :class:`Cancellation` (held in a context variable, so layers below need no extra argument),
and every write checks it first -- each AWS call (:class:`~hsm_keys.provisioning.aws.AwsCaller`), each
key generated or destroyed, each issuer published or unpublished (:func:`checkpoint`), each registry
commit (:func:`committing`). A commit holds the token's lock while it runs, so cancelling either
happens before it (and the commit is refused) or waits for it to end (and the canceller sees that it
happened, in :attr:`Cancellation.commits`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from hsm_keys.errors import WorkCancelledError


class Cancellation:
    """A one-way switch that stops every later write of the work running under it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._reason = ""
        self.commits = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, reason: str, *, timeout: float | None = None) -> bool:
        """Refuse every later write; wait up to ``timeout`` s for a commit in progress to end.

        Returns True when no commit was in progress any more (the switch is exact); False when one
        was still running after ``timeout`` -- it may yet land, every later one is refused.
        """
        acquired = self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        try:
            self._reason = reason
            self._cancelled = True
        finally:
            if acquired:
                self._lock.release()
        return acquired

    def check(self, what: str) -> None:
        """Raise :class:`WorkCancelledError` if cancelled."""
        if self._cancelled:
            raise WorkCancelledError(f"{what} was not done: the work was cancelled ({self._reason})")

    @contextlib.contextmanager
    def commit(self, what: str) -> Iterator[None]:
        """Run one commit only if not cancelled, and never while :meth:`cancel` decides."""
        with self._lock:
            self.check(what)
            yield
            self.commits += 1


_current: contextvars.ContextVar[Cancellation | None] = contextvars.ContextVar(
    "hsm_keys_cancellation", default=None
)


@contextlib.contextmanager
def cancellable(token: Cancellation) -> Iterator[Cancellation]:
    """Run the block (in this thread / context) under ``token``."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)


def checkpoint(what: str) -> None:
    """Before a write: raise :class:`WorkCancelledError` if the work running here was cancelled."""
    token = _current.get()
    if token is not None:
        token.check(what)


@contextlib.contextmanager
def committing(what: str) -> Iterator[None]:
    """Around a commit (e.g. a registry write): refused when cancelled, atomic with cancelling."""
    token = _current.get()
    if token is None:
        yield
        return
    with token.commit(what):
        yield


__all__ = ["Cancellation", "WorkCancelledError", "cancellable", "checkpoint", "committing"]
