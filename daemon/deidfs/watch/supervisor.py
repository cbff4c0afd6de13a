"""The supervisor thread of a folder's watcher: the root's reachability, the observer, scans.

:class:`_Supervisor` checks every ``poll_seconds`` that the root is a readable directory and
that the observer runs on it, restarting the observer when the root was replaced or the
observer stopped. It runs the initial scan after the observer has started (so no file falls
between scan and watch), the periodic reconciliation scans, a rescan at once after an inotify
queue overflow or on request, and switches the folder to polling when inotify left directories
unwatched. When the root is lost, the worker withdraws every reported file. Logs name the
folder id, counts and errno names, never a path.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import stat

from deidfs.watch.context import _Shared
from deidfs.watch.events import _Cmd, _RootLost, _ScanEnd
from deidfs.watch.limits import _errname, _observer_alive
from deidfs.watch.observer import _ObserverControl
from deidfs.watch.overflow import _Overflows
from deidfs.watch.scan import _Scanner

logger = logging.getLogger(__name__)


class _Supervisor:
    """Runs the observer and the scans (the watcher's supervisor thread runs :meth:`run`).

    ``root_ok`` and ``directories`` are written under the lock.
    """

    def __init__(
        self,
        shared: _Shared,
        observers: _ObserverControl,
        scanner: _Scanner,
        overflows: _Overflows,
        *,
        poll_seconds: float,
        reconcile_seconds: float,
    ) -> None:
        self._folder_id = shared.folder_id
        self._root = shared.root
        self._clock = shared.clock
        self._lock = shared.lock
        self._events = shared.events
        self._commands = shared.commands
        self._stopping = shared.stopping
        self._observers = observers
        self._scanner = scanner
        self._overflows = overflows
        self._poll = float(poll_seconds)
        self._reconcile = float(reconcile_seconds)
        self.root_ok = False
        self._outage = False  #: root lost; logged once until a full scan succeeds again
        self._root_ident: tuple[int, int] | None = None
        self._scan_id = 0
        self.directories = 0

    def run(self) -> None:
        next_check = self._clock()
        next_reconcile = math.inf
        scan_needed = True
        initial = True
        while not self._stopping.is_set():
            try:
                now = self._clock()
                if now >= next_check:
                    next_check = now + self._poll
                    if self._check_root():
                        scan_needed = True
                if self.root_ok and (scan_needed or now >= next_reconcile):
                    reconcile = not scan_needed
                    scan_needed = False
                    if self._full_scan(initial=initial, reconcile=reconcile):
                        initial = False
                    next_reconcile = (
                        self._clock() + self._reconcile if self._reconcile > 0 else math.inf
                    )
            except Exception as exc:  # contain, retry at the next check
                logger.error(
                    "folder %s: internal error in the folder supervisor (%s)",
                    self._folder_id,
                    type(exc).__name__,
                )
            wait = max(0.0, min(next_check, next_reconcile) - self._clock())
            try:
                cmd = self._commands.get(timeout=min(wait, self._poll))
            except queue.Empty:
                continue
            if cmd is _Cmd.STOP:
                break
            if cmd is _Cmd.CHECK:
                next_check = self._clock()
            elif cmd is _Cmd.OVERFLOW:
                self._overflows.log()
                if self.root_ok:
                    next_reconcile = self._clock()
            elif cmd is _Cmd.RESCAN and self.root_ok:
                next_reconcile = self._clock()  # while the root is lost, its return rescans
        self._observers.stop()

    def _check_root(self) -> bool:
        """Check the root and the observer; return True when a full scan is needed."""
        root_str = self._root.root_str
        try:
            st = os.stat(root_str)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "root is not a directory")
            # Reachable is not enough: it must be readable (NFS root_squash, EACCES, EIO).
            fd = os.open(root_str, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.close(fd)
        except OSError as exc:
            self._root_lost(_errname(exc))
            return False
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            observer = self._observers.observer
        if self.root_ok and ident == self._root_ident and _observer_alive(observer):
            return False
        if self.root_ok:
            logger.info(
                "folder %s: restarting the observer (root replaced or observer stopped)",
                self._folder_id,
            )
        self._observers.stop()
        try:
            self._start_observer(ident)
        except OSError as exc:
            self._root_lost(_errname(exc))
            return False
        with self._lock:
            self.root_ok = True
        return True

    def _root_lost(self, reason: str) -> None:
        was_ok = self.root_ok
        with self._lock:
            self.root_ok = False
        if not self._outage:
            self._outage = True
            logger.warning(
                "folder %s: root unreachable (%s); its files are withdrawn, retrying every %g s",
                self._folder_id,
                reason,
                self._poll,
            )
        if was_ok:
            self._observers.stop()
            self._events.put(_RootLost())

    def _start_observer(self, ident: tuple[int, int]) -> None:
        """Start the observer on the root ``ident`` names; OSError: the root is not usable."""
        self._root_ident = ident
        self._observers.start()

    def _full_scan(self, *, initial: bool, reconcile: bool) -> bool:
        """Walk the tree and hand its files to the worker; return True if it completed."""
        self._scan_id += 1
        scan_id = self._scan_id
        started = self._clock()
        try:
            stats = self._scanner.walk(scan_id, reconcile=reconcile)
        except OSError as exc:
            self._events.put(_ScanEnd(scan_id, complete=False, initial=False))
            self._root_lost(_errname(exc))
            return False
        if stats is None:  # stopping
            return False
        with self._lock:
            self.directories = len(stats.dirs)
        self._events.put(_ScanEnd(scan_id, complete=True, initial=initial))
        if self._outage:
            self._outage = False
            logger.info("folder %s: root reachable again", self._folder_id)
        if initial:
            logger.info(
                "folder %s: initial scan read %d files in %d directories (%.1f s)",
                self._folder_id,
                stats.files,
                len(stats.dirs),
                self._clock() - started,
            )
        if self._observers.kind == "inotify":
            reason = self._observers.check_watches(stats.dirs)
            if reason is not None:
                self._degrade_to_polling(reason)
        return True

    def _degrade_to_polling(self, reason: str) -> None:
        self._observers.degrade(reason)
        self._observers.stop()
        try:
            st = os.stat(self._root.root_str)
            self._start_observer((st.st_dev, st.st_ino))
        except OSError as exc:
            self._root_lost(_errname(exc))
            return
        # Files in the unwatched directories may have changed unseen.
        self._full_scan(initial=False, reconcile=True)
