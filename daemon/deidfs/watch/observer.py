"""The watchdog observer of one folder: which kind, starting and stopping it, its watch limit.

:class:`_ObserverControl` decides how the folder is watched (``InotifyObserver``, or
``PollingObserverVFS`` in ``POLL`` mode, on network file systems in ``AUTO`` mode, and once
inotify has hit a limit), starts the observer on the root's real path with the enqueueing
handler, stops it (each join bounded), and after a full scan compares the directories found
with the watches the kernel holds (watchdog silently skips the ones it cannot watch). Logs name
the folder id, file system types and limits, never a path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserverVFS

from deidfs.config.model import WatchMode
from deidfs.watch.context import _JOIN_SECONDS, _Shared
from deidfs.watch.events import _EVENT_FILTER, _Enqueuer
from deidfs.watch.limits import (
    _INSTANCE_LIMIT_FILE,
    _inotify_fd_of,
    _read_int,
    _watched_inodes,
    filesystem_type,
    inotify_watch_limit,
    is_network_filesystem,
)
from deidfs.watch.overflow import _Overflows

logger = logging.getLogger(__name__)

#: Grace for the inotify thread to add watches for directories created during a scan.
_WATCH_CHECK_GRACE_SECONDS = 0.5


class _ObserverControl:
    """The observer of one folder and how it watches (supervisor thread; read under the lock).

    ``observer``, ``kind``, ``degraded_reason`` and ``watches`` are written under the lock.
    """

    def __init__(
        self, shared: _Shared, mode: WatchMode, *, poll_seconds: float, overflows: _Overflows
    ) -> None:
        self._folder_id = shared.folder_id
        self._root = shared.root
        self._lock = shared.lock
        self._events = shared.events
        self._stopping = shared.stopping
        self._mode = mode
        self._poll = float(poll_seconds)
        self._overflows = overflows
        self.observer: BaseObserver | None = None
        self.kind = "poll" if mode is WatchMode.POLL else "inotify"
        self.degraded_reason: str | None = None
        self.watches: int | None = None

    def _decide_kind(self) -> None:
        if self.degraded_reason is not None or self._mode is WatchMode.POLL:
            kind = "poll"
        elif self._mode is WatchMode.INOTIFY:
            kind = "inotify"
        else:
            fstype = filesystem_type(Path(self._root.root_real))
            kind = "poll" if fstype is not None and is_network_filesystem(fstype) else "inotify"
            if kind == "poll" and self.kind != "poll":
                logger.info(
                    "folder %s: on a %s file system, watched by polling", self._folder_id, fstype
                )
        with self._lock:
            self.kind = kind

    def start(self) -> None:
        """Start the observer of the current kind; OSError means the root is not usable."""
        root = self._root
        root.root_real = os.path.realpath(root.root_str)
        root.observed_base = root.root_real
        self._decide_kind()
        observer: BaseObserver | None = None
        handler = _Enqueuer(self._events.put, self._overflows.on_events_lost)
        if self.kind == "inotify":
            try:
                observer = InotifyObserver()
                observer.schedule(
                    handler, root.root_real, recursive=True, event_filter=_EVENT_FILTER
                )
                observer.start()
            except OSError as exc:
                if observer is not None:
                    self._discard(observer)
                    observer = None
                if exc.errno == errno.ENOSPC:
                    self.degrade(f"inotify watch limit reached (limit {inotify_watch_limit()})")
                elif exc.errno == errno.EMFILE:
                    limit = _read_int(_INSTANCE_LIMIT_FILE)
                    self.degrade(f"inotify instance limit reached (limit {limit})")
                else:
                    raise
        if observer is None:
            # Not PollingObserver: its snapshots os.stat() every entry and so descend into
            # symlinked directories; lstat keeps the walk inside the tree and finite.
            observer = PollingObserverVFS(os.lstat, os.scandir, polling_interval=self._poll)
            observer.schedule(handler, root.root_real, recursive=True, event_filter=_EVENT_FILTER)
            try:
                observer.start()
            except BaseException:
                self._discard(observer)
                raise
        with self._lock:
            if not self._stopping.is_set():
                self.observer = observer
                observer = None
        if observer is not None:  # stop() came while starting
            self._discard(observer)

    def degrade(self, reason: str) -> None:
        with self._lock:
            self.degraded_reason = reason
            self.kind = "poll"
            self.watches = None
        logger.warning(
            "folder %s: %s; this folder is watched by polling from now on", self._folder_id, reason
        )

    def stop(self) -> None:
        with self._lock:
            observer = self.observer
            self.observer = None
        if observer is not None:
            self._discard(observer)

    def _discard(self, observer: BaseObserver) -> None:
        try:
            observer.stop()
        except Exception as exc:  # a dead emitter must not prevent the shutdown
            logger.error(
                "folder %s: stopping the observer failed (%s)", self._folder_id, type(exc).__name__
            )
        with contextlib.suppress(RuntimeError):  # never started
            observer.join(_JOIN_SECONDS)

    def check_watches(self, dirs: dict[int, str]) -> str | None:
        """Detect directories watchdog silently left unwatched (inotify watch limit).

        Returns why the folder must be polled from now on, or None.
        """
        with self._lock:
            observer = self.observer
        if observer is None or self.kind != "inotify":
            return None
        fd = _inotify_fd_of(observer)
        watched = _watched_inodes(fd) if fd is not None else None
        limit = inotify_watch_limit()
        if watched is None:
            if limit is not None and len(dirs) > limit:
                return f"inotify watch limit reached (limit {limit})"
            return None
        missing = {ino: path for ino, path in dirs.items() if ino not in watched}
        if missing:
            # Directories created during the scan get their watch a moment later.
            if self._stopping.wait(_WATCH_CHECK_GRACE_SECONDS):
                return None
            watched = _watched_inodes(fd) if fd is not None else None
            if watched is None:
                return None
            missing = {ino: path for ino, path in missing.items() if ino not in watched}
            missing = {ino: path for ino, path in missing.items() if self._is_dir(path, ino)}
        with self._lock:
            self.watches = len(watched)
        if missing:
            return (
                f"inotify watch limit reached (limit {limit}, {len(dirs) - len(missing)} of "
                f"{len(dirs)} directories watched)"
            )
        return None

    @staticmethod
    def _is_dir(path: str, ino: int) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == ino
