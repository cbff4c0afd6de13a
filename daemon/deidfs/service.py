"""The daemon: folders watched, indexed and served as one read-only de-identified mount.

Threads:

- the main thread (in :meth:`Service.run`) handles signals and supervises;
- ``fuse-loop`` runs the mfusepy loop, which has its own worker threads;
- each folder's :class:`~deidfs.watcher.FolderWatcher` reports settled and deleted files to
  :meth:`Service._sink`, which only queues them;
- ``deidfs-index-N`` threads (``[daemon] workers``) render queued sources header-only,
  store the result in the index and update the mount's tree atomically;
- ``deidfs-verify`` checks, once at start, that the sources loaded from the index still
  exist (files deleted while the daemon was down are never reported by a watcher).

The mount is up at once with whatever the index already knows; the initial scans fill it
in the background. Nothing here opens an original for writing, and nothing logs a source
path: logs carry the folder id and a short keyed token of the path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import stat
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from types import FrameType

from deidfs.config import Config, FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError, Refused
from deidfs.fusefs import (
    DeidOperations,
    FolderView,
    FuseMount,
    ViewFile,
    ViewFS,
    ViewTree,
    clear_stale_mount,
    pseudo_mtime_ns,
)
from deidfs.index import Entry, Index, Status
from deidfs.render import SourceStat, View, render_path
from deidfs.sdnotify import Notifier
from deidfs.secret import load_or_create_key
from deidfs.watcher import Change, FileEvent, FolderWatcher

log = logging.getLogger(__name__)

#: Bumped when the bytes a view holds change for the same source, plan, layout and key
#: (render.py changes); part of every view digest, so old index rows are re-rendered.
RENDER_VERSION = "1"
#: Bound of each join at shutdown.
JOIN_SECONDS = 5.0
_Key = tuple[str, str]


class _Kind(Enum):
    """What a queued source needs."""

    READY = "ready"  #: the watcher says it settled: index it
    GONE = "gone"  #: the watcher says it went away: forget it
    HINT = "hint"  #: an open found it changed: index it once it is no longer being written


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """One folder's numbers, for ``deidfs status``, the control socket and metrics."""

    id: str
    profile: str
    layout: str
    visible: int
    duplicates: int
    refused: tuple[tuple[str, int], ...]  #: (reason, count), sorted by reason
    bytes: int
    watch: str  #: "inotify" or "poll"
    watch_healthy: bool
    settling: int  #: files seen by the watcher, not yet settled

    @property
    def refused_total(self) -> int:
        """Withheld sources, all reasons."""
        return sum(n for _, n in self.refused)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A snapshot of the running daemon. Carries no path other than the mountpoint."""

    mountpoint: str
    mounted: bool
    libfuse: str
    folders: tuple[FolderStatus, ...]
    backlog: int  #: sources queued for indexing or being indexed
    rendered: int  #: sources parsed since start
    reused: int  #: sources taken from the index without parsing
    open_files: int
    cache_bytes: int
    cache_entries: int
    stale_opens: int  #: opens or reads refused because the source had changed
    uptime_seconds: float


@dataclass
class _Folder:
    """Per-folder state; replaced as a whole when the folder's configuration changes."""

    config: FolderConfig
    view: FolderView
    prefix: str  #: root + "/", for cheap containment checks
    watcher: FolderWatcher | None = None
    #: Withheld sources: path -> (state, digest, reason).
    refused: dict[str, tuple[SourceStat, str, str]] = field(default_factory=dict)


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


def view_digest(plan_digest: str, layout: str, pseudonymizer: Pseudonymizer) -> str:
    """Digest of everything a folder's views depend on besides the source itself.

    The key enters as a keyed token, so the digest (stored in the index) reveals nothing.
    """
    key_id = pseudonymizer.token("view-digest", "key")
    blob = f"{RENDER_VERSION}\0{plan_digest}\0{layout}\0{key_id}"
    return hashlib.sha256(blob.encode()).hexdigest()


def quiet_third_party_logs() -> None:
    """Keep PHI that libraries log out of the daemon's logs.

    pydicom logs (and warns) with element values: names, IDs, UIDs; watchdog logs raw source
    paths, which can carry patient names. deidfs' own modules report what matters instead.
    """
    for name in ("pydicom", "watchdog"):
        lib_log = logging.getLogger(name)
        lib_log.setLevel(logging.CRITICAL + 1)
        lib_log.propagate = False
    # Warnings go to stderr (the journal) with the offending value in them.
    warnings.simplefilter("ignore")
    # mfusepy (logger "fuse") logs every failed operation with its arguments at debug level.
    logging.getLogger("fuse").setLevel(logging.WARNING)


