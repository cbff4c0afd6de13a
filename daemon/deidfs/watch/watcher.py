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

Threads: a *worker* thread (:mod:`deidfs.watch.worker`) owns the pending and reported tables
(:mod:`deidfs.watch.settle`), settles files and calls the sink; a *supervisor* thread
(:mod:`deidfs.watch.supervisor`) starts and restarts the observer
(:mod:`deidfs.watch.observer`), runs the scans (:mod:`deidfs.watch.scan`) and checks that the
root is reachable. Observer callbacks only enqueue. Nothing here opens a source file: the
stability checks use ``os.lstat`` alone. This module holds the public face: the constructor,
start and stop, and the properties read for status and metrics.

Logs name the folder id, counts and errno names, never a path: paths can carry patient names.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from deidfs.config.model import WatchMode
from deidfs.watch.context import _JOIN_SECONDS, _FolderRoot, _Shared
from deidfs.watch.events import _STOP, Change, _Cmd, _WorkItem
from deidfs.watch.limits import _observer_alive
from deidfs.watch.observer import _ObserverControl
from deidfs.watch.overflow import _Overflows
from deidfs.watch.scan import _Scanner
from deidfs.watch.settle import _Settler
from deidfs.watch.supervisor import _Supervisor
from deidfs.watch.worker import _Worker

logger = logging.getLogger(__name__)


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
        self._clock = clock

        self._lock = threading.Lock()  # guards the fields read by the properties
        self._events: queue.SimpleQueue[_WorkItem] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[_Cmd] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._worker_thread: threading.Thread | None = None
        self._supervisor_thread: threading.Thread | None = None

        shared = _Shared(
            folder_id,
            _FolderRoot(root),
            clock,
            self._lock,
            self._events,
            self._commands,
            self._stopping,
        )
        self._overflows = _Overflows(shared)
        self._observers = _ObserverControl(
            shared, mode, poll_seconds=poll_seconds, overflows=self._overflows
        )
        self._settler = _Settler(shared, self._observers, settle_seconds=settle_seconds)
        self._worker = _Worker(shared, self._settler, sink, settle_seconds=settle_seconds)
        self._supervisor = _Supervisor(
            shared,
            self._observers,
            _Scanner(shared),
            self._overflows,
            poll_seconds=poll_seconds,
            reconcile_seconds=reconcile_seconds,
        )

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
        self._worker_thread = threading.Thread(target=self._worker.run, name=name, daemon=False)
        self._supervisor_thread = threading.Thread(
            target=self._supervisor.run, name=f"{name}-scan", daemon=False
        )
        self._worker_thread.start()
        self._supervisor_thread.start()

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
        self._join(self._supervisor_thread)
        # Also when the supervisor is stuck: it never installs an observer once stopping.
        self._observers.stop()
        self._join(self._worker_thread)

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
            observer = self._observers.observer
            root_ok = self._supervisor.root_ok
        threads = (self._worker_thread, self._supervisor_thread)
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
        threads = (self._worker_thread, self._supervisor_thread)
        return (
            self._started
            and not self._stopping.is_set()
            and all(t is not None and t.is_alive() for t in threads)
        )

    @property
    def event_counts(self) -> dict[str, int]:
        """Observer events received since start, by watchdog event type (for metrics)."""
        with self._lock:
            return dict(self._worker.event_counts)

    @property
    def kind(self) -> str:
        """``"inotify"`` or ``"poll"``: how the folder is watched now.

        In ``AUTO`` mode this is final once the supervisor has looked at the mount, right
        after :meth:`start`.
        """
        with self._lock:
            return self._observers.kind

    @property
    def pending(self) -> int:
        """Number of files seen but not yet settled."""
        with self._lock:
            return len(self._settler.pending)

    @property
    def degraded_reason(self) -> str | None:
        """Why the folder is polled although inotify was wanted (e.g. the watch limit)."""
        with self._lock:
            return self._observers.degraded_reason

    @property
    def initial_scan_done(self) -> bool:
        """True once the first full scan has been read and its files handled."""
        with self._lock:
            return self._settler.initial_done

    @property
    def missed_files(self) -> int:
        """Files that reconciliation scans found new or changed but inotify never reported."""
        with self._lock:
            return self._settler.missed

    @property
    def overflows(self) -> int:
        """inotify queue overflows (events lost) since start; each one triggered a rescan."""
        with self._lock:
            return self._overflows.count

    @property
    def last_overflow_age(self) -> float | None:
        """Seconds since the last queue overflow (None if there was none)."""
        with self._lock:
            last = self._overflows.last
        return None if last is None else max(0.0, self._clock() - last)

    @property
    def directories(self) -> int:
        """Directories below the root (root included) counted by the last full scan."""
        with self._lock:
            return self._supervisor.directories

    @property
    def inotify_watches(self) -> int | None:
        """Watches this folder's inotify instance held at the last check (None if polled)."""
        with self._lock:
            return self._observers.watches
