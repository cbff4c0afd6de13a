"""Watch one source folder and report files once they have settled.

A :class:`FolderWatcher` turns file system activity below one folder root into a stream of
:class:`Change` objects: ``READY`` when a file has settled (and again after each change that
settles), ``GONE`` when a file that was reported ready is deleted, moved away or stops being a
regular file.

Three sources feed one idempotent pipeline, keyed by the file's (device, inode, size,
mtime_ns, ctime_ns) signature:

- a watchdog observer (``InotifyObserver``, or a polling observer on network file systems
  where inotify does not see writes made by other hosts);
- the initial scan, which walks the tree in the background after the observer has started
  (so no file can fall between scan and watch);
- periodic reconciliation scans, which repair what the observer missed (inotify queue
  overflows, directories watchdog could not watch, events lost during an outage).

Threads: a *worker* thread owns the pending and reported tables, settles files and calls the
sink; a *supervisor* thread starts and restarts the observer, runs the scans and checks that
the root is reachable. Observer callbacks only enqueue. Nothing here opens a source file: the
stability checks use ``os.lstat`` alone.

Logs name the folder id, counts and errno names, never a path: paths can carry patient names.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserverVFS

from deidfs.config.model import WatchMode
from deidfs.watch.events import (
    _EVENT_FILTER,
    _STOP,
    IGNORED_SUFFIXES,
    Change,
    FileEvent,
    _Cmd,
    _Enqueuer,
    _Pending,
    _RootLost,
    _ScanBatch,
    _ScanEnd,
    _ScanStats,
    _Sig,
    _Stop,
    _WorkItem,
)
from deidfs.watch.limits import (
    _INSTANCE_LIMIT_FILE,
    _QUEUE_LIMIT_FILE,
    _errname,
    _inotify_fd_of,
    _observer_alive,
    _read_int,
    _watched_inodes,
    filesystem_type,
    inotify_watch_limit,
    is_network_filesystem,
)

logger = logging.getLogger(__name__)

#: After close-write or a rename into place the file only has to keep its signature this long.
_QUICK_SETTLE_SECONDS = 0.1
#: Grace for the inotify thread to add watches for directories created during a scan.
_WATCH_CHECK_GRACE_SECONDS = 0.5
#: Upper bound for each join in :meth:`FolderWatcher.stop`.
_JOIN_SECONDS = 10.0
#: Files per batch handed from a scan to the worker, so READY flows while a big tree is read.
_SCAN_BATCH = 256
#: Queue overflows of one folder are logged at most this often (all are counted).
_OVERFLOW_LOG_SECONDS = 60.0

# Test seam: the directory lister of the scans.
_scandir = os.scandir


class FolderWatcher:
    """Watch one folder tree and report settled files to a sink.

    Parameters
    ----------
    folder_id : str
        The configured folder id; it is the only folder information that is logged.
    root : Path
        The folder to watch (absolute or relative; it is made absolute, symlinks kept).
    mode : WatchMode
        ``INOTIFY``, ``POLL``, or ``AUTO`` (polling on network file systems, see
        :func:`is_network_filesystem`).
    settle_seconds : float
        How long a created or modified file must keep its size and mtime before it is ready.
        Files already present with an mtime older than this count as settled.
    poll_seconds : float
        Interval of the polling observer, and of the root reachability check in all modes.
    reconcile_seconds : float
        Interval of the periodic reconciliation scan; 0 disables it.
    sink : callable
        Receives each :class:`Change`, always on the watcher's worker thread, never under a
        lock of the watcher; it may be slow. An exception it raises is logged; a failed
        ``READY`` is offered again by the next scan.
    clock : callable, optional
        Monotonic clock in seconds, for every interval decision (injectable for tests).

    Notes
    -----
    Settling: a close-after-write or a rename into place makes a file ready once its
    signature (device, inode, size, mtime_ns, ctime_ns) holds for a short check; a file that is only
    created or modified (a move from an unwatched directory, a writer on another NFS client)
    must keep its signature for ``settle_seconds``. A file whose signature equals the one
    last reported is not reported again (chmod, a second close, a rescan).

    Ignored: names ending in ``.part`` or ``.partial``, every path with a component (below the
    root) starting with ``.``, and everything that is not a regular file. Symbolic links are
    never followed, neither as files nor as directories: a link could point outside the
    watched folder and pull another folder's (or another patient's) data into this view, and
    a link to an ancestor would make the walk endless.

    Inotify watch limit: watchdog silently skips subdirectories it cannot watch. After each
    full scan the watcher compares the directories it found with the watches the kernel
    holds for its inotify instance (``/proc/self/fdinfo``); when some are missing, or when
    watching fails outright with ENOSPC/EMFILE, it logs a warning, switches this folder to
    polling for the rest of its life and reports why in :attr:`degraded_reason`.

    Queue overflow: when the kernel's inotify queue overflows (``IN_Q_OVERFLOW``, more
    events than ``/proc/sys/fs/inotify/max_queued_events`` waiting), events are lost for
    the whole tree. watchdog rebuilds its watches and then reports the loss; the watcher
    counts it (:attr:`overflows`), logs it and rescans the tree at once, so files whose
    events were dropped are found by the scan rather than by the next periodic
    reconciliation.

    Root outages: when the root disappears or cannot be opened, every reported file is
    reported ``GONE`` (the view must not serve what cannot be read), and the root is tried
    again every ``poll_seconds``; when it is back, the observer restarts and a full scan
    reports every file ``READY`` again.
    """

    def __init__(
        self,
        folder_id: str,
        root: Path,
        mode: WatchMode,
        *,
        settle_seconds: float,
        poll_seconds: float,
        reconcile_seconds: float,
        sink: Callable[[Change], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle_seconds < 0 or poll_seconds <= 0 or reconcile_seconds < 0:
            raise ValueError("settle_seconds/reconcile_seconds must be >= 0, poll_seconds > 0")
        self._folder_id = folder_id
        self._root_str = os.path.abspath(root)
        self._root_prefix = self._root_str.rstrip("/") + "/"
        self._mode = mode
        self._settle = float(settle_seconds)
        self._quick = min(_QUICK_SETTLE_SECONDS, self._settle)
        self._poll = float(poll_seconds)
        self._reconcile = float(reconcile_seconds)
        self._sink = sink
        self._clock = clock
        self._tick = min(max(self._settle / 4, 0.02), 0.25)

        self._lock = threading.Lock()  # guards the fields read by the properties
        self._events: queue.SimpleQueue[_WorkItem] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[_Cmd] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._worker: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None

        # Supervisor state (the observer is also read by properties, under the lock).
        self._observer: BaseObserver | None = None
        self._kind = "poll" if mode is WatchMode.POLL else "inotify"
        self._degraded_reason: str | None = None
        self._root_ok = False
        self._outage = False  #: root lost; logged once until a full scan succeeds again
        self._root_ident: tuple[int, int] | None = None
        self._root_real = self._root_str  # resolved when the observer starts
        # The observer watches the root's real path: with a symlink as the root itself,
        # watchdog (which never follows links) would watch the link, not the directory.
        self._observed_base = self._root_str
        self._scan_id = 0
        self._directories = 0
        self._watches: int | None = None
        self._overflows = 0
        self._last_overflow: float | None = None  #: clock() of the last one
        self._overflow_logged_at = -math.inf
        self._overflows_logged = 0

        # Worker state.
        # Keyed by path string, not Path: a folder of 100,000 files would hold 100,000 Path
        # objects (with their split parts) in _reported alone, about 40 MB more.
        self._pending: dict[str, _Pending] = {}
        self._reported: dict[str, _Sig] = {}
        self._retry: set[str] = set()  #: READY the sink failed on; not a missed event
        self._scan_seen: set[str] = set()
        self._seen_scan_id = -1
        self._next_sweep = 0.0
        self._missed = 0
        self._initial_done = False
        self._event_counts: dict[str, int] = {}

    # ----------------------------------------------------------------------------------
    # Public interface

    def start(self) -> None:
        """Start the worker and supervisor threads and return at once.

        The supervisor then starts the observer and runs the initial scan in the background.
        """
        if self._started:
            raise RuntimeError("a FolderWatcher starts only once")
        self._started = True
        name = f"deidfs-watch-{self._folder_id}"
        self._worker = threading.Thread(target=self._work, name=name, daemon=False)
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"{name}-scan", daemon=False
        )
        self._worker.start()
        self._supervisor.start()

    def stop(self) -> None:
        """Stop the observer and the threads and join them (each join is bounded).

        Changes not yet handed to the sink are dropped. Safe to call more than once.
        """
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._commands.put(_Cmd.STOP)
        self._events.put(_STOP)
        self._join(self._supervisor)
        # Also when the supervisor is stuck: it never installs an observer once stopping.
        self._stop_observer()
        self._join(self._worker)

    def _join(self, thread: threading.Thread | None) -> None:
        if thread is None or thread is threading.current_thread():
            return  # stop() called by the sink: the worker ends after this change
        thread.join(_JOIN_SECONDS)
        if thread.is_alive():
            logger.warning(
                "folder %s: thread %s did not stop within %.0f s",
                self._folder_id,
                thread.name,
                _JOIN_SECONDS,
            )

    def rescan(self) -> None:
        """Ask for a reconciliation scan now; returns at once."""
        self._commands.put(_Cmd.RESCAN)

    @property
    def healthy(self) -> bool:
        """True while the threads and the observer run and the root is reachable."""
        with self._lock:
            observer = self._observer
            root_ok = self._root_ok
        threads = (self._worker, self._supervisor)
        return (
            self._started
            and not self._stopping.is_set()
            and all(t is not None and t.is_alive() for t in threads)
            and root_ok
            and _observer_alive(observer)
        )

    @property
    def alive(self) -> bool:
        """True while the worker and supervisor threads run (whatever the root's state).

        Unlike :attr:`healthy`, an unreachable root does not make a watcher dead: it keeps
        retrying, and a restart of the daemon would not bring a share back.
        """
        threads = (self._worker, self._supervisor)
        return (
            self._started
            and not self._stopping.is_set()
            and all(t is not None and t.is_alive() for t in threads)
        )

    @property
    def event_counts(self) -> dict[str, int]:
        """Observer events received since start, by watchdog event type (for metrics)."""
        with self._lock:
            return dict(self._event_counts)

    @property
    def kind(self) -> str:
        """``"inotify"`` or ``"poll"``: how the folder is watched now.

        In ``AUTO`` mode this is final once the supervisor has looked at the mount, right
        after :meth:`start`.
        """
        with self._lock:
            return self._kind

    @property
    def pending(self) -> int:
        """Number of files seen but not yet settled."""
        with self._lock:
            return len(self._pending)

    @property
    def degraded_reason(self) -> str | None:
        """Why the folder is polled although inotify was wanted (e.g. the watch limit)."""
        with self._lock:
            return self._degraded_reason

    @property
    def initial_scan_done(self) -> bool:
        """True once the first full scan has been read and its files handled."""
        with self._lock:
            return self._initial_done

    @property
    def missed_files(self) -> int:
        """Files that reconciliation scans found new or changed but inotify never reported."""
        with self._lock:
            return self._missed

    @property
    def overflows(self) -> int:
        """inotify queue overflows (events lost) since start; each one triggered a rescan."""
        with self._lock:
            return self._overflows

    @property
    def last_overflow_age(self) -> float | None:
        """Seconds since the last queue overflow (None if there was none)."""
        with self._lock:
            last = self._last_overflow
        return None if last is None else max(0.0, self._clock() - last)

    @property
    def directories(self) -> int:
        """Directories below the root (root included) counted by the last full scan."""
        with self._lock:
            return self._directories

    @property
    def inotify_watches(self) -> int | None:
        """Watches this folder's inotify instance held at the last check (None if polled)."""
        with self._lock:
            return self._watches

    # ----------------------------------------------------------------------------------
    # Paths

    def _relative(self, path: str) -> str | None:
        if not path.startswith(self._root_prefix):
            return None
        return path[len(self._root_prefix) :]

    def _eligible_name(self, path: str) -> bool:
        rel = self._relative(path)
        if not rel:
            return False
        parts = rel.split("/")
        if any(part.startswith(".") or not part for part in parts):
            return False
        return not parts[-1].lower().endswith(IGNORED_SUFFIXES)

    def _within_root(self, path: str) -> bool:
        """The path's directories are real directories below the root (no symlink on the way).

        Observers do not descend into symlinked directories, but a directory can be replaced
        by a link between an event and its handling.
        """
        rel = self._relative(path)
        if rel is None:
            return False
        rel_dir = os.path.dirname(rel)
        expected = os.path.join(self._root_real, rel_dir) if rel_dir else self._root_real
        return os.path.realpath(os.path.dirname(path)) == expected

    # ----------------------------------------------------------------------------------
    # Worker thread: settles files and calls the sink

    def _work(self) -> None:
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
                    self._sweep(now, out)
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
                    # Forget it, so that the next scan offers it again. (Keys are normalized
                    # paths, so the Change's Path gives the key back.)
                    key = os.fspath(change.path)
                    with self._lock:
                        if self._reported.get(key) == sig:
                            del self._reported[key]
                            self._retry.add(key)

    def _handle(self, item: _WorkItem, out: list[tuple[Change, _Sig | None]]) -> None:
        if isinstance(item, _ScanBatch):
            self._on_scan_batch(item, out)
        elif isinstance(item, _ScanEnd):
            self._on_scan_end(item, out)
        elif isinstance(item, _RootLost):
            self._on_root_lost(out)
        elif isinstance(item, FileSystemEvent):
            self._on_fs_event(item, out)

    def _from_observer(self, path: bytes | str) -> str:
        """Map an observer path (below the root's real path) to one below the root as given."""
        text = os.fsdecode(path)
        base = self._observed_base
        if base == self._root_str:
            return text
        if text == base:
            return self._root_str
        if text.startswith(base + "/"):
            return self._root_prefix + text[len(base) + 1 :]
        return text

    def _on_fs_event(self, event: FileSystemEvent, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            kind = event.event_type
            self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        src = self._from_observer(event.src_path)
        now = self._clock()
        if isinstance(event, FileMovedEvent):
            self._check_gone(src, out)
            self._touch(self._from_observer(event.dest_path), now, quick=True)
        elif isinstance(event, FileClosedEvent):
            self._touch(src, now, quick=True)
        elif isinstance(event, FileAttribEvent):
            self._touch(src, now, quick=None)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._touch(src, now, quick=False)
        elif isinstance(event, FileDeletedEvent):
            self._check_gone(src, out)
        elif isinstance(event, DirDeletedEvent | DirMovedEvent):
            if src == self._root_str:
                # The emitter stops on its own root's deletion; let the supervisor look now.
                self._commands.put(_Cmd.CHECK)
            prefix = src.rstrip("/") + "/"
            with self._lock:
                below = [p for p in (*self._reported, *self._pending) if p.startswith(prefix)]
            for path in below:
                self._check_gone(path, out)

    def _touch(self, path: str, now: float, *, quick: bool | None) -> None:
        """Record activity on a file; ``quick`` None keeps the current settle mode."""
        if not self._eligible_name(path):
            return
        with self._lock:
            entry = self._pending.get(path)
            if entry is None:
                self._pending[path] = _Pending(sig=None, since=now, quick=bool(quick))
            else:
                entry.since = now
                if quick is not None:
                    entry.quick = quick

    def _change(self, path: str, kind: FileEvent) -> Change:
        return Change(self._folder_id, Path(path), kind)

    def _check_gone(self, path: str, out: list[tuple[Change, _Sig | None]]) -> None:
        """Report GONE if a known file no longer exists as a regular file."""
        with self._lock:
            known = path in self._reported or path in self._pending
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
            self._pending.pop(path, None)
            sig = self._reported.pop(path, None)
        if sig is not None:
            out.append((self._change(path, FileEvent.GONE), None))

    def _sweep(self, now: float, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            items = list(self._pending.items())
        for path, entry in items:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            except OSError:
                continue  # transient (EIO, ESTALE on a share): keep it pending
            if st is None or not stat.S_ISREG(st.st_mode):
                with self._lock:
                    self._pending.pop(path, None)
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
                if self._pending.get(path) is not entry:
                    continue
                del self._pending[path]
                if self._reported.get(path) == sig:
                    continue
            if not self._within_root(path):
                continue
            with self._lock:
                self._reported[path] = sig
            out.append((self._change(path, FileEvent.READY), sig))

    def _on_scan_batch(self, batch: _ScanBatch, out: list[tuple[Change, _Sig | None]]) -> None:
        if batch.scan_id != self._seen_scan_id:
            self._seen_scan_id = batch.scan_id
            self._scan_seen = set()
        now = self._clock()
        settled_before_ns = time.time_ns() - int(self._settle * 1e9)
        for path, sig in batch.files:
            self._scan_seen.add(path)
            with self._lock:
                if path in self._pending or self._reported.get(path) == sig:
                    continue
            old = sig.mtime_ns <= settled_before_ns
            with self._lock:
                retried = path in self._retry
                self._retry.discard(path)
                if batch.reconcile and old and not retried and self._kind == "inotify":
                    self._missed += 1
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
                self._pending.setdefault(path, _Pending(sig=sig, since=now, quick=False))

    def _on_scan_end(self, end: _ScanEnd, out: list[tuple[Change, _Sig | None]]) -> None:
        seen = self._scan_seen if end.scan_id == self._seen_scan_id else set()
        self._scan_seen = set()
        self._seen_scan_id = -1
        if end.complete:
            with self._lock:
                absent = [p for p in self._reported if p not in seen]
            for path in absent:
                self._check_gone(path, out)
        if end.initial:
            with self._lock:
                self._initial_done = True

    def _on_root_lost(self, out: list[tuple[Change, _Sig | None]]) -> None:
        with self._lock:
            lost = list(self._reported)
            self._reported.clear()
            self._pending.clear()
            self._retry.clear()
        out.extend((self._change(p, FileEvent.GONE), None) for p in lost)

    # ----------------------------------------------------------------------------------
    # Supervisor thread: observer, root reachability, scans

    def _supervise(self) -> None:
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
                if self._root_ok and (scan_needed or now >= next_reconcile):
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
                self._log_overflow()
                if self._root_ok:
                    next_reconcile = self._clock()
            elif cmd is _Cmd.RESCAN and self._root_ok:
                next_reconcile = self._clock()  # while the root is lost, its return rescans
        self._stop_observer()

    def _on_events_lost(self) -> None:
        """watchdog's dispatch thread: the inotify queue overflowed; only count and ask."""
        with self._lock:
            self._overflows += 1
            self._last_overflow = self._clock()
        self._commands.put(_Cmd.OVERFLOW)

    def _log_overflow(self) -> None:
        """Log overflows (supervisor thread), at most once per :data:`_OVERFLOW_LOG_SECONDS`."""
        with self._lock:
            total = self._overflows
        new = total - self._overflows_logged
        now = self._clock()
        if new <= 0 or now - self._overflow_logged_at < _OVERFLOW_LOG_SECONDS:
            return
        self._overflow_logged_at = now
        self._overflows_logged = total
        logger.warning(
            "folder %s: inotify queue overflowed, file events were lost (%d time(s), %d in "
            "all); rescanning the folder now. If this repeats, raise "
            "fs.inotify.max_queued_events (%s now; the kernel applies it to inotify instances "
            "created later: restart the daemon)",
            self._folder_id,
            new,
            total,
            _read_int(_QUEUE_LIMIT_FILE),
        )

    def _check_root(self) -> bool:
        """Check the root and the observer; return True when a full scan is needed."""
        try:
            st = os.stat(self._root_str)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "root is not a directory")
            # Reachable is not enough: it must be readable (NFS root_squash, EACCES, EIO).
            fd = os.open(self._root_str, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.close(fd)
        except OSError as exc:
            self._root_lost(_errname(exc))
            return False
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            observer = self._observer
        if self._root_ok and ident == self._root_ident and _observer_alive(observer):
            return False
        if self._root_ok:
            logger.info(
                "folder %s: restarting the observer (root replaced or observer stopped)",
                self._folder_id,
            )
        self._stop_observer()
        try:
            self._start_observer(ident)
        except OSError as exc:
            self._root_lost(_errname(exc))
            return False
        with self._lock:
            self._root_ok = True
        return True

    def _root_lost(self, reason: str) -> None:
        was_ok = self._root_ok
        with self._lock:
            self._root_ok = False
        if not self._outage:
            self._outage = True
            logger.warning(
                "folder %s: root unreachable (%s); its files are withdrawn, retrying every %g s",
                self._folder_id,
                reason,
                self._poll,
            )
        if was_ok:
            self._stop_observer()
            self._events.put(_RootLost())

    def _decide_kind(self) -> None:
        if self._degraded_reason is not None or self._mode is WatchMode.POLL:
            kind = "poll"
        elif self._mode is WatchMode.INOTIFY:
            kind = "inotify"
        else:
            fstype = filesystem_type(Path(self._root_real))
            kind = "poll" if fstype is not None and is_network_filesystem(fstype) else "inotify"
            if kind == "poll" and self._kind != "poll":
                logger.info(
                    "folder %s: on a %s file system, watched by polling", self._folder_id, fstype
                )
        with self._lock:
            self._kind = kind

    def _start_observer(self, ident: tuple[int, int]) -> None:
        """Start the observer of the current kind; OSError means the root is not usable."""
        self._root_real = os.path.realpath(self._root_str)
        self._observed_base = self._root_real
        self._root_ident = ident
        self._decide_kind()
        observer: BaseObserver | None = None
        handler = _Enqueuer(self._events.put, self._on_events_lost)
        if self._kind == "inotify":
            try:
                observer = InotifyObserver()
                observer.schedule(
                    handler, self._root_real, recursive=True, event_filter=_EVENT_FILTER
                )
                observer.start()
            except OSError as exc:
                if observer is not None:
                    self._discard(observer)
                    observer = None
                if exc.errno == errno.ENOSPC:
                    self._degrade(f"inotify watch limit reached (limit {inotify_watch_limit()})")
                elif exc.errno == errno.EMFILE:
                    limit = _read_int(_INSTANCE_LIMIT_FILE)
                    self._degrade(f"inotify instance limit reached (limit {limit})")
                else:
                    raise
        if observer is None:
            # Not PollingObserver: its snapshots os.stat() every entry and so descend into
            # symlinked directories; lstat keeps the walk inside the tree and finite.
            observer = PollingObserverVFS(os.lstat, os.scandir, polling_interval=self._poll)
            observer.schedule(handler, self._root_real, recursive=True, event_filter=_EVENT_FILTER)
            try:
                observer.start()
            except BaseException:
                self._discard(observer)
                raise
        with self._lock:
            if not self._stopping.is_set():
                self._observer = observer
                observer = None
        if observer is not None:  # stop() came while starting
            self._discard(observer)

    def _degrade(self, reason: str) -> None:
        with self._lock:
            self._degraded_reason = reason
            self._kind = "poll"
            self._watches = None
        logger.warning(
            "folder %s: %s; this folder is watched by polling from now on", self._folder_id, reason
        )

    def _stop_observer(self) -> None:
        with self._lock:
            observer = self._observer
            self._observer = None
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

    def _full_scan(self, *, initial: bool, reconcile: bool) -> bool:
        """Walk the tree and hand its files to the worker; return True if it completed."""
        self._scan_id += 1
        scan_id = self._scan_id
        started = self._clock()
        try:
            stats = self._walk(scan_id, reconcile=reconcile)
        except OSError as exc:
            self._events.put(_ScanEnd(scan_id, complete=False, initial=False))
            self._root_lost(_errname(exc))
            return False
        if stats is None:  # stopping
            return False
        with self._lock:
            self._directories = len(stats.dirs)
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
        if self._kind == "inotify":
            self._check_watches(stats.dirs)
        return True

    def _walk(self, scan_id: int, *, reconcile: bool) -> _ScanStats | None:
        """Read the tree with scandir, never following symlinks.

        Raises OSError when the root itself cannot be read; subdirectories that vanish or
        cannot be read are skipped. Dot-directories are descended into only to count them
        (inotify watches them too), their files are ignored.
        """
        stats = _ScanStats()
        root_st = os.stat(self._root_str)
        stats.dirs[root_st.st_ino] = self._root_str
        stack: list[tuple[str, bool]] = [(self._root_str, False)]
        batch: list[tuple[str, _Sig]] = []
        while stack:
            if self._stopping.is_set():
                return None
            directory, hidden = stack.pop()
            try:
                entries = _scandir(directory)
            except OSError:
                if directory == self._root_str:
                    raise
                continue
            with entries:
                for entry in self._entries(entries, directory):
                    name = entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stats.dirs[entry.inode()] = entry.path
                            stack.append((entry.path, hidden or name.startswith(".")))
                        elif (
                            not hidden
                            and not name.startswith(".")
                            and not name.lower().endswith(IGNORED_SUFFIXES)
                            and entry.is_file(follow_symlinks=False)
                        ):
                            st = entry.stat(follow_symlinks=False)
                            batch.append((entry.path, _Sig.of(st)))
                    except OSError:
                        continue  # vanished while read
            if len(batch) >= _SCAN_BATCH:
                stats.files += len(batch)
                self._events.put(_ScanBatch(scan_id, batch, reconcile))
                batch = []
        stats.files += len(batch)
        self._events.put(_ScanBatch(scan_id, batch, reconcile))
        return stats

    def _entries(
        self, entries: Iterator[os.DirEntry[str]], directory: str
    ) -> Iterator[os.DirEntry[str]]:
        """Iterate a directory, treating a read error of the root as fatal, others as its end."""
        while True:
            try:
                entry = next(entries)
            except StopIteration:
                return
            except OSError:
                if directory == self._root_str:
                    raise
                return
            yield entry

    def _check_watches(self, dirs: dict[int, str]) -> None:
        """Detect directories watchdog silently left unwatched (inotify watch limit)."""
        with self._lock:
            observer = self._observer
        if observer is None or self._kind != "inotify":
            return
        fd = _inotify_fd_of(observer)
        watched = _watched_inodes(fd) if fd is not None else None
        limit = inotify_watch_limit()
        if watched is None:
            if limit is not None and len(dirs) > limit:
                self._degrade_to_polling(f"inotify watch limit reached (limit {limit})")
            return
        missing = {ino: path for ino, path in dirs.items() if ino not in watched}
        if missing:
            # Directories created during the scan get their watch a moment later.
            if self._stopping.wait(_WATCH_CHECK_GRACE_SECONDS):
                return
            watched = _watched_inodes(fd) if fd is not None else None
            if watched is None:
                return
            missing = {ino: path for ino, path in missing.items() if ino not in watched}
            missing = {ino: path for ino, path in missing.items() if self._is_dir(path, ino)}
        with self._lock:
            self._watches = len(watched)
        if missing:
            self._degrade_to_polling(
                f"inotify watch limit reached (limit {limit}, {len(dirs) - len(missing)} of "
                f"{len(dirs)} directories watched)"
            )

    @staticmethod
    def _is_dir(path: str, ino: int) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == ino

    def _degrade_to_polling(self, reason: str) -> None:
        self._degrade(reason)
        self._stop_observer()
        try:
            st = os.stat(self._root_str)
            self._start_observer((st.st_dev, st.st_ino))
        except OSError as exc:
            self._root_lost(_errname(exc))
            return
        # Files in the unwatched directories may have changed unseen.
        self._full_scan(initial=False, reconcile=True)
