"""The daemon: folders watched, indexed and served as one read-only de-identified mount.

Threads:

- the main thread (in :meth:`Service.run`) handles signals and supervises: it polls the
  configuration file, runs reloads asked for by SIGHUP, sends systemd's watchdog pings
  (only while every part is alive) and ``STATUS=`` lines;
- ``fuse-loop`` runs the mfusepy loop, which has its own worker threads;
- each folder's :class:`~deidfs.watch.watcher.FolderWatcher` reports settled and deleted files to
  :meth:`Service._sink`, which only queues them;
- ``deidfs-index-N`` threads (``[daemon] workers``, at least two) index queued sources.
  Each owns a render process (:mod:`deidfs.view.pool`) that renders the source
  header-only while the thread waits on its pipe: rendering is Python, and in this process
  it would hold the GIL the FUSE callbacks need. The thread then stores the result in the
  index and updates the mount's tree. Only that bookkeeping, before and after a render,
  is serialized (``_index_lock``); no lock is held across a render, so a slow source holds
  up its own thread only, and one past ``[daemon] parse_timeout_seconds`` is abandoned
  (its process killed and replaced) and withheld as ``parse_timeout``. ``status`` lists
  the renders that have run for more than a second;
- ``deidfs-verify`` checks, once at start, that the sources loaded from the index still
  exist (files deleted while the daemon was down are never reported by a watcher);
- ``deidfs-control`` serves the control socket (status, reload, export) and
  ``deidfs-metrics-http`` the Prometheus endpoint.

The mount is up at once with whatever the index already knows; the initial scans fill it
in the background. Nothing here opens an original for writing, and nothing logs a source
path: logs carry the folder id and a short keyed token of the path.

Reload (SIGHUP, ``deidfs reload``, or a change of the configuration file) is a transaction:
the file is read and validated, every folder's plan compiled, and only then is anything
changed; any error leaves the running configuration untouched (the last good one keeps
serving) and is reported with file, line and key. A blank file (empty, or nothing but
whitespace and comments) is such an error: it is what an editor leaves between truncating
and writing, and it would remove every folder; a file without ``[folders]`` but with other
content is an admin's choice and applies. Applied by difference:

- new folders appear and fill as they are scanned; removed folders go with their index rows;
- a folder whose views change (its profile's rules, options or name, or its layout) is
  **failed closed**: all its old views disappear at once with the switch, and every source
  is queued to be indexed again under the new profile, so a view reappears only once it was
  rendered with the new profile. Serving the old views meanwhile would show what a stricter
  new profile removes; views of an unchanged plan are kept as they are. An open file handle
  of a withdrawn view fails its next read (EIO) instead of mixing versions;
- a changed watch mode or watch timing restarts the folder's watcher (files are not
  parsed again); ``cache_mib`` and more ``workers`` apply at once;
- settings that need a restart (``mountpoint``, ``state_dir``, ``metrics_address``,
  ``control_socket``, ``allow_other``, fewer ``workers``) keep their running value and are
  reported as warnings, never half-applied.

The configuration file is polled (SHA-256 every half second) rather than watched with
inotify: editors replace the file by rename, configuration management swaps symlinks, and
``/etc`` may be on a network file system; a change is applied once the file has kept its new
content for one more poll, so a file still being written in place is never loaded half
written. A ``rules_file`` a profile refers to is not polled: ``deidfs reload`` picks its
changes up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import stat
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

from deidfs.config.load import load_config
from deidfs.config.model import Config, ConfigInvalid, DaemonConfig, FolderConfig
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError, DeidfsError, NotFound
from deidfs.export import folder as export_module
from deidfs.export.selection import Selection
from deidfs.mount.lifecycle import FuseMount, clear_stale_mount
from deidfs.mount.ops import DeidOperations
from deidfs.ops.control import ControlServer, may_read_sources
from deidfs.ops.control_protocol import ErrorCode, ExportRequest, Reply, Request
from deidfs.ops.http import MetricsServer
from deidfs.ops.logs import LibraryWarnings
from deidfs.ops.metrics import FolderState, Metrics, StateSnapshot
from deidfs.ops.sdnotify import Notifier
from deidfs.secret import load_or_create_key
from deidfs.service.status import FolderStatus, ReloadOutcome, ServiceStatus
from deidfs.service.work import _CancelFlag, _Key, _Kind, _WorkQueue
from deidfs.view.handles import ViewFS, unsettled_ns
from deidfs.view.index import Entry, Index, Status
from deidfs.view.pool import TIMEOUT_REASON, Rendered, RenderProcess
from deidfs.view.render import SourceStat, View
from deidfs.view.tree import FolderView, ViewFile, ViewTree, pseudo_mtime_ns
from deidfs.watch.events import Change, FileEvent
from deidfs.watch.watcher import FolderWatcher

log = logging.getLogger(__name__)

#: Bumped when the bytes a view holds change for the same source, plan, layout and key
#: (render.py changes); part of every view digest, so old index rows are re-rendered.
RENDER_VERSION = "2"  # 2: data sets not whole at every depth withheld; bytes past the image zeroed
#: Bound of each join at shutdown.
JOIN_SECONDS = 5.0
#: How often the configuration file's SHA-256 is compared (see the module notes).
CONFIG_POLL_SECONDS = 0.5
#: How often ``STATUS=`` is sent to systemd.
STATUS_SECONDS = 5.0
#: Indexing threads (each with its render process) at least, whatever ``workers`` says: with
#: one, a source taking its whole time bound would hold up every other.
MIN_INDEX_WORKERS = 2
#: A render running longer than this is shown by ``status`` (as in progress).
SHOW_RENDER_AFTER_SECONDS = 1.0
#: How long a stopping daemon lets renders in progress finish before it kills them.
STOP_RENDER_GRACE_SECONDS = 1.0
#: ``[daemon]`` settings a running daemon cannot change: a reload keeps their old value.
RESTART_SETTINGS = ("mountpoint", "state_dir", "metrics_address", "control_socket", "allow_other")
_WATCH_SETTINGS = ("settle_seconds", "poll_seconds", "reconcile_seconds")


@dataclass
class _Folder:
    """Per-folder state; replaced as a whole when the folder's configuration changes."""

    config: FolderConfig
    view: FolderView
    prefix: str  #: root + "/", for cheap containment checks
    watcher: FolderWatcher | None = None
    #: Withheld sources: path -> (state, digest, reason).
    refused: dict[str, tuple[SourceStat, str, str]] = field(default_factory=dict)


@dataclass
class _ReloadPlan:
    """What a reload changes; built completely before anything is applied."""

    config: Config  #: the configuration that will run (restart-only settings kept)
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    added: list[_Folder] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rerender: list[_Folder] = field(default_factory=list)  #: new views: fail closed
    rebound: list[_Folder] = field(default_factory=list)  #: same views, other settings
    restart_watchers: set[str] = field(default_factory=set)


