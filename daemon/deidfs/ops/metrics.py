"""Prometheus metrics of one daemon instance, in a registry of its own.

Every :class:`Metrics` object owns a :class:`~prometheus_client.CollectorRegistry` (never
the library's global one), so two services in one process, or two tests, never share a
series. Names follow the Prometheus conventions: prefix ``deidfs_``, base units (seconds,
bytes), ``_total`` on counters. Label values are bounded identifiers only: folder ids and
profile names from the validated configuration, refusal reasons, FUSE operation names,
errno names and other enums of the code. Never a path, a UID, a user id or a DICOM value.

Two kinds of metrics:

- *events*, counted where they happen through the methods below (thread-safe; each costs a
  lock and an addition);
- *state* (files visible, backlog, watcher health, cache counters ...), read at scrape time
  from a :class:`StateSnapshot` that the service builds on demand (see
  :meth:`Metrics.set_state_source`), so a folder that leaves the configuration leaves the
  output with it.

Methods for the export code (called once per file written or failed; ``folder`` is the
folder id, ``outcome`` one of ``written``, ``replaced``, ``unchanged``, ``reason`` a short
bounded identifier such as a :class:`~deidfs.errors.Refused` reason or ``io_error``):

- :meth:`Metrics.export_file` ``(folder, outcome, size_bytes)``
- :meth:`Metrics.export_failure` ``(folder, reason)``
- :meth:`Metrics.export_finished` ``(folder, seconds, ok, when=None)``, once per export
  request (``when``: Unix time it ended, now by default).
"""

from __future__ import annotations

import errno as errno_module
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from deidfs import __version__

#: Seconds to de-identify one source header-only (parse + plan + encode), up to pixel work.
RENDER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds of one export request (many files).
EXPORT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)

#: FUSE operations counted under their own name; every operation that would modify the
#: mount (and fails with EROFS) is counted as ``modify``.
FUSE_OPS = ("getattr", "readdir", "open", "read", "release", "statfs", "access", "modify")
CONFIG_RESULTS = ("success", "failure")
WATCH_CHANGES = ("ready", "gone")
EXPORT_OUTCOMES = ("written", "replaced", "unchanged")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class FolderState:
    """One folder's numbers at scrape time."""

    folder: str
    profile: str
    layout: str
    visible: int
    duplicates: int
    view_bytes: int
    withheld: tuple[tuple[str, int], ...]  #: (reason, count)
    watch_polling: bool
    watch_healthy: bool
    settling: int
    directories: int
    missed: int  #: files reconciliation found that the observer never reported
    events: tuple[tuple[str, int], ...]  #: (watchdog event type, count) since it started
    overflows: int = 0  #: inotify queue overflows (events lost) since the watcher started


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """The daemon's state at scrape time; built by the service, O(folders) to produce."""

    mounted: bool
    backlog: int
    open_files: int
    stale_opens: int
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    cache_entries: int
    folders: tuple[FolderState, ...]
    pydicom_warnings: tuple[tuple[str, int], ...] = ()  #: (category, count)
    refused_opens: int = 0  #: opens refused for want of a file descriptor


def errno_name(err: int | None) -> str:
    """A bounded label value for an errno (``ENOENT``; ``EUNKNOWN`` if unknown)."""
    return errno_module.errorcode.get(err or 0, "EUNKNOWN")


class _BeforeScrape(Collector):
    """Yields nothing: runs a hook at each scrape before any metric is read."""

    def __init__(self) -> None:
        self.hook: Callable[[], None] | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        hook = self.hook
        if hook is not None:
            hook()
        return []


