"""Append-only audit log of key and access operations.

One JSON object per line, appended and fsynced before the operation is reported done. Records never
hold a PIN, a credential or message contents: messages and tokens appear as SHA-256 digests only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

_FORBIDDEN_FIELDS = frozenset(
    {"pin", "password", "secret", "token", "credentials", "message", "session_token"}
)


def digest(data: bytes | str) -> str:
    """What an audit record says about contents: their SHA-256."""
    raw = data.encode() if isinstance(data, str) else data
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class AuditLog(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...


class NullAuditLog:
    def record(self, event: str, **fields: Any) -> None:
        return None


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(name for name in fields if name.lower() in _FORBIDDEN_FIELDS)
    if bad:
        raise ValueError(f"audit records never hold {', '.join(bad)}; record a digest instead")
    return fields


class MemoryAuditLog:
    """Records kept in a list (tests, and services that forward records elsewhere)."""

    def __init__(self, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def record(self, event: str, **fields: Any) -> None:
        self.records.append({"time": self._clock().isoformat(), "event": event, **_checked(fields)})


class JsonlAuditLog:
    """Appends JSON lines to a file opened with O_APPEND, fsynced per record."""

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], dt.datetime] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": self._clock().isoformat(), "event": event, **_checked(fields)}
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
