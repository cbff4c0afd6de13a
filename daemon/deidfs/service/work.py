"""The index work queue: pending source events (one per source, the newest wins) that the
``deidfs-index-N`` threads take, and the cancel flag a render in progress checks.

A source being indexed is not handed out again until it is done, so a GONE cannot overtake
the READY being rendered for the same file.
"""

from __future__ import annotations

import threading
from collections import deque
from enum import Enum

_Key = tuple[str, str]


class _Kind(Enum):
    """What a queued source needs."""

    READY = "ready"  #: the watcher says it settled: index it
    GONE = "gone"  #: the watcher says it went away: forget it
    HINT = "hint"  #: an open found it changed: index it once it is no longer being written


class _WorkQueue:
    """Pending source events, one per source (the newest wins), never two at once.

    A source being indexed is not handed out again until :meth:`done`, so a GONE cannot
    overtake the READY being rendered for the same file.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[_Key, _Kind] = {}
        self._order: deque[_Key] = deque()
        self._inflight: set[_Key] = set()
        self._closed = False

    def put(self, key: _Key, kind: _Kind) -> None:
        """Queue what a source needs; a newer report replaces a pending one."""
        with self._cond:
            if self._closed or (kind is _Kind.HINT and key in self._pending):
                return  # a hint never overrides what the watcher reported
            fresh = key not in self._pending
            self._pending[key] = kind
            if fresh and key not in self._inflight:
                self._order.append(key)
                self._cond.notify()

    def get(self, timeout: float) -> tuple[_Key, _Kind] | None:
        """The next source not being worked on, or None after ``timeout`` or close."""
        with self._cond:
            while not self._order:
                if self._closed or not self._cond.wait(timeout):
                    return None
            key = self._order.popleft()
            kind = self._pending.pop(key)
            self._inflight.add(key)
            return key, kind

    def done(self, key: _Key) -> None:
        """A worker finished a source; a report that came meanwhile becomes available."""
        with self._cond:
            self._inflight.discard(key)
            if key in self._pending and not self._closed:
                self._order.append(key)
                self._cond.notify()

    def close(self) -> None:
        """Wake every waiting worker; nothing is queued any more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._inflight)


class _CancelFlag:
    """Set when the daemon stops or the export stops itself; an export never stops the daemon."""

    def __init__(self, daemon_stop: threading.Event) -> None:
        self._daemon_stop = daemon_stop
        self._own = threading.Event()

    def is_set(self) -> bool:
        return self._daemon_stop.is_set() or self._own.is_set()

    def set(self) -> None:
        self._own.set()