class _StateCollector(Collector):
    """Turns a :class:`StateSnapshot` into metric families at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], StateSnapshot] | None = None

    def describe(self) -> Iterable[Metric]:
        # Not described up front: the registry then does not call collect() at register time.
        return []

    def collect(self) -> Iterable[Metric]:
        source = self.source
        if source is None:
            return []
        return list(self._families(source()))

    @staticmethod
    def _families(s: StateSnapshot) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("deidfs_fuse_mounted", "1 while the FUSE mount is up.", float(s.mounted))
        yield gauge(
            "deidfs_index_backlog", "Sources queued for indexing or being indexed.", s.backlog
        )
        yield gauge("deidfs_fuse_open_files", "Open file handles on the mount.", s.open_files)
        yield counter(
            "deidfs_fuse_stale_opens",
            "Opens and reads refused because the source changed since it was indexed.",
            s.stale_opens,
        )
        yield counter(
            "deidfs_fuse_refused_opens",
            "Opens refused because the daemon had no file descriptor to spare.",
            s.refused_opens,
        )
        yield counter("deidfs_header_cache_hits", "Header cache lookups that hit.", s.cache_hits)
        yield counter(
            "deidfs_header_cache_misses", "Header cache lookups that missed.", s.cache_misses
        )
        yield gauge("deidfs_header_cache_bytes", "Bytes held by the header cache.", s.cache_bytes)
        yield gauge(
            "deidfs_header_cache_entries", "Views held by the header cache.", s.cache_entries
        )

        warned = CounterMetricFamily(
            "deidfs_pydicom_warnings",
            "Warnings pydicom reported while reading sources, by reason (category of message).",
            labels=("reason",),
        )
        for category, n in s.pydicom_warnings:
            warned.add_metric((category,), n)
        yield warned

        info = GaugeMetricFamily(
            "deidfs_folder_info",
            "Configured folders and their profile and layout (always 1).",
            labels=("folder", "profile", "layout"),
        )
        visible = GaugeMetricFamily(
            "deidfs_files_visible", "Files served in the mount.", labels=("folder",)
        )
        dupes = GaugeMetricFamily(
            "deidfs_files_duplicate",
            "Sources not shown because another source has the same view path.",
            labels=("folder",),
        )
        withheld = GaugeMetricFamily(
            "deidfs_files_withheld",
            "Sources withheld (not shown), by reason.",
            labels=("folder", "reason"),
        )
        view_bytes = GaugeMetricFamily(
            "deidfs_view_bytes", "Total size of the files served.", labels=("folder",)
        )
        healthy = GaugeMetricFamily(
            "deidfs_folder_watch_healthy",
            "1 while the folder's observer and threads run and its root is reachable.",
            labels=("folder",),
        )
        polling = GaugeMetricFamily(
            "deidfs_folder_watch_polling",
            "1 when the folder is watched by polling (network file system or inotify limit).",
            labels=("folder",),
        )
        settling = GaugeMetricFamily(
            "deidfs_folder_settling_files",
            "Files seen by the watcher that have not settled yet.",
            labels=("folder",),
        )
        dirs = GaugeMetricFamily(
            "deidfs_watched_directories",
            "Directories below the folder root found by the last full scan.",
            labels=("folder",),
        )
        missed = CounterMetricFamily(
            "deidfs_reconcile_missed_files",
            "Files a reconciliation scan found new or changed that no event had reported.",
            labels=("folder",),
        )
        overflows = CounterMetricFamily(
            "deidfs_watch_overflows",
            "inotify queue overflows (file events lost; the folder was rescanned at once).",
            labels=("folder",),
        )
        events = CounterMetricFamily(
            "deidfs_watch_events",
            "File system events received by the folder's observer, by type.",
            labels=("folder", "event"),
        )
        for f in s.folders:
            fid = f.folder
            info.add_metric((fid, f.profile, f.layout), 1)
            visible.add_metric((fid,), f.visible)
            dupes.add_metric((fid,), f.duplicates)
            view_bytes.add_metric((fid,), f.view_bytes)
            for reason, n in f.withheld:
                withheld.add_metric((fid, reason), n)
            healthy.add_metric((fid,), float(f.watch_healthy))
            polling.add_metric((fid,), float(f.watch_polling))
            settling.add_metric((fid,), f.settling)
            dirs.add_metric((fid,), f.directories)
            missed.add_metric((fid,), f.missed)
            overflows.add_metric((fid,), f.overflows)
            for event, n in f.events:
                events.add_metric((fid, event), n)
        yield from (info, visible, dupes, withheld, view_bytes, healthy, polling, settling)
        yield from (dirs, missed, overflows, events)


class Metrics:
    """Every metric of one daemon, registered in :attr:`registry`.

    Parameters
    ----------
    version
        Reported by ``deidfs_build_info``.
    process_collectors
        Also register the ``process_*``, ``python_info`` and ``python_gc_*`` collectors
        (the default registry has them; an own registry must add them itself).
    """

    def __init__(self, version: str = __version__, *, process_collectors: bool = True) -> None:
        # The *_created series double the series count and carry nothing Prometheus needs.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # First in the registry, so counters it brings up to date are read after it.
        self._before = _BeforeScrape()
        r.register(self._before)
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._lock = threading.Lock()
        self._folders: set[str] = set()

        Info("deidfs_build", "Version of the running deidfs.", registry=r).info(
            {"version": version}
        )
        self.config_reload_successful = Gauge(
            "deidfs_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, 0 if it was rejected.",
            registry=r,
        )
        self.config_reload_timestamp = Gauge(
            "deidfs_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration load or reload.",
            registry=r,
        )
        self.config_reloads = Counter(
            "deidfs_config_reloads",
            "Configuration reloads, by result.",
            ("result",),
            registry=r,
        )
        self.renders = Counter(
            "deidfs_renders",
            "Sources de-identified (header rendered), successful or not.",
            ("folder",),
            registry=r,
        )
        self.render_seconds = Histogram(
            "deidfs_render_duration_seconds",
            "Time to de-identify one source (parse, apply the profile, encode the header).",
            ("folder",),
            buckets=RENDER_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "deidfs_files_refused",
            "Sources found unsafe to serve (withheld), by reason; counted once per version.",
            ("folder", "reason"),
            registry=r,
        )
        self.watch_changes = Counter(
            "deidfs_watch_changes",
            "Settled (ready) and removed (gone) files reported by the folder watchers.",
            ("folder", "change"),
            registry=r,
        )
        self.fuse_ops = Counter(
            "deidfs_fuse_operations",
            "FUSE operations served, by operation.",
            ("op",),
            registry=r,
        )
        self.fuse_errors = Counter(
            "deidfs_fuse_operation_errors",
            "FUSE operations answered with an error, by operation and errno.",
            ("op", "errno"),
            registry=r,
        )
        self.fuse_read_bytes = Counter(
            "deidfs_fuse_read_bytes", "Bytes returned by FUSE reads.", registry=r
        )
        self.export_files = Counter(
            "deidfs_export_files",
            "Files handled by exports, by outcome.",
            ("folder", "outcome"),
            registry=r,
        )
        self.export_bytes = Counter(
            "deidfs_export_written_bytes",
            "Bytes written by exports (unchanged files excluded).",
            ("folder",),
            registry=r,
        )
        self.export_failures = Counter(
            "deidfs_export_failures",
            "Files an export could not write, by reason.",
            ("folder", "reason"),
            registry=r,
        )
        self.export_sent = Counter(
            "deidfs_export_sent",
            "Files sent to destinations (DICOM nodes), by result: stored, warning, failed.",
            ("destination", "result"),
            registry=r,
        )
        self.export_seconds = Histogram(
            "deidfs_export_duration_seconds",
            "Duration of export requests.",
            buckets=EXPORT_BUCKETS,
            registry=r,
        )
        self.export_last_success = Gauge(
            "deidfs_last_export_success_timestamp_seconds",
            "Time the last export request finished without failures.",
            registry=r,
        )
        self.control_requests = Counter(
            "deidfs_control_requests",
            "Requests on the control socket, by command and result.",
            ("command", "result"),
            registry=r,
        )
        self.log_messages = Counter(
            "deidfs_log_messages",
            "Log records written, by level.",
            ("level",),
            registry=r,
        )
        for result in CONFIG_RESULTS:
            self.config_reloads.labels(result)
        for level in LOG_LEVELS:
            self.log_messages.labels(level)
        # Children bound once: FUSE operations are the hot path.
        self._op_children = {op: self.fuse_ops.labels(op) for op in FUSE_OPS}
        self._state = _StateCollector()
        r.register(self._state)

    # -- state read at scrape time ---------------------------------------------------------

    def set_state_source(self, source: Callable[[], StateSnapshot] | None) -> None:
        """Read the daemon's state from ``source()`` at each scrape (None: stop reporting it).

        ``source`` runs on the HTTP server's thread; it must be cheap and must not block.
        """
        self._state.source = source

    def set_before_scrape(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook()`` at each scrape before any metric is read (to bring counters kept
        elsewhere up to date); on the HTTP server's thread, so it must be cheap."""
        self._before.hook = hook

    # -- configuration ---------------------------------------------------------------------

    def config_loaded(self, ok: bool, when: float, *, reload: bool = True) -> None:
        """Record the outcome of a configuration (re)load that finished at Unix time ``when``.

        The start-up load sets the gauges without counting a reload.
        """
        self.config_reload_successful.set(1 if ok else 0)
        if ok:
            self.config_reload_timestamp.set(when)
        if reload:
            self.config_reloads.labels("success" if ok else "failure").inc()

    # -- folders, indexing and watching ----------------------------------------------------

    def folder_added(self, folder: str) -> None:
        """Create a folder's series at 0, so rates and alerts work before the first event."""
        with self._lock:
            self._folders.add(folder)
        self.renders.labels(folder)
        for change in WATCH_CHANGES:
            self.watch_changes.labels(folder, change)

    def forget_folder(self, folder: str) -> None:
        """Drop every series of a folder that left the configuration."""
        with self._lock:
            self._folders.discard(folder)
        for metric in (
            self.renders,
            self.render_seconds,
            self.refusals,
            self.watch_changes,
            self.export_files,
            self.export_bytes,
            self.export_failures,
        ):
            metric.remove_by_labels({"folder": folder})

    def observe_render(self, folder: str, seconds: float) -> None:
        """One source de-identified (or refused while parsing) in ``seconds``."""
        self.renders.labels(folder).inc()
        self.render_seconds.labels(folder).observe(seconds)

    def file_refused(self, folder: str, reason: str) -> None:
        """A source is withheld for ``reason`` (a :class:`~deidfs.errors.Refused` reason)."""
        self.refusals.labels(folder, reason).inc()

    def watch_change(self, folder: str, change: str) -> None:
        """A folder watcher reported a file ``ready`` or ``gone``."""
        self.watch_changes.labels(folder, change).inc()

    # -- FUSE ------------------------------------------------------------------------------

    def fuse_op(self, op: str, n: int = 1) -> None:
        """``n`` FUSE operations (``op`` from :data:`FUSE_OPS`)."""
        if n <= 0:
            return
        child = self._op_children.get(op)
        (child if child is not None else self.fuse_ops.labels(op)).inc(n)

    def fuse_error(self, op: str, err: int | None) -> None:
        """A FUSE operation answered with errno ``err``."""
        self.fuse_errors.labels(op, errno_name(err)).inc()

    def fuse_read(self, size: int) -> None:
        """FUSE reads returned ``size`` bytes."""
        if size > 0:
            self.fuse_read_bytes.inc(size)

    # -- export ----------------------------------------------------------------------------

    def export_file(self, folder: str, outcome: str, size_bytes: int) -> None:
        """An export handled one file: ``written``, ``replaced`` or ``unchanged``."""
        self.export_files.labels(folder, outcome).inc()
        if outcome != "unchanged":
            self.export_bytes.labels(folder).inc(size_bytes)

    def export_failure(self, folder: str, reason: str) -> None:
        """An export could not write one file (``reason``: bounded, e.g. ``source_changed``)."""
        self.export_failures.labels(folder, reason).inc()

    def file_sent(self, destination: str, result: str) -> None:
        """An export to ``destination`` (a configured name) ended one file with ``result``."""
        self.export_sent.labels(destination, result).inc()

    def export_finished(
        self, folder: str, seconds: float, ok: bool, when: float | None = None
    ) -> None:
        """An export request ended after ``seconds``; ``ok`` when no file failed."""
        del folder  # the duration histogram is not split by folder (cardinality)
        self.export_seconds.observe(seconds)
        if ok:
            self.export_last_success.set(time.time() if when is None else when)

    # -- control socket and logs -----------------------------------------------------------

    def control_request(self, command: str, result: str) -> None:
        """A control socket request ended with ``result`` (``ok`` or an error code)."""
        self.control_requests.labels(command, result).inc()

    def log_record(self, level: str) -> None:
        """A log record of ``level`` (lower-case level name) was written."""
        self.log_messages.labels(level).inc()