class Service:
    """The running daemon for one configuration.

    Parameters
    ----------
    config
        The validated configuration.
    notifier
        systemd notifications (a no-op outside systemd).
    clock
        Monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier({})
        self._clock = clock
        self._started_at = clock()
        d = config.daemon
        self.mountpoint = Path(os.path.abspath(d.mountpoint))
        self.state_dir = Path(os.path.abspath(d.state_dir))
        self.tree = ViewTree()
        self.fs = ViewFS(self.tree, d.cache_mib * 1024 * 1024, on_stale=self._on_stale)
        self.ops = DeidOperations(self.fs)
        self.mount: FuseMount | None = None
        self.index: Index | None = None
        self._pseudo: Pseudonymizer | None = None
        self._folders: dict[str, _Folder] = {}
        self._queue = _WorkQueue()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = False
        self._reload_requested = threading.Event()
        self._counter_lock = threading.Lock()
        self._hinted: dict[_Key, float] = {}
        self.rendered = 0
        self.reused = 0

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up and return; the initial scans continue in the background.

        Raises
        ------
        DeidfsError
            The key, a folder's profile or the mount cannot be set up.
        """
        key = load_or_create_key(self.state_dir)
        self._pseudo = Pseudonymizer(key)
        for fc in self.config.folders.values():
            self._folders[fc.id] = self._make_folder(fc)
        self.index = Index(self.state_dir)
        self._load_index()
        clear_stale_mount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.mount = FuseMount(
            self.ops, self.mountpoint, allow_other=self.config.daemon.allow_other
        )
        self.mount.start()
        self.tree.invalidator = self.ops.invalidate
        for n in range(max(1, self.config.daemon.workers)):
            t = threading.Thread(target=self._work, name=f"deidfs-index-{n}", daemon=True)
            t.start()
            self._workers.append(t)
        threading.Thread(target=self._verify, name="deidfs-verify", daemon=True).start()
        for folder in self._folders.values():
            self._start_watcher(folder)
        log.info(
            "serving %d folder(s) at the mountpoint; %d file(s) from the index",
            len(self._folders),
            self.reused,
        )

    def _make_folder(self, fc: FolderConfig) -> _Folder:
        assert self._pseudo is not None
        profile = self.config.profiles.get(fc.profile)
        if profile is None:
            raise ConfigError(f"folder {fc.id!r}: no profile named {fc.profile!r}")
        if not profile.enabled:
            raise ConfigError(f"folder {fc.id!r}: profile {fc.profile!r} is disabled")
        plan = compile_plan(profile)
        root = Path(os.path.abspath(fc.path))
        view = FolderView(
            id=fc.id,
            root=root,
            plan=plan,
            pseudonymizer=self._pseudo,
            layout=fc.layout,
            digest=view_digest(plan.digest, fc.layout.value, self._pseudo),
        )
        self.tree.set_folder(view)
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
            for entry in self.index.entries(folder.config.id):
                if not entry.path.startswith(folder.prefix):
                    self.index.remove(entry.folder, entry.path)  # the folder moved
                elif entry.digest == folder.view.digest:
                    self._apply(folder, entry)
                    self.reused += 1

    def _apply(self, folder: _Folder, entry: Entry) -> None:
        """Make the tree (and the refusal table) reflect one index entry."""
        if entry.status is Status.OK:
            folder.refused.pop(entry.path, None)
            self.tree.put(self._view_file(folder, entry))
        else:
            self.tree.remove(folder.config.id, entry.path)
            folder.refused[entry.path] = (entry.source, entry.digest, entry.reason)

    def _view_file(self, folder: _Folder, entry: Entry) -> ViewFile:
        assert self._pseudo is not None
        return ViewFile(
            folder=entry.folder,
            source=entry.path,
            state=entry.source,
            digest=entry.digest,
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

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get(timeout=0.5)
            if item is None:
                continue
            key, kind = item
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event: folder=%s file=%s %s", key[0], self._token(key[1]), kind.value)
            try:
                folder = self._folders.get(key[0])
                if folder is not None:
                    if kind is _Kind.GONE:
                        self._forget(folder, key[1])
                    else:
                        self._index_source(folder, key[1], hint=kind is _Kind.HINT)
            except Exception as exc:  # contain: one bad file must not stop indexing
                log.error(
                    "indexing failed: folder=%s file=%s error=%s",
                    key[0],
                    self._token(key[1]),
                    type(exc).__name__,
                )
            finally:
                self._queue.done(key)

    def _index_source(self, folder: _Folder, path: str, hint: bool = False) -> None:
        assert self.index is not None
        fid = folder.config.id
        digest = folder.view.digest
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(folder, path)
            return
        except OSError:
            self._withhold(folder, path, None, "unreadable")
            return
        state = SourceStat.of(st)
        if hint and time.time_ns() - st.st_mtime_ns < self.config.daemon.settle_seconds * 1e9:
            return  # still being written: the watcher reports it once it has settled
        served = self.tree.by_source(fid, path)
        if served is not None and served.state == state and served.digest == digest:
            return
        known = folder.refused.get(path)
        if known is not None and known[0] == state and known[1] == digest:
            return
        row = self.index.get(fid, path)
        if row is not None and row.source == state and row.digest == digest:
            self._apply(folder, row)
            self._count(reused=1)
            return
        reason = self._unsafe(folder, path, st)
        if reason:
            self._withhold(folder, path, state, reason)
            return
        rel = PurePosixPath(os.path.relpath(path, folder.view.root))
        view = folder.view
        try:
            rendered: View | None = render_path(
                path, view.plan, view.pseudonymizer, view.layout, rel
            )
            reason = ""
        except Refused as exc:
            rendered, reason = None, exc.reason
        self._count(rendered=1)
        if not self._still(path, state if rendered is None else rendered.source):
            # Written to while it was parsed (a copy in place): what was read may be a
            # mix. The watcher reports the file again once it has settled.
            log.debug("folder=%s file=%s changed while indexed", fid, self._token(path))
            return
        if rendered is None:
            log.debug("folder=%s file=%s refused at size %d", fid, self._token(path), state.size)
            self._withhold(folder, path, state, reason)
            return
        entry = self._entry(folder, path, rendered)
        self.index.put(entry)
        self._apply(folder, entry)
        key = (path, rendered.source, digest)
        # The header was just built: keep it so the first open of the view is cheap.
        self.fs.cache.put(key, rendered)

    @staticmethod
    def _still(path: str, state: SourceStat) -> bool:
        try:
            return SourceStat.of(os.lstat(path)) == state
        except OSError:
            return False

    def _unsafe(self, folder: _Folder, path: str, st: os.stat_result) -> str:
        """Why a path must not be served although it may be DICOM ("" if it may)."""
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if not path.startswith(folder.prefix):
            return "outside_folder"
        # A directory on the way replaced by a link would lead out of the folder.
        real_root = os.path.realpath(folder.view.root)
        real_dir = os.path.realpath(os.path.dirname(path))
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

    def status(self) -> ServiceStatus:
        """A consistent-enough snapshot for reporting (counts may move while it is taken)."""
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
                )
            )
        m = self.mount
        return ServiceStatus(
            mountpoint=str(self.mountpoint),
            mounted=m is not None and m.alive,
            libfuse=m.libfuse_version if m is not None else "",
            folders=tuple(folders),
            backlog=len(self._queue),
            rendered=self.rendered,
            reused=self.reused,
            open_files=self.fs.open_handles,
            cache_bytes=self.fs.cache.size_bytes,
            cache_entries=len(self.fs.cache),
            stale_opens=self.fs.stale,
            uptime_seconds=self._clock() - self._started_at,
        )

    def status_line(self) -> str:
        """One line for ``STATUS=`` (systemctl status)."""
        s = self.status()
        visible = sum(f.visible for f in s.folders)
        refused = sum(f.refused_total for f in s.folders)
        return (
            f"{len(s.folders)} folder(s), {visible} file(s) served, {refused} withheld, "
            f"{s.backlog} queued"
        )

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop watching and indexing, unmount, and close; every wait is bounded."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.notifier.stopping()
        for folder in self._folders.values():
            if folder.watcher is not None:
                folder.watcher.stop()
        self._queue.close()
        deadline = time.monotonic() + JOIN_SECONDS
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        self.tree.invalidator = None
        if self.mount is not None:
            self.mount.unmount(JOIN_SECONDS)
        self.fs.close_all()
        if self.index is not None:
            self.index.close()
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
            self._reload_requested.set()

        quiet_third_party_logs()
        # Installed before mounting: libfuse then keeps its own handlers off (it only
        # replaces SIG_DFL), and the shutdown sequence stays ours.
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        self.notifier.ready(self.status_line())
        code = self._supervise()
        self.stop()
        return code

    def _alive(self) -> bool:
        # Watcher health is left out on purpose: an unreachable share is reported, and a
        # restart would not bring it back.
        return (
            self.mount is not None and self.mount.alive and all(t.is_alive() for t in self._workers)
        )

    def _supervise(self) -> int:
        ping = self.notifier.watchdog_seconds
        ping_every = ping / 2 if ping else None
        last_ping = last_status = self._clock()
        while not self._stop.wait(0.5):
            now = self._clock()
            if self.mount is not None and not self.mount.alive:
                log.error("the mount went away (unmounted from outside?); exiting")
                return 1
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                log.warning("reload requested: not supported by this version; restart to apply")
            if ping_every is not None and now - last_ping >= ping_every and self._alive():
                # Only a daemon whose parts all run pings; otherwise systemd restarts it.
                last_ping = now
                self.notifier.watchdog()
            if now - last_status >= 5.0:
                last_status = now
                self.notifier.status(self.status_line())
        return 0


def run_service(config: Config, notifier: Notifier | None = None) -> int:
    """Run the daemon for ``config`` in the foreground (main thread); returns the exit code.

    Raises
    ------
    DeidfsError
        Start-up failed (key, profiles, mount); nothing is left mounted.
    """
    service = Service(config, notifier=notifier if notifier is not None else Notifier())
    return service.run()