class _ConfigPoll:
    """Tells when the configuration file has new content that has stopped changing."""

    def __init__(self, path: Path, seen: str) -> None:
        self.path = path
        self.seen = seen  #: digest of the content last loaded or rejected
        self._candidate: str | None = None

    def due(self) -> bool:
        """True when the file differs from :attr:`seen` and kept that content for a poll."""
        digest = file_sha256(self.path)
        if digest == self.seen:
            self._candidate = None
            return False
        if digest != self._candidate:
            self._candidate = digest  # changed since the last poll: maybe still being written
            return False
        self._candidate = None
        return True


class _LogCounter(logging.Handler):
    """Counts log records by level for ``deidfs_log_messages_total``."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.DEBUG)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self._metrics.log_record(record.levelname.lower())


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; "" when it cannot be read (missing, permissions)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def view_digest(
    plan_digest: str, layout: str, pseudonymizer: Pseudonymizer, max_header_bytes: int
) -> str:
    """Digest of everything a folder's views depend on besides the source itself (the
    header bound among them: what it withholds is part of what is served).

    The key enters as a keyed token, so the digest (stored in the index) reveals nothing.
    """
    key_id = pseudonymizer.token("view-digest", "key")
    blob = f"{RENDER_VERSION}\0{plan_digest}\0{layout}\0{key_id}\0{max_header_bytes}"
    return hashlib.sha256(blob.encode()).hexdigest()


def quiet_third_party_logs(tally: LibraryWarnings | None = None) -> None:
    """Keep PHI that libraries log out of the daemon's logs.

    pydicom logs (and warns) with element values: names, IDs, UIDs; watchdog logs raw source
    paths, which can carry patient names. deidfs' own modules report what matters instead.
    pydicom's log records go to ``tally`` (counted by category, never written), or nowhere.
    """
    for name in ("pydicom", "watchdog"):
        lib_log = logging.getLogger(name)
        lib_log.setLevel(logging.CRITICAL + 1)
        lib_log.propagate = False
    if tally is not None:
        tally.install()
    # Warnings go to stderr (the journal) with the offending value in them; pydicom's are
    # the twins of its log records, which the tally counts.
    warnings.simplefilter("ignore")
    # mfusepy (logger "fuse") logs every failed operation with its arguments at debug level.
    logging.getLogger("fuse").setLevel(logging.WARNING)


class Service:
    """The running daemon for one configuration.

    Parameters
    ----------
    config
        The validated configuration. Its ``source`` (the file it came from) is what
        reloads read again; without one, :meth:`reload` needs a configuration passed in.
    notifier
        systemd notifications (a no-op outside systemd).
    metrics
        The metrics to count in; a fresh :class:`~deidfs.ops.metrics.Metrics` (own registry)
        by default.
    clock
        Monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier({})
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._started_at = clock()
        d = config.daemon
        self.mountpoint = Path(os.path.abspath(d.mountpoint))
        self.state_dir = Path(os.path.abspath(d.state_dir))
        self.tree = ViewTree()
        self.fs = ViewFS(
            self.tree, d.cache_mib * 1024 * 1024, on_stale=self._on_stale, metrics=self.metrics
        )
        self.ops = DeidOperations(self.fs, metrics=self.metrics)
        self.mount: FuseMount | None = None
        self.index: Index | None = None
        self.http: MetricsServer | None = None
        self.control: ControlServer | None = None
        self._pseudo: Pseudonymizer | None = None
        #: Replaced as a whole (copy on write) by reloads; readers take a reference.
        self._folders: dict[str, _Folder] = {}
        self._queue = _WorkQueue()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = False
        self._ready = False
        self._reload_requested = threading.Event()
        self._reload_trigger = "signal"
        self._reload_lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._config_poll: _ConfigPoll | None = None
        self._counter_lock = threading.Lock()
        #: Held while the index and the tree are updated, never across a render.
        self._index_lock = threading.Lock()
        self._renderers: list[RenderProcess] = []
        #: Renders in progress: worker slot -> (folder id, file token, start on the clock).
        self._rendering: dict[int, tuple[str, str, float]] = {}
        self._hinted: dict[_Key, float] = {}
        self.rendered = 0
        self.reused = 0
        self.last_reload: ReloadOutcome | None = None
        #: pydicom's warnings, counted by category while :meth:`run` runs
        self.library_warnings = LibraryWarnings()

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up and return; the initial scans continue in the background.

        Order: key, folders and index; the metrics endpoint (a port in use fails here,
        before anything is mounted); the mount; indexing threads; the control socket;
        the watchers. :attr:`ready` is true once all of it runs.

        Raises
        ------
        DeidfsError
            The key, a folder's profile, the metrics address, the control socket or the
            mount cannot be set up.
        """
        key = load_or_create_key(self.state_dir)
        self._pseudo = Pseudonymizer(key)
        folders: dict[str, _Folder] = {}
        plans: dict[str, Plan] = {}
        for fc in self.config.folders.values():
            folders[fc.id] = self._new_folder(fc, self.config, plans)
        for folder in folders.values():
            self.tree.set_folder(folder.view)
            self.metrics.folder_added(folder.config.id)
        self._folders = folders
        self.index = Index(self.state_dir)
        self._load_index()
        self.metrics.set_state_source(self.metrics_state)
        self.metrics.set_before_scrape(self.ops.sync)
        d = self.config.daemon
        if d.metrics_address:
            self.http = MetricsServer(d.metrics_address, self.metrics.registry, self.ready)
            self.http.start()
        clear_stale_mount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.mount = FuseMount(self.ops, self.mountpoint, allow_other=d.allow_other)
        self.mount.start()
        self.tree.invalidator = self.ops.invalidate
        self._start_workers(_index_workers(d.workers))
        threading.Thread(target=self._verify, name="deidfs-verify", daemon=True).start()
        self.control = ControlServer(
            Path(os.path.abspath(d.control_socket)),
            {
                "status": self._cmd_status,
                "reload": self._cmd_reload,
                "export": self._cmd_export,
                "withheld": self._cmd_withheld,
            },
            on_request=self.metrics.control_request,
        )
        self.control.start()
        for folder in self._folders.values():
            self._start_watcher(folder)
        now = time.time()
        self.last_reload = ReloadOutcome(True, "start", now, self.config.sha256)
        self.metrics.config_loaded(True, now, reload=False)
        if self.config.source is not None:
            self._config_poll = _ConfigPoll(self.config.source, self.config.sha256)
        self._ready = True
        log.info(
            "serving %d folder(s) at the mountpoint; %d file(s) from the index",
            len(self._folders),
            self.reused,
        )

    def _start_workers(self, count: int) -> None:
        for _ in range(count):
            n = len(self._workers)
            renderer = RenderProcess(f"deidfs-render-{n}")
            renderer.start()
            t = threading.Thread(
                target=self._work, args=(n, renderer), name=f"deidfs-index-{n}", daemon=True
            )
            self._renderers.append(renderer)
            t.start()
            self._workers.append(t)

    def _new_folder(
        self, fc: FolderConfig, config: Config, plans: dict[str, Plan] | None = None
    ) -> _Folder:
        """The state of a folder under ``config``; touches nothing (reloads build first).

        ``plans`` caches compiled plans by profile name across the folders of one config.
        """
        assert self._pseudo is not None
        profile = config.profiles.get(fc.profile)
        if profile is None:
            raise ConfigError(f"folder {fc.id!r}: no profile named {fc.profile!r}")
        if not profile.enabled:
            raise ConfigError(f"folder {fc.id!r}: profile {fc.profile!r} is disabled")
        cache = plans if plans is not None else {}
        plan = cache.get(fc.profile)
        if plan is None:
            plan = cache[fc.profile] = compile_plan(profile)
        root = Path(os.path.abspath(fc.path))
        view = FolderView(
            id=fc.id,
            root=root,
            plan=plan,
            pseudonymizer=self._pseudo,
            layout=fc.layout,
            digest=view_digest(
                plan.digest, fc.layout.value, self._pseudo, config.daemon.max_header_bytes
            ),
            max_header_bytes=config.daemon.max_header_bytes,
        )
        return _Folder(config=fc, view=view, prefix=str(root).rstrip("/") + "/")

    def _start_watcher(self, folder: _Folder) -> None:
        d = self.config.daemon
        watcher = FolderWatcher(
            folder.config.id,
            folder.view.root,
            folder.config.watch,
            settle_seconds=d.settle_seconds,
            poll_seconds=d.poll_seconds,
            reconcile_seconds=d.reconcile_seconds,
            sink=self._sink,
            clock=self._clock,
        )
        folder.watcher = watcher
        watcher.start()

    def _load_index(self) -> None:
        """Fill the tree from the index: rows of unchanged plans are served at once."""
        assert self.index is not None
        for stale in self.index.folders() - set(self._folders):
            log.info("folder %s left the configuration; forgetting its index rows", stale)
            self.index.remove_folder(stale)
        for folder in self._folders.values():
            self._load_folder_index(folder)

    def _load_folder_index(self, folder: _Folder) -> None:
        assert self.index is not None
        for entry in self.index.iter_entries(folder.config.id):
            if not entry.path.startswith(folder.prefix):
                self.index.remove(entry.folder, entry.path)  # the folder moved
            elif entry.digest == folder.view.digest:
                self._apply(folder, entry)
                self._count(reused=1)

    def _apply(self, folder: _Folder, entry: Entry) -> None:
        """Make the tree (and the refusal table) reflect one index entry."""
        if entry.status is Status.OK:
            folder.refused.pop(entry.path, None)
            vf = self._view_file(folder, entry)
            before = self.tree.file(vf.mount_path)
            self.tree.put(vf)
            if before is not None and before.source != vf.source:
                self._log_duplicate(folder, vf.source, before.source, vf.mount_path)
        else:
            self.tree.remove(folder.config.id, entry.path)
            folder.refused[entry.path] = (entry.source, entry.digest, entry.reason)

    def _log_duplicate(self, folder: _Folder, new: str, other: str, mount_path: str) -> None:
        """Two sources have one view path (the same SOP Instance UID, say): one is served."""
        served = self.tree.file(mount_path)
        if served is None or served.source not in (new, other):
            return  # changed meanwhile; whatever holds the path now was logged in its turn
        hidden = other if served.source == new else new
        log.info(
            "duplicate: folder=%s file=%s not served: same view as file=%s, which is served "
            "(see deidfs withheld)",
            folder.config.id,
            self._token(hidden),
            self._token(served.source),
        )

    def _view_file(self, folder: _Folder, entry: Entry) -> ViewFile:
        assert self._pseudo is not None
        # One folder id and digest object for all of a folder's files, not one per file.
        fid, digest = folder.config.id, folder.view.digest
        return ViewFile(
            folder=fid if entry.folder == fid else entry.folder,
            source=entry.path,
            state=entry.source,
            digest=digest if entry.digest == digest else entry.digest,
            relpath=entry.relpath,
            size=entry.view_size,
            mtime_ns=pseudo_mtime_ns(self._pseudo, entry.source, entry.digest),
            header_length=entry.header_length,
            pixel_offset=entry.pixel_offset,
            pixel_length=entry.pixel_length,
            trailer_length=entry.trailer_length,
        )

    # -- events --------------------------------------------------------------------------

    def _sink(self, change: Change) -> None:
        """Watcher callback (on the watcher's thread): only queue."""
        kind = _Kind.READY if change.kind is FileEvent.READY else _Kind.GONE
        self.metrics.watch_change(change.folder_id, change.kind.value)
        self._queue.put((change.folder_id, os.fspath(change.path)), kind)

    def _on_stale(self, folder_id: str, source: str) -> None:
        """FUSE callback: an open found the source changed; index it again once settled.

        A viewer retrying a changed file calls this in a loop: at most one hint per
        source and second goes to the queue.
        """
        key = (folder_id, source)
        now = self._clock()
        with self._counter_lock:
            if now - self._hinted.get(key, -1e9) < 1.0:
                return
            if len(self._hinted) > 4096:
                self._hinted.clear()
            self._hinted[key] = now
        self._queue.put(key, _Kind.HINT)

    def _work(self, slot: int, renderer: RenderProcess) -> None:
        """An indexing worker: index queued sources one by one, rendering each in its own
        render process (see the module notes)."""
        try:
            while not self._stop.is_set():
                item = self._queue.get(timeout=0.5)
                if item is not None:
                    self._index_item(slot, renderer, *item)
                if not len(self._queue):
                    self._flush_index()
        finally:
            renderer.close()

    def _index_item(self, slot: int, renderer: RenderProcess, key: _Key, kind: _Kind) -> None:
        """Handle one queued source; a failure is logged, never raised."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event: folder=%s file=%s %s", key[0], self._token(key[1]), kind.value)
        try:
            folder = self._folders.get(key[0])
            if folder is not None:
                if kind is _Kind.GONE:
                    with self._index_lock:
                        self._forget(folder, key[1])
                else:
                    self._index_source(folder, key[1], slot, renderer, hint=kind is _Kind.HINT)
        except Exception as exc:  # contain: one bad file must not stop indexing
            log.error(
                "indexing failed: folder=%s file=%s error=%s",
                key[0],
                self._token(key[1]),
                type(exc).__name__,
            )
        finally:
            self._queue.done(key)

    def _flush_index(self) -> None:
        """Nothing (more) to index for now: commit the index rows written in a batch."""
        if self.index is not None:
            self.index.flush()

    def _index_source(
        self,
        folder: _Folder,
        path: str,
        slot: int,
        renderer: RenderProcess,
        hint: bool = False,
    ) -> None:
        with self._index_lock:
            checked = self._needs_render(folder, path, hint)
        if checked is None:
            return
        st, state = checked
        fid = folder.config.id
        wait = unsettled_ns(st, time.time_ns())
        if wait:
            # Changed within a timestamp tick: a write later in that tick would not show in
            # the state. Render once the tick is over, from the same state.
            time.sleep(wait / 1e9)
            try:
                st = os.lstat(path)
            except OSError:
                return  # gone or unreadable: the watcher reports it
            if SourceStat.of(st) != state:
                return  # changed again: the watcher reports it once it has settled
            if unsettled_ns(st, time.time_ns()):
                self._queue.put((fid, path), _Kind.READY)  # only its ctime moved: again
                return
        rel = _relative(path, folder.prefix, folder.view.root)
        view = folder.view
        token = self._token(path)
        self._rendering[slot] = (fid, token, self._clock())
        try:
            outcome = renderer.render(
                path,
                rel,
                view.digest,
                (view.plan, view.pseudonymizer, view.layout, view.max_header_bytes),
                self.config.daemon.parse_timeout_seconds,
            )
        finally:
            self._rendering.pop(slot, None)
        if outcome.warnings:
            self.library_warnings.add(dict(outcome.warnings), token)
        if outcome.lost and self._stop.is_set():
            return  # stopping: the render was abandoned, the file is indexed at the next start
        self.metrics.observe_render(fid, outcome.seconds)
        self._count(rendered=1)
        after = self._still(path, state)
        with self._index_lock:
            self._store(folder, path, st, state, after, outcome)

    def _needs_render(
        self, folder: _Folder, path: str, hint: bool
    ) -> tuple[os.stat_result, SourceStat] | None:
        """The source's lstat and state when it must be rendered; None when it was handled
        here (forgotten, withheld, taken from the index, or nothing to do). Index lock held."""
        assert self.index is not None
        fid = folder.config.id
        digest = folder.view.digest
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(folder, path)
            return None
        except OSError:
            self._withhold(folder, path, None, "unreadable")
            return None
        state = SourceStat.of(st)
        if hint and time.time_ns() - st.st_mtime_ns < self.config.daemon.settle_seconds * 1e9:
            return None  # still being written: the watcher reports it once it has settled
        served = self.tree.by_source(fid, path)
        if served is not None and served.state == state and served.digest == digest:
            return None
        known = folder.refused.get(path)
        if known is not None and known[0] == state and known[1] == digest:
            return None
        row = self.index.get(fid, path)
        if row is not None and row.source == state and row.digest == digest:
            self._apply(folder, row)
            self._count(reused=1)
            return None
        reason = self._unsafe(folder, path, st)
        if reason:
            self._withhold(folder, path, state, reason)
            return None
        return st, state

    def _store(
        self,
        rendered_for: _Folder,
        path: str,
        st: os.stat_result,
        state: SourceStat,
        after: os.stat_result | None,
        outcome: Rendered,
    ) -> None:
        """Make the index and the tree say what the render found. Index lock held."""
        assert self.index is not None
        fid = rendered_for.config.id
        folder = self._folders.get(fid)
        if (
            folder is None
            or folder.view.digest != rendered_for.view.digest
            or not path.startswith(folder.prefix)
        ):
            # A reload replaced the folder's views meanwhile: the source is queued again
            # for them (or the folder is gone).
            return
        rendered = outcome.view
        if after is None or (rendered is not None and rendered.source != state):
            # Written to while it was parsed (a copy in place): what was read may be a
            # mix. The watcher reports the file again once it has settled.
            log.debug("folder=%s file=%s changed while indexed", fid, self._token(path))
            return
        if after.st_ctime_ns != st.st_ctime_ns:
            # Same state, later ctime: a chmod (which the watcher does not report), or a
            # rewrite that kept size and mtime. What was read may be a mix: again (as
            # READY: the watcher reported this state and will not report it again).
            self._queue.put((fid, path), _Kind.READY)
            return
        if outcome.error:
            log.error(
                "indexing failed: folder=%s file=%s error=%s", fid, self._token(path), outcome.error
            )
            return
        reason = outcome.reason
        if outcome.lost:
            # The render process died under this file (killed, out of memory, a crash in
            # a decoder): fail closed.
            log.warning(
                "render process died while rendering folder=%s file=%s; withheld",
                fid,
                self._token(path),
            )
            reason = "unparseable"
        if rendered is None:
            if reason == TIMEOUT_REASON:
                log.warning(
                    "folder=%s file=%s: render took longer than %g s; abandoned",
                    fid,
                    self._token(path),
                    self.config.daemon.parse_timeout_seconds,
                )
            log.debug("folder=%s file=%s refused at size %d", fid, self._token(path), state.size)
            self._withhold(folder, path, state, reason)
            return
        entry = self._entry(folder, path, rendered)
        self.index.put(entry)
        self._apply(folder, entry)
        key = (path, rendered.source, folder.view.digest)
        # The header was just built: keep it so the first open of the view is cheap.
        self.fs.cache.put(key, rendered)

    @staticmethod
    def _still(path: str, state: SourceStat) -> os.stat_result | None:
        """The source's lstat if it still has ``state``."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st if SourceStat.of(st) == state else None

    def _unsafe(self, folder: _Folder, path: str, st: os.stat_result) -> str:
        """Why a path must not be served although it may be DICOM ("" if it may)."""
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if not path.startswith(folder.prefix):
            return "outside_folder"
        # A directory on the way replaced by a link would lead out of the folder.
        real_root = _real_directory(str(folder.view.root))
        real_dir = _real_directory(os.path.dirname(path))
        if real_dir != real_root and not real_dir.startswith(real_root.rstrip("/") + "/"):
            return "outside_folder"
        return ""

    def _entry(self, folder: _Folder, path: str, view: View) -> Entry:
        return Entry(
            folder=folder.config.id,
            path=path,
            source=view.source,
            digest=folder.view.digest,
            status=Status.OK,
            relpath=str(view.relpath),
            view_size=view.size,
            header_length=len(view.header),
            pixel_offset=view.pixel_offset,
            pixel_length=view.pixel_length,
            trailer_length=len(view.trailer),
            indexed_ns=time.time_ns(),
        )

    def _withhold(self, folder: _Folder, path: str, state: SourceStat | None, reason: str) -> None:
        """Fail closed: the source is not shown; counted by reason, logged by token."""
        assert self.index is not None
        fid = folder.config.id
        self.tree.remove(fid, path)
        if state is None:
            folder.refused.pop(path, None)
            return
        before = folder.refused.get(path)
        first = before is None or before[2] != reason
        entry = Entry(
            folder=fid,
            path=path,
            source=state,
            digest=folder.view.digest,
            status=Status.REFUSED,
            reason=reason,
            indexed_ns=time.time_ns(),
        )
        self.index.put(entry)
        folder.refused[path] = (state, entry.digest, reason)
        if first:
            self.metrics.file_refused(fid, reason)
            log.info("withheld: folder=%s file=%s reason=%s", fid, self._token(path), reason)

    def _forget(self, folder: _Folder, path: str) -> None:
        assert self.index is not None
        fid = folder.config.id
        self.tree.remove(fid, path)
        folder.refused.pop(path, None)
        if self._root_reachable(folder):
            self.index.remove(fid, path)
        # else: an outage; the row stays so the file comes back without being parsed again.

    @staticmethod
    def _root_reachable(folder: _Folder) -> bool:
        try:
            return stat.S_ISDIR(os.stat(folder.view.root).st_mode)
        except OSError:
            return False

    def _verify(self) -> None:
        """Drop what the index knows but the disk no longer has (deleted while stopped)."""
        for folder in list(self._folders.values()):
            if self._stop.is_set():
                return
            reachable = self._root_reachable(folder)
            known = [vf.source for vf in self.tree.sources(folder.config.id)]
            known += list(folder.refused)
            gone = 0
            for path in known:
                if self._stop.is_set():
                    return
                try:
                    os.lstat(path)
                except FileNotFoundError:
                    if reachable:
                        self._queue.put((folder.config.id, path), _Kind.GONE)
                        gone += 1
                except OSError:
                    pass
            if not reachable:
                # Nothing can be read: withdraw the views until the watcher finds the root.
                for path in known:
                    self.tree.remove(folder.config.id, path)
                log.warning(
                    "folder %s: root unreachable; its views are withdrawn", folder.config.id
                )
            elif gone:
                log.info("folder %s: %d source(s) deleted while stopped", folder.config.id, gone)

    def _count(self, rendered: int = 0, reused: int = 0) -> None:
        with self._counter_lock:
            self.rendered += rendered
            self.reused += reused

    def _token(self, path: str) -> str:
        pseudo = self._pseudo
        return pseudo.token(path, "path")[:12] if pseudo is not None else "-"

    # -- status --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Mounted, observers started and not stopping (``/-/ready``)."""
        m = self.mount
        return self._ready and not self._stop.is_set() and m is not None and m.alive

    def status(self) -> ServiceStatus:
        """A consistent-enough snapshot for reporting (counts may move while it is taken)."""
        self.ops.sync()  # handles the C read path released are closed, and counted
        folders = []
        for fid, folder in sorted(self._folders.items()):
            counts = self.tree.counts(fid)
            reasons = Counter(r for _, _, r in list(folder.refused.values()))
            w = folder.watcher
            folders.append(
                FolderStatus(
                    id=fid,
                    profile=folder.config.profile,
                    layout=folder.config.layout.value,
                    visible=counts.visible,
                    duplicates=counts.duplicates,
                    refused=tuple(sorted(reasons.items())),
                    bytes=counts.bytes,
                    watch=w.kind if w is not None else "",
                    watch_healthy=w.healthy if w is not None else False,
                    settling=w.pending if w is not None else 0,
                    watch_degraded=(w.degraded_reason or "") if w is not None else "",
                    directories=w.directories if w is not None else 0,
                    missed=w.missed_files if w is not None else 0,
                    events=tuple(sorted(w.event_counts.items())) if w is not None else (),
                    overflows=w.overflows if w is not None else 0,
                    last_overflow_age=w.last_overflow_age if w is not None else None,
                )
            )
        m = self.mount
        cache = self.fs.cache
        now = self._clock()
        rendering = sorted(
            (fid, token, now - since)
            for fid, token, since in list(self._rendering.values())
            if now - since > SHOW_RENDER_AFTER_SECONDS
        )
        return ServiceStatus(
            mountpoint=str(self.mountpoint),
            mounted=m is not None and m.alive,
            libfuse=m.libfuse_version if m is not None else "",
            folders=tuple(folders),
            backlog=len(self._queue),
            rendered=self.rendered,
            reused=self.reused,
            open_files=self.fs.open_handles,
            cache_bytes=cache.size_bytes,
            cache_entries=len(cache),
            stale_opens=self.fs.stale,
            uptime_seconds=self._clock() - self._started_at,
            ready=self.ready(),
            config_path=str(self.config.source or ""),
            config_sha256=self.config.sha256,
            last_reload=self.last_reload,
            cache_hits=cache.hits,
            cache_misses=cache.misses,
            pydicom_warnings=tuple(sorted(self.library_warnings.counts().items())),
            open_limit=self.fs.max_handles,
            refused_opens=self.fs.exhausted,
            rendering=tuple(rendering),
        )

    def metrics_state(self) -> StateSnapshot:
        """The state part of the metrics (read at each scrape, on the HTTP thread)."""
        s = self.status()
        return StateSnapshot(
            mounted=s.mounted,
            backlog=s.backlog,
            open_files=s.open_files,
            stale_opens=s.stale_opens,
            refused_opens=s.refused_opens,
            cache_hits=s.cache_hits,
            cache_misses=s.cache_misses,
            cache_bytes=s.cache_bytes,
            cache_entries=s.cache_entries,
            pydicom_warnings=s.pydicom_warnings,
            folders=tuple(
                FolderState(
                    folder=f.id,
                    profile=f.profile,
                    layout=f.layout,
                    visible=f.visible,
                    duplicates=f.duplicates,
                    view_bytes=f.bytes,
                    withheld=f.refused,
                    watch_polling=f.watch == "poll",
                    watch_healthy=f.watch_healthy,
                    settling=f.settling,
                    directories=f.directories,
                    missed=f.missed,
                    events=f.events,
                    overflows=f.overflows,
                )
                for f in s.folders
            ),
        )

    def status_line(self) -> str:
        """One line for ``STATUS=`` (systemctl status)."""
        s = self.status()
        visible = sum(f.visible for f in s.folders)
        refused = sum(f.refused_total for f in s.folders)
        line = (
            f"{len(s.folders)} folder(s), {visible} file(s) served, {refused} withheld, "
            f"{s.backlog} queued"
        )
        warned = sum(n for _, n in s.pydicom_warnings)
        if warned:
            line += f", {warned} pydicom warning(s)"
        last = self.last_reload
        if last is not None and not last.ok:
            line += "; configuration rejected, the last good one is serving"
        return line

    # -- reload --------------------------------------------------------------------------

    def request_reload(self, trigger: str = "signal") -> None:
        """Ask the supervising loop to reload (thread- and signal-safe); returns at once."""
        self._reload_trigger = trigger
        self._reload_requested.set()

    def reload(self, trigger: str = "control", config: Config | None = None) -> ReloadOutcome:
        """Read the configuration again and apply what changed; keep it all on any error.

        Parameters
        ----------
        trigger
            What asked for it (reported in ``status``): ``signal``, ``control``, ``file``.
        config
            Apply this configuration instead of reading the file (tests, embedding).

        Returns
        -------
        ReloadOutcome
            ``ok`` False with the problems (file:line: key: message) when the new
            configuration was rejected; the running one is then unchanged.
        """
        with self._reload_lock:
            if self._stop.is_set() or not self._ready:
                return ReloadOutcome(
                    False, trigger, time.time(), errors=("the daemon is not running",)
                )
            self.notifier.reloading()
            started = time.monotonic()
            try:
                outcome = self._reload(trigger, config)
            except Exception as exc:  # contain: a failed reload must never stop serving
                log.error("reload failed unexpectedly: %s", type(exc).__name__)
                outcome = ReloadOutcome(
                    False, trigger, time.time(), errors=(f"internal error: {type(exc).__name__}",)
                )
            self.last_reload = outcome
            self.metrics.config_loaded(outcome.ok, outcome.finished_at)
            if outcome.ok:
                log.info(
                    "configuration reloaded (%s) in %.2f s: %s",
                    trigger,
                    time.monotonic() - started,
                    "; ".join(outcome.changes) or "nothing changed",
                )
                for warning in outcome.warnings:
                    log.warning("reload: %s", warning)
            else:
                for error in outcome.errors:
                    log.error("configuration rejected, the last good one keeps serving: %s", error)
            self.notifier.ready(self.status_line())
            return outcome

    def _reload(self, trigger: str, given: Config | None) -> ReloadOutcome:
        digest = ""
        if given is None:
            path = self.config.source
            if path is None:
                return ReloadOutcome(
                    False,
                    trigger,
                    time.time(),
                    errors=("started without a configuration file: nothing to reload",),
                )
            digest = file_sha256(path)
            if self._config_poll is not None:
                self._config_poll.seen = digest  # this content is handled now
            try:
                # Blank is what an editor leaves between truncating and writing: never
                # applied, as it would remove every folder.
                new = load_config(path, allow_blank=False)
            except ConfigError as exc:
                errors = exc.errors if isinstance(exc, ConfigInvalid) else (exc,)
                return ReloadOutcome(
                    False, trigger, time.time(), digest, errors=tuple(str(e) for e in errors)
                )
        else:
            new = given
        try:
            plan = self._plan(new)
        except (DeidfsError, ValueError) as exc:
            return ReloadOutcome(False, trigger, time.time(), digest, errors=(str(exc),))
        self._apply_plan(plan)
        return ReloadOutcome(
            True,
            trigger,
            time.time(),
            new.sha256 or digest,
            warnings=tuple(plan.warnings),
            changes=tuple(plan.changes),
        )

    def _plan(self, new: Config) -> _ReloadPlan:
        """Work out what ``new`` changes; compiles every plan, changes nothing."""
        old_d, new_d = self.config.daemon, new.daemon
        keep: dict[str, Any] = {}
        warnings_: list[str] = []
        for name in RESTART_SETTINGS:
            if getattr(new_d, name) != getattr(old_d, name):
                keep[name] = getattr(old_d, name)
                warnings_.append(
                    f"[daemon] {name} changed: takes effect at the next restart "
                    f"(running with {getattr(old_d, name)!s})"
                )
        if _index_workers(new_d.workers) < len(self._workers):
            keep["workers"] = old_d.workers
            warnings_.append(
                f"[daemon] workers lowered to {new_d.workers}: takes effect at the next restart"
            )
        daemon: DaemonConfig = dataclasses.replace(new_d, **keep)
        config = Config(
            daemon=daemon,
            folders=new.folders,
            profiles=new.profiles,
            destinations=new.destinations,
            source=new.source if new.source is not None else self.config.source,
            sha256=new.sha256,
        )
        plan = _ReloadPlan(config=config, warnings=warnings_)
        watch_timing = any(getattr(old_d, n) != getattr(daemon, n) for n in _WATCH_SETTINGS)
        if watch_timing:
            plan.changes.append("watch timing changed: watchers restarted")
        if daemon.cache_mib != old_d.cache_mib:
            plan.changes.append(f"header cache bound set to {daemon.cache_mib} MiB")
        if _index_workers(daemon.workers) > len(self._workers):
            plan.changes.append(f"indexing workers raised to {daemon.workers}")
        if daemon.parse_timeout_seconds != old_d.parse_timeout_seconds:
            plan.changes.append(f"parse timeout set to {daemon.parse_timeout_seconds:g} s")
        current = self._folders
        plans: dict[str, Plan] = {}
        for fid in sorted(set(current) - set(new.folders)):
            plan.removed.append(fid)
            plan.changes.append(f"folder {fid} removed")
        for fid, fc in sorted(new.folders.items()):
            folder = self._new_folder(fc, config, plans)
            cur = current.get(fid)
            if cur is None:
                plan.added.append(folder)
                plan.changes.append(f"folder {fid} added (profile {fc.profile})")
            elif folder.view.root != cur.view.root:
                plan.removed.append(fid)
                plan.added.append(folder)
                plan.changes.append(f"folder {fid} moved to another path: indexed anew")
            elif folder.view.digest != cur.view.digest:
                plan.rerender.append(folder)
                if fc.profile != cur.config.profile:
                    what = f"profile {cur.config.profile} -> {fc.profile}"
                elif folder.view.max_header_bytes != cur.view.max_header_bytes:
                    what = "[daemon] max_header_mib changed"
                else:
                    what = f"profile {fc.profile} changed"
                if fc.layout != cur.config.layout:
                    what += f", layout {cur.config.layout.value} -> {fc.layout.value}"
                plan.changes.append(f"folder {fid}: {what}; views withdrawn and rendered again")
                if fc.watch != cur.config.watch or watch_timing:
                    plan.restart_watchers.add(fid)
            else:
                if fc.watch != cur.config.watch:
                    plan.restart_watchers.add(fid)
                    plan.changes.append(
                        f"folder {fid}: watch {cur.config.watch.value} -> {fc.watch.value}"
                    )
                elif fc != cur.config:
                    plan.changes.append(f"folder {fid}: settings changed, same views")
                elif watch_timing:
                    plan.restart_watchers.add(fid)
                plan.rebound.append(folder)
        return plan

    def _apply_plan(self, plan: _ReloadPlan) -> None:
        """Apply a reload plan; nothing here fails on configuration grounds."""
        assert self.index is not None
        self.config = plan.config
        self.fs.cache.max_bytes = plan.config.daemon.cache_mib * 1024 * 1024
        wanted = _index_workers(plan.config.daemon.workers)
        if wanted > len(self._workers):
            self._start_workers(wanted - len(self._workers))
        folders = dict(self._folders)
        stop: list[FolderWatcher] = []
        for fid in plan.removed:
            gone = folders.pop(fid)
            if gone.watcher is not None:
                stop.append(gone.watcher)
            self.tree.drop_folder(fid)
            self.index.remove_folder(fid)
            self.metrics.forget_folder(fid)
        requeue: list[tuple[str, list[str]]] = []
        for folder in plan.rerender:
            fid = folder.config.id
            old = folders[fid]
            known = {vf.source for vf in self.tree.sources(fid)}
            known.update(old.refused)
            known.update(e.path for e in self.index.entries(fid))
            # Fail closed: the old views go in the same step that installs the new settings.
            withdrawn = self.tree.replace_folder(folder.view)
            folder.watcher = old.watcher
            folders[fid] = folder
            requeue.append((fid, sorted(known)))
            log.info(
                "folder %s: %d view(s) withdrawn; %d source(s) queued for the new profile",
                fid,
                withdrawn,
                len(known),
            )
        for folder in plan.rebound:
            fid = folder.config.id
            old = folders[fid]
            folder.watcher = old.watcher
            folder.refused = old.refused
            self.tree.set_folder(folder.view)
            folders[fid] = folder
        for folder in plan.added:
            fid = folder.config.id
            self.tree.set_folder(folder.view)
            folders[fid] = folder
            self.metrics.folder_added(fid)
        self._folders = folders
        for fid, paths in requeue:
            for path in paths:
                self._queue.put((fid, path), _Kind.READY)
        for folder in plan.added:
            self._load_folder_index(folder)
        for fid in sorted(plan.restart_watchers):
            folder = folders[fid]
            if folder.watcher is not None:
                stop.append(folder.watcher)
                folder.watcher = None
        for watcher in stop:
            watcher.stop()
        for fid in sorted(plan.restart_watchers):
            self._start_watcher(folders[fid])
        for folder in plan.added:
            self._start_watcher(folder)

    # -- control socket ------------------------------------------------------------------

    def _cmd_status(self, request: Request) -> Reply:
        return Reply.success(self.status().to_json())

    def _cmd_withheld(self, request: Request) -> Reply:
        """Source paths not served (withheld or duplicates), each with reason and token.

        Paths can carry patient names: only root and the configuration file's owner get
        them (see :func:`~deidfs.ops.control.may_read_sources`).
        """
        if not may_read_sources(request.peer, self.config.source):
            return Reply.failure(
                ErrorCode.DENIED,
                "only root or the owner of the configuration file may list withheld sources",
            )
        unknown = set(request.args) - {"folder"}
        if unknown:
            return Reply.failure(
                ErrorCode.BAD_REQUEST, f"unknown argument(s): {', '.join(sorted(unknown))}"
            )
        wanted = request.args.get("folder")
        if wanted is not None and not isinstance(wanted, str):
            return Reply.failure(ErrorCode.BAD_REQUEST, "'folder' must be a string")
        folders = dict(self._folders)
        if wanted is not None and wanted not in folders:
            return Reply.failure(ErrorCode.NOT_FOUND, f"no folder {wanted!r} is configured")
        out = []
        for fid, folder in sorted(folders.items()):
            if wanted is not None and fid != wanted:
                continue
            sources: list[dict[str, str]] = [
                {"path": path, "token": self._token(path), "reason": reason}
                for path, (_, _, reason) in sorted(folder.refused.items())
            ]
            for vf in sorted(self.tree.sources(fid), key=lambda v: v.source):
                served = self.tree.file(vf.mount_path)
                if served is not None and served.source != vf.source:
                    sources.append(
                        {
                            "path": vf.source,
                            "token": self._token(vf.source),
                            "reason": "duplicate",
                            "served": served.source,
                            "served_token": self._token(served.source),
                        }
                    )
            out.append({"id": fid, "sources": sources})
        return Reply.success({"folders": out})

    def _cmd_reload(self, request: Request) -> Reply:
        wait = request.args.get("wait", True)
        if not isinstance(wait, bool):
            return Reply.failure(ErrorCode.BAD_REQUEST, "'wait' must be true or false")
        if not self.ready():
            return Reply.failure(ErrorCode.BUSY, "the daemon is starting or stopping; try again")
        if not wait:
            self.request_reload("control")
            return Reply.success({"queued": True})
        outcome = self.reload("control")
        if outcome.ok:
            return Reply.success(outcome.to_json())
        return Reply.failure(
            ErrorCode.CONFIG_INVALID,
            "configuration rejected; the last good configuration keeps serving",
            outcome.errors,
        )

    def _cmd_export(self, request: Request) -> Reply:
        """``export``: :func:`deidfs.export.folder.export_folder` with the daemon's key.

        The destination is confined to ``export_dir``; one export runs at a time; a daemon
        shutting down cancels it after the files in progress. Failures carry
        ``exit_code=N`` in their details: the code the same export would exit with locally.
        """
        try:
            req = ExportRequest.from_args(request.args)
        except ValueError as exc:
            return Reply.failure(ErrorCode.BAD_REQUEST, str(exc))
        if req.folder not in self._folders:
            return Reply.failure(
                ErrorCode.NOT_FOUND,
                f"no folder {req.folder!r} is configured",
                (f"exit_code={os.EX_NOINPUT}",),
            )
        if not self._export_lock.acquire(blocking=False):
            return Reply.failure(ErrorCode.BUSY, "another export is running; try again later")
        try:
            selection = Selection(
                study=req.study, patient=req.patient, accession=req.accession, path=req.path
            )
            return self._forward_export(selection, req)
        finally:
            self._export_lock.release()

    def _forward_export(self, selection: Selection, req: ExportRequest) -> Reply:
        assert self._pseudo is not None
        if req.destination is not None:
            return self._forward_send(selection, req)
        extra: dict[str, Any] = {}
        folder = self._folders.get(req.folder)
        same_profile = req.profile is None or (
            folder is not None and req.profile == folder.config.profile
        )
        # The header cache holds views of the folder's own profile only: an export with
        # another profile must render its own.
        if folder is not None and same_profile and (req.workers or 1) <= 1:
            # Headers rendered while indexing: an export of indexed files is mostly copying.
            # (Worker processes cannot share the cache; they render for themselves.)
            cache, digest = self.fs.cache, folder.view.digest
            extra["cached"] = lambda path, state: cache.peek((path, state, digest))
        try:
            summary = export_module.export_folder(
                self.config,
                req.folder,
                self._pseudo,
                selection=selection,
                to=Path(req.to) if req.to else None,
                profile=req.profile,
                workers=req.workers or 1,
                confine=True,
                metrics=self.metrics,
                stop=_CancelFlag(self._stop),
                **extra,
            )
        except NotFound as exc:
            return Reply.failure(ErrorCode.NOT_FOUND, str(exc), (f"exit_code={exc.exit_code}",))
        except DeidfsError as exc:
            return Reply.failure(ErrorCode.FAILED, str(exc), (f"exit_code={exc.exit_code}",))
        return Reply.success(summary.to_json())

    def _forward_send(self, selection: Selection, req: ExportRequest) -> Reply:
        """``export`` with a ``destination``: :func:`deidfs.export.send.send_folder`, counted in
        ``deidfs_export_sent_total``."""
        assert self._pseudo is not None
        assert req.destination is not None
        if req.to is not None:
            return Reply.failure(ErrorCode.BAD_REQUEST, "'to' and 'destination' exclude each other")
        from deidfs.export import send as send_module  # noqa: PLC0415  (pynetdicom only when sending)

        try:
            summary = send_module.send_folder(
                self.config,
                req.folder,
                req.destination,
                self._pseudo,
                selection=selection,
                profile=req.profile,
                metrics=self.metrics,
                stop=_CancelFlag(self._stop),
            )
        except NotFound as exc:
            return Reply.failure(ErrorCode.NOT_FOUND, str(exc), (f"exit_code={exc.exit_code}",))
        except DeidfsError as exc:
            return Reply.failure(ErrorCode.FAILED, str(exc), (f"exit_code={exc.exit_code}",))
        return Reply.success(summary.to_json())

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop watching and indexing, unmount, and close; every wait is bounded."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._ready = False
        self.notifier.stopping()
        # A reload in progress finishes first, so nothing is half applied while stopping.
        locked = self._reload_lock.acquire(timeout=30.0)
        try:
            if self.control is not None:
                self.control.stop()
            for folder in self._folders.values():
                if folder.watcher is not None:
                    folder.watcher.stop()
            self._queue.close()
            # Idle workers end at once; a render still running after a grace is abandoned
            # (the file is indexed at the next start), and every render process reaped.
            grace = time.monotonic() + STOP_RENDER_GRACE_SECONDS
            for t in self._workers:
                t.join(max(0.0, grace - time.monotonic()))
            for renderer in self._renderers:
                renderer.shutdown()
            deadline = time.monotonic() + JOIN_SECONDS
            for t in self._workers:
                t.join(max(0.0, deadline - time.monotonic()))
            self.tree.invalidator = None
            if self.mount is not None:
                self.mount.unmount(JOIN_SECONDS)
            self.ops.end_c_reads()  # nothing of this mount stays in the C table
            self.fs.close_all()
            if self.index is not None:
                self.index.close()
            if self.http is not None:
                self.http.stop()
            self.metrics.set_state_source(None)
            self.metrics.set_before_scrape(None)
        finally:
            if locked:
                self._reload_lock.release()
        log.info("stopped")

    # -- the foreground process ----------------------------------------------------------

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (thread-safe)."""
        self._stop.set()

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT (or the mount goes away).

        Returns the process exit code: 0 after a signal, 1 if the mount was lost.
        """

        def on_stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self._stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reload("signal")

        quiet_third_party_logs(self.library_warnings)
        counter = _LogCounter(self.metrics)
        logging.getLogger().addHandler(counter)
        # Installed before mounting: libfuse then keeps its own handlers off (it only
        # replaces SIG_DFL), and the shutdown sequence stays ours.
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        try:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
            self.notifier.ready(self.status_line())
            code = self._supervise()
            self.stop()
            return code
        finally:
            logging.getLogger().removeHandler(counter)
            self.library_warnings.uninstall()

    def alive(self) -> bool:
        """Every part runs: FUSE loop, indexing threads, watcher threads, control, HTTP.

        A watcher whose root is unreachable is alive (it retries and reports it); only a
        dead thread counts, since a restart would not bring a share back.
        """
        parts_alive = (
            self.mount is not None
            and self.mount.alive
            and all(t.is_alive() for t in self._workers)
            and all(f.watcher is None or f.watcher.alive for f in self._folders.values())
            and (self.control is None or self.control.alive)
            and (self.http is None or self.http.alive)
        )
        return bool(parts_alive)

    def _healthy_for_watchdog(self, timeout: float) -> bool:
        """:meth:`alive`, and the mount answers a request (the FUSE loop is not stuck)."""
        return self.alive() and self.mount is not None and self.mount.responsive(timeout)

    def _supervise(self) -> int:
        ping = self.notifier.watchdog_seconds
        ping_every = ping / 2 if ping else None
        tick = min(CONFIG_POLL_SECONDS, ping_every / 2) if ping_every else CONFIG_POLL_SECONDS
        last_ping = last_status = last_poll = self._clock()
        while not self._stop.wait(tick):
            now = self._clock()
            if self.mount is not None and not self.mount.alive:
                log.error("the mount went away (unmounted from outside?); exiting")
                return 1
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                trigger = self._reload_trigger
                log.info("reload requested (%s)", "SIGHUP" if trigger == "signal" else trigger)
                self.reload(trigger)
            elif self._config_poll is not None and now - last_poll >= CONFIG_POLL_SECONDS:
                last_poll = now
                if self._config_poll.due():
                    log.info("configuration file changed; reloading")
                    self.reload("file")
            if ping_every is not None and now - last_ping >= ping_every:
                # Only a daemon whose parts all run pings; otherwise systemd restarts it.
                if self._healthy_for_watchdog(min(5.0, ping_every)):
                    last_ping = now
                    self.notifier.watchdog()
                else:
                    log.error("a part of the daemon is not alive; watchdog pings withheld")
            if now - last_status >= STATUS_SECONDS:
                last_status = now
                self.notifier.status(self.status_line())
        return 0


def _index_workers(workers: int) -> int:
    """Indexing threads (and render processes) for ``[daemon] workers``."""
    return max(MIN_INDEX_WORKERS, workers)


def _relative(path: str, prefix: str, root: Path) -> PurePosixPath:
    """``path`` relative to the folder ``root``; ``path`` starts with ``prefix`` (root + /)."""
    rel = path[len(prefix) :]
    # Watcher paths are normalized: slicing is enough (PurePosixPath drops "//" and "/./");
    # only "..", which it keeps, needs os.path.relpath.
    if ".." not in rel:
        return PurePosixPath(rel)
    return PurePosixPath(os.path.relpath(path, root))


def _real_directory(path: str) -> str:
    """``os.path.realpath`` of a directory, asked of the kernel where it can answer.

    The directory is opened ``O_PATH`` (symlinks followed, as realpath does) and the link
    /proc shows for the descriptor is read: three system calls, where realpath makes one
    ``lstat`` per path component. Falls back to realpath when the directory cannot be
    opened (gone, not a directory) or /proc does not answer.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        return os.path.realpath(path)
    return real


def run_service(config: Config, notifier: Notifier | None = None) -> int:
    """Run the daemon for ``config`` in the foreground (main thread); returns the exit code.

    Raises
    ------
    DeidfsError
        Start-up failed (key, profiles, metrics address, control socket, mount); nothing
        is left mounted.
    """
    service = Service(config, notifier=notifier if notifier is not None else Notifier())
    return service.run()
