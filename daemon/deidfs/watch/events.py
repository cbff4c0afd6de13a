"""The watcher's event model: what it reports (:class:`Change`, :class:`FileEvent`), which
names and observer events it takes, and the work items its threads pass each other.

A file version is identified by its signature (device, inode, size, mtime_ns, ctime_ns), read
with ``os.lstat`` alone; the observer callback (:class:`_Enqueuer`) only enqueues. Nothing here
opens a file or logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

#: File names (lower-cased) ending like this are transfers in progress (dcm4che ``.part``,
#: RSNA CTP ``.partial``): never reported; their rename into place is.
IGNORED_SUFFIXES = (".part", ".partial")

# Event types the observer passes on. Opened/closed-without-write events are left out so that
# reads of the sources (by deidfs itself) do not wake the watcher; for inotify this also
# narrows the kernel mask.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    # The inotify queue overflowed (IN_Q_OVERFLOW): watchdog delivers this only to watches
    # whose filter lists it.
    EventsLostEvent,
]


class FileEvent(Enum):
    """What happened to a file."""

    READY = "ready"  #: settled: complete and stable, ready to be indexed (again)
    GONE = "gone"  #: a file reported ready was deleted, moved away or is no longer regular


@dataclass(frozen=True, slots=True)
class Change:
    """One report of the watcher to its sink."""

    folder_id: str
    path: Path  #: absolute source path
    kind: FileEvent


class _Sig(NamedTuple):
    """What identifies one version of a file's content without reading it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int  #: moves with every change, even one whose mtime was set back

    @classmethod
    def of(cls, st: os.stat_result) -> _Sig:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class _Pending:
    """A file seen but not yet settled (owned by the worker thread)."""

    sig: _Sig | None  #: last signature seen; None until the first sweep
    since: float  #: clock() of the last event or signature change
    quick: bool  #: closed after writing or renamed into place: a short check suffices


@dataclass(frozen=True, slots=True)
class _ScanBatch:
    scan_id: int
    files: list[tuple[str, _Sig]]
    reconcile: bool  #: a periodic scan: count what the observer missed


@dataclass(frozen=True, slots=True)
class _ScanEnd:
    scan_id: int
    complete: bool  #: the whole tree was read, so absent files may be declared gone
    initial: bool


@dataclass(frozen=True, slots=True)
class _RootLost:
    pass


class _Stop:
    pass


_STOP = _Stop()

_WorkItem = FileSystemEvent | _ScanBatch | _ScanEnd | _RootLost | _Stop


class _Cmd(Enum):
    RESCAN = "rescan"
    OVERFLOW = "overflow"  #: events were lost: rescan at once
    CHECK = "check"
    STOP = "stop"


@dataclass(slots=True)
class _ScanStats:
    files: int = 0
    dirs: dict[int, str] = field(default_factory=dict)  #: inode -> path of every directory


class _Enqueuer(FileSystemEventHandler):
    """Observer callback: runs on watchdog's dispatch thread, so it only enqueues.

    A loss of events goes straight to the supervisor, not behind the events queued for the
    worker: the rescan it calls for should not wait for a backlog to be settled first.
    """

    def __init__(self, put: Callable[[_WorkItem], None], lost: Callable[[], None]) -> None:
        super().__init__()
        self._put = put
        self._lost = lost

    def dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):
            self._lost()
        else:
            self._put(event)
