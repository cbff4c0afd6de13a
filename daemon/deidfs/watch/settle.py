"""Settling: when a file seen below the root is ``READY``, and when a reported one is ``GONE``.

:class:`_Settler` owns the worker thread's tables: files seen but not yet settled (pending),
the signature last reported of each file, and the files whose ``READY`` the sink failed on. It
takes activity on a path, the batches and ends of scans and the loss of the root, and appends
the changes they make to a list the worker hands to the sink. A file is ready once its
signature (device, inode, size, mtime_ns, ctime_ns) has held for the settle time (a short check
after a close-write or a rename into place); only ``os.lstat`` is used, no file is opened.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from deidfs.watch.context import _Shared
from deidfs.watch.events import (
    Change,
    FileEvent,
    _Pending,
    _ScanBatch,
    _ScanEnd,
    _Sig,
)
from deidfs.watch.observer import _ObserverControl

#: After close-write or a rename into place the file only has to keep its signature this long.
_QUICK_SETTLE_SECONDS = 0.1


class _Settler:
    """The pending and reported tables of one folder (worker thread; read under the lock)."""

    def __init__(
        self, shared: _Shared, observers: _ObserverControl, *, settle_seconds: float
    ) -> None:
        self._folder_id = shared.folder_id
        self._root = shared.root
        self._clock = shared.clock
        self._lock = shared.lock
        self._observers = observers
        self._settle = float(settle_seconds)
        self._quick = min(_QUICK_SETTLE_SECONDS, self._settle)
        # Keyed by path string, not Path: a folder of 100,000 files would hold 100,000 Path
        # objects (with their split parts) in _reported alone, about 40 MB more.
        self.pending: dict[str, _Pending] = {}
        self._reported: dict[str, _Sig] = {}
        self._retry: set[str] = set()  #: READY the sink failed on; not a missed event
        self._scan_seen: set[str] = set()
        self._seen_scan_id = -1
        self.missed = 0
        self.initial_done = False

    def touch(self, path: str, now: float, *, quick: bool | None) -> None:
        """Record activity on a file; ``quick`` None keeps the current settle mode."""
        if not self._root.eligible_name(path):
            return
        with self._lock:
            entry = self.pending.get(path)
            if entry is None:
                self.pending[path] = _Pending(sig=None, since=now, quick=bool(quick))
            else:
                entry.since = now
                if quick is not None:
                    entry.quick = quick

    def known_below(self, prefix: str) -> list[str]:
        """Reported and pending paths that start with ``prefix``."""
        with self._lock:
            return [p for p in (*self._reported, *self.pending) if p.startswith(prefix)]

    def offer_again(self, change: Change, sig: _Sig | None) -> None:
        """The sink failed on a READY change."""
        # Forget it, so that the next scan offers it again. (Keys are normalized
        # paths, so the Change's Path gives the key back.)
        key = os.fspath(change.path)
        with self._lock:
            if self._reported.get(key) == sig:
                del self._reported[key]
                self._retry.add(key)

    def _change(self, path: str, kind: FileEvent) -> Change:
        return Change(self._folder_id, Path(path), kind)

    def check_gone(self, path: str, out: list[tuple[Change, _Sig | None]]) -> None:
        """Report GONE if a known file no longer exists as a regular file."""
        with self._lock:
            known = path in self._reported or path in self.pending
        if not known:
            return
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError:
            return  # cannot tell now; the next scan decides
        if st is not None and stat.S_ISREG(st.st_mode):
            return
        with self._lock:
            self.pending.pop(path, None)
            sig = self._reported.pop(path, None)
        if sig is not None:
            out.append((self._change(path, FileEvent.GONE), None))

    def sweep(self, now: float, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            items = list(self.pending.items())
        for path, entry in items:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            except OSError:
                continue  # transient (EIO, ESTALE on a share): keep it pending
            if st is None or not stat.S_ISREG(st.st_mode):
                with self._lock:
                    self.pending.pop(path, None)
                    gone = self._reported.pop(path, None)
                if gone is not None:
                    out.append((self._change(path, FileEvent.GONE), None))
                continue
            sig = _Sig.of(st)
            if sig != entry.sig:
                entry.sig = sig
                entry.since = now
                continue
            if now - entry.since < (self._quick if entry.quick else self._settle):
                continue
            with self._lock:
                if self.pending.get(path) is not entry:
                    continue
                del self.pending[path]
                if self._reported.get(path) == sig:
                    continue
            if not self._root.within_root(path):
                continue
            with self._lock:
                self._reported[path] = sig
            out.append((self._change(path, FileEvent.READY), sig))

    def on_scan_batch(self, batch: _ScanBatch, out: list[tuple[Change, _Sig | None]]) -> None:
        if batch.scan_id != self._seen_scan_id:
            self._seen_scan_id = batch.scan_id
            self._scan_seen = set()
        now = self._clock()
        settled_before_ns = time.time_ns() - int(self._settle * 1e9)
        for path, sig in batch.files:
            self._scan_seen.add(path)
            with self._lock:
                if path in self.pending or self._reported.get(path) == sig:
                    continue
            old = sig.mtime_ns <= settled_before_ns
            with self._lock:
                retried = path in self._retry
                self._retry.discard(path)
                if batch.reconcile and old and not retried and self._observers.kind == "inotify":
                    self.missed += 1
            if old:
                # The scan's stat may be seconds old: confirm before reporting.
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and _Sig.of(st) == sig:
                    with self._lock:
                        self._reported[path] = sig
                    out.append((self._change(path, FileEvent.READY), sig))
                    continue
            with self._lock:
                self.pending.setdefault(path, _Pending(sig=sig, since=now, quick=False))

    def on_scan_end(self, end: _ScanEnd, out: list[tuple[Change, _Sig | None]]) -> None:
        seen = self._scan_seen if end.scan_id == self._seen_scan_id else set()
        self._scan_seen = set()
        self._seen_scan_id = -1
        if end.complete:
            with self._lock:
                absent = [p for p in self._reported if p not in seen]
            for path in absent:
                self.check_gone(path, out)
        if end.initial:
            with self._lock:
                self.initial_done = True

    def on_root_lost(self, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            lost = list(self._reported)
            self._reported.clear()
            self.pending.clear()
            self._retry.clear()
        out.extend((self._change(p, FileEvent.GONE), None) for p in lost)
