"""The daemon: folders watched, indexed and served as one read-only de-identified mount.

Threads:

- the main thread (in :meth:`Service.run`) handles signals and supervises: it polls the
  configuration file, runs reloads asked for by SIGHUP, sends systemd's watchdog pings
  (only while every part is alive) and ``STATUS=`` lines;
- ``fuse-loop`` runs the mfusepy loop, which has its own worker threads;
- each folder's :class:`~deidfs.watch.watcher.FolderWatcher` reports settled and deleted files to
  :meth:`~deidfs.service.folders.FolderSet.sink`, which only queues them;
- ``deidfs-index-N`` threads (``[daemon] workers``, at least two) index queued sources.
  Each owns a render process (:mod:`deidfs.view.pool`) that renders the source
  header-only while the thread waits on its pipe: rendering is Python, and in this process
  it would hold the GIL the FUSE callbacks need. The thread then stores the result in the
  index and updates the mount's tree (:mod:`deidfs.service.indexing`). Only that
  bookkeeping, before and after a render, is serialized (the folder set's ``index_lock``);
  no lock is held across a render, so a slow source holds up its own thread only,
  and one past ``[daemon] parse_timeout_seconds`` is abandoned
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

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from deidfs.config.model import Config
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.mount.lifecycle import FuseMount, clear_stale_mount
from deidfs.mount.ops import DeidOperations
from deidfs.ops.control import ControlServer
from deidfs.ops.http import MetricsServer
from deidfs.ops.logs import LibraryWarnings
from deidfs.ops.metrics import Metrics, StateSnapshot
from deidfs.ops.sdnotify import Notifier
from deidfs.secret import load_or_create_key
from deidfs.service.control_cmds import Commands
from deidfs.service.folders import FolderSet, _Folder
from deidfs.service.indexing import Indexer, _index_workers
from deidfs.service.reload import CONFIG_POLL_SECONDS, Reloader, _ConfigPoll
from deidfs.service.status import ReloadOutcome, ServiceStatus
from deidfs.view.handles import ViewFS
from deidfs.view.index import Index
from deidfs.view.tree import ViewTree

log = logging.getLogger(__name__)


#: Bound of each join at shutdown.
JOIN_SECONDS = 5.0
#: How often ``STATUS=`` is sent to systemd.
STATUS_SECONDS = 5.0
#: How long a stopping daemon lets renders in progress finish before it kills them.
STOP_RENDER_GRACE_SECONDS = 1.0


class _LogCounter(logging.Handler):
    """Counts log records by level for ``deidfs_log_messages_total``."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.DEBUG)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self._metrics.log_record(record.levelname.lower())


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

    It starts, supervises and stops the parts, each with one job: the folder set
    (:class:`~deidfs.service.folders.FolderSet`), its indexing threads
    (:class:`~deidfs.service.indexing.Indexer`), reloads
    (:class:`~deidfs.service.reload.Reloader`) and status and control commands
    (:class:`~deidfs.service.control_cmds.Commands`); its public methods delegate to them.

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
        self.notifier = notifier if notifier is not None else Notifier({})
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._started_at = clock()
        d = config.daemon
        self.mountpoint = Path(os.path.abspath(d.mountpoint))
        self.state_dir = Path(os.path.abspath(d.state_dir))
        self.tree = ViewTree()
        self._stop = threading.Event()
        #: The folders, the index and what indexing shares (the running configuration too).
        self.folders = FolderSet(config, self.tree, self.metrics, clock, self._stop)
        self.fs = ViewFS(
            self.tree,
            d.cache_mib * 1024 * 1024,
            on_stale=self.folders.on_stale,
            metrics=self.metrics,
        )
        self.ops = DeidOperations(self.fs, metrics=self.metrics)
        self.mount: FuseMount | None = None
        self.http: MetricsServer | None = None
        self.control: ControlServer | None = None
        self._stopped = False
        self._ready = False
        #: pydicom's warnings, counted by category while :meth:`run` runs
        self.library_warnings = LibraryWarnings()
        self.indexer = Indexer(self.folders, self.fs, self.library_warnings)
        self.reloads = Reloader(
            self.folders,
            self.indexer,
            self.fs,
            self.notifier,
            running=lambda: self._ready,
            status_line=self.status_line,
        )
        self.commands = Commands(
            self.folders,
            self.indexer,
            self.reloads,
            self.ops,
            self.fs,
            self.mountpoint,
            self._started_at,
            self.library_warnings,
            ready=self.ready,
            mount=lambda: self.mount,
        )

    @property
    def config(self) -> Config:
        """The running configuration (a reload replaces it)."""
        return self.folders.config

    @property
    def index(self) -> Index | None:
        """The index of views and withheld sources (open once started)."""
        return self.folders.index

    @property
    def rendered(self) -> int:
        """Sources rendered since the start."""
        return self.folders.rendered

    @property
    def reused(self) -> int:
        """Sources taken from the index without a render since the start."""
        return self.folders.reused

    @property
    def last_reload(self) -> ReloadOutcome | None:
        """The outcome of the last reload (or of the start)."""
        return self.reloads.last_reload

    @property
    def _folders(self) -> dict[str, _Folder]:
        return self.folders.by_id

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
        self.folders.pseudo = Pseudonymizer(key)
        folders: dict[str, _Folder] = {}
        plans: dict[str, Plan] = {}
        for fc in self.config.folders.values():
            folders[fc.id] = self.folders.new_folder(fc, self.config, plans)
        for folder in folders.values():
            self.tree.set_folder(folder.view)
            self.metrics.folder_added(folder.config.id)
        self.folders.by_id = folders
        self.folders.index = Index(self.state_dir)
        self.folders.load_index()
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
        self.indexer.start_workers(_index_workers(d.workers))
        threading.Thread(target=self.folders.verify, name="deidfs-verify", daemon=True).start()
        self.control = ControlServer(
            Path(os.path.abspath(d.control_socket)),
            self.commands.handlers(),
            on_request=self.metrics.control_request,
        )
        self.control.start()
        for folder in self.folders.by_id.values():
            self.folders.start_watcher(folder)
        now = time.time()
        self.reloads.last_reload = ReloadOutcome(True, "start", now, self.config.sha256)
        self.metrics.config_loaded(True, now, reload=False)
        if self.config.source is not None:
            self.reloads.config_poll = _ConfigPoll(self.config.source, self.config.sha256)
        self._ready = True
        log.info(
            "serving %d folder(s) at the mountpoint; %d file(s) from the index",
            len(self.folders.by_id),
            self.folders.reused,
        )

    # -- status --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Mounted, observers started and not stopping (``/-/ready``)."""
        m = self.mount
        return self._ready and not self._stop.is_set() and m is not None and m.alive

    def status(self) -> ServiceStatus:
        """A consistent-enough snapshot for reporting (counts may move while it is taken)."""
        return self.commands.status()

    def metrics_state(self) -> StateSnapshot:
        """The state part of the metrics (read at each scrape, on the HTTP thread)."""
        return self.commands.metrics_state()

    def status_line(self) -> str:
        """One line for ``STATUS=`` (systemctl status)."""
        return self.commands.status_line()

    # -- reload --------------------------------------------------------------------------

    def request_reload(self, trigger: str = "signal") -> None:
        """Ask the supervising loop to reload (thread- and signal-safe); returns at once."""
        self.reloads.request_reload(trigger)

    def reload(self, trigger: str = "control", config: Config | None = None) -> ReloadOutcome:
        """Read the configuration again and apply what changed; keep it all on any error
        (see :meth:`~deidfs.service.reload.Reloader.reload`)."""
        return self.reloads.reload(trigger, config)

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
        locked = self.reloads.lock.acquire(timeout=30.0)
        try:
            if self.control is not None:
                self.control.stop()
            for folder in self.folders.by_id.values():
                if folder.watcher is not None:
                    folder.watcher.stop()
            self.folders.queue.close()
            # Idle workers end at once; a render still running after a grace is abandoned
            # (the file is indexed at the next start), and every render process reaped.
            grace = time.monotonic() + STOP_RENDER_GRACE_SECONDS
            for t in self.indexer.workers:
                t.join(max(0.0, grace - time.monotonic()))
            for renderer in self.indexer.renderers:
                renderer.shutdown()
            deadline = time.monotonic() + JOIN_SECONDS
            for t in self.indexer.workers:
                t.join(max(0.0, deadline - time.monotonic()))
            self.tree.invalidator = None
            if self.mount is not None:
                self.mount.unmount(JOIN_SECONDS)
            self.ops.end_c_reads()  # nothing of this mount stays in the C table
            self.fs.close_all()
            if self.folders.index is not None:
                self.folders.index.close()
            if self.http is not None:
                self.http.stop()
            self.metrics.set_state_source(None)
            self.metrics.set_before_scrape(None)
        finally:
            if locked:
                self.reloads.lock.release()
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
            and all(t.is_alive() for t in self.indexer.workers)
            and all(f.watcher is None or f.watcher.alive for f in self.folders.by_id.values())
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
            if self.reloads.requested.is_set():
                self.reloads.requested.clear()
                trigger = self.reloads.trigger
                log.info("reload requested (%s)", "SIGHUP" if trigger == "signal" else trigger)
                self.reload(trigger)
            elif self.reloads.config_poll is not None and now - last_poll >= CONFIG_POLL_SECONDS:
                last_poll = now
                if self.reloads.config_poll.due():
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
