"""The worker thread of a folder's watcher: observer events and scan results in, changes out.

:class:`_Worker` takes the work items the observer callback and the supervisor queue, turns
each raw watchdog event (created, modified, closed, moved, deleted; also of directories) into
activity or a removal check for the :class:`~deidfs.watch.settle._Settler`, sweeps the pending
files every tick, and hands the changes to the sink, outside the lock. An error of the sink or
of one file is logged (folder id and exception type only) and does not stop the thread.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)

from deidfs.watch.context import _Shared
from deidfs.watch.events import (
    Change,
    FileEvent,
    _Cmd,
    _RootLost,
    _ScanBatch,
    _ScanEnd,
    _Sig,
    _Stop,
    _WorkItem,
)
from deidfs.watch.settle import _Settler

logger = logging.getLogger(__name__)


class _Worker:
    """Settles files and calls the sink (the watcher's worker thread runs :meth:`run`)."""

    def __init__(
        self,
        shared: _Shared,
        settler: _Settler,
        sink: Callable[[Change], None],
        *,
        settle_seconds: float,
    ) -> None:
        self._folder_id = shared.folder_id
        self._root = shared.root
        self._clock = shared.clock
        self._lock = shared.lock
        self._events = shared.events
        self._commands = shared.commands
        self._stopping = shared.stopping
        self._settler = settler
        self._sink = sink
        self._tick = min(max(float(settle_seconds) / 4, 0.02), 0.25)
        self._next_sweep = 0.0
        self.event_counts: dict[str, int] = {}  #: read under the lock

    def run(self) -> None:
        while True:
            try:
                item: _WorkItem | None = self._events.get(timeout=self._tick)
            except queue.Empty:
                item = None
            if isinstance(item, _Stop) or self._stopping.is_set():
                return
            out: list[tuple[Change, _Sig | None]] = []
            try:
                if item is not None:
                    self._handle(item, out)
                now = self._clock()
                if now >= self._next_sweep:
                    self._next_sweep = now + self._tick
                    self._settler.sweep(now, out)
            except Exception as exc:  # contain: a watcher must outlive any one bad file
                logger.error(
                    "folder %s: internal error while settling files (%s)",
                    self._folder_id,
                    type(exc).__name__,
                )
            self._emit(out)

    def _emit(self, out: list[tuple[Change, _Sig | None]]) -> None:
        for change, sig in out:
            if self._stopping.is_set():
                return
            try:
                self._sink(change)
            except Exception as exc:  # the sink's failure must not stop the watcher
                logger.error(
                    "folder %s: sink failed on a %s change (%s)",
                    self._folder_id,
                    change.kind.value,
                    type(exc).__name__,
                )
                if change.kind is FileEvent.READY:
                    self._settler.offer_again(change, sig)

    def _handle(self, item: _WorkItem, out: list[tuple[Change, _Sig | None]]) -> None:
        if isinstance(item, _ScanBatch):
            self._settler.on_scan_batch(item, out)
        elif isinstance(item, _ScanEnd):
            self._settler.on_scan_end(item, out)
        elif isinstance(item, _RootLost):
            self._settler.on_root_lost(out)
        elif isinstance(item, FileSystemEvent):
            self._on_fs_event(item, out)

    def _on_fs_event(self, event: FileSystemEvent, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            kind = event.event_type
            self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        src = self._root.from_observer(event.src_path)
        now = self._clock()
        if isinstance(event, FileMovedEvent):
            self._settler.check_gone(src, out)
            self._settler.touch(self._root.from_observer(event.dest_path), now, quick=True)
        elif isinstance(event, FileClosedEvent):
            self._settler.touch(src, now, quick=True)
        elif isinstance(event, FileAttribEvent):
            self._settler.touch(src, now, quick=None)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._settler.touch(src, now, quick=False)
        elif isinstance(event, FileDeletedEvent):
            self._settler.check_gone(src, out)
        elif isinstance(event, DirDeletedEvent | DirMovedEvent):
            if src == self._root.root_str:
                # The emitter stops on its own root's deletion; let the supervisor look now.
                self._commands.put(_Cmd.CHECK)
            prefix = src.rstrip("/") + "/"
            for path in self._settler.known_below(prefix):
                self._settler.check_gone(path, out)
