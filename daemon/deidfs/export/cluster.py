"""The one-shot de-identification of ``deidfs anonymize`` and ``deidfs export`` on a Dask
cluster (dask.distributed): ``--cluster local:N`` or a scheduler's address.

The client (the command) lists the sources as on one machine and cuts them into batches by
directory (:func:`partition`); each batch is one task, :func:`run_batch_task`, which renders
and writes its files with :func:`deidfs.export.workers.run_chunk` (or matches a selection with
:func:`deidfs.export.workers.scan_chunk`): the same pure core and the same atomic, idempotent
writer as on one machine. Each task returns its files' results; the client counts them,
settles sources that name one target (:class:`deidfs.export.claims.Claims`) and writes the
manifest, as it does for its own worker processes. :class:`ClusterRunner` is the
:class:`deidfs.export.workers.Runner` that does this. Keyed pseudonyms make every worker produce the
same bytes with no coordination: the output equals that of one process, file for file.

Nothing identifying names a task: keys are ``deidfs-batch-<run>-<n>`` (``<run>`` a random
token), so the scheduler, its dashboard and the logs see those names only. A worker logs a
failed task with its arguments' ``repr``: every argument here shows counts only, never a
path or the key. Each task carries the run's :class:`Work` (some 35 kB, mostly the plan):
a worker holding it as data would draw every task to itself.

The pseudonym key (:mod:`deidfs.export.cluster_config`):

- :class:`~deidfs.export.cluster_config.KeyFile`: with a key file named on storage every
  worker shares, each worker reads the key itself; only the file's path and a fingerprint
  of the key travel (a worker whose file holds another key refuses the task:
  :class:`WorkerRefused`).
- :class:`~deidfs.export.cluster_config.KeyInTask`: otherwise the key travels inside the
  tasks. Allowed to a ``local:N`` cluster (loopback, this machine's processes) and over
  ``tls://``; a plain ``tcp://`` scheduler would carry it in clear, which
  :func:`~deidfs.export.cluster_config.key_source` refuses unless the admin says so.

Failures: a task whose worker dies is run again by Dask on another (the scheduler's own
rule, up to ``distributed.scheduler.allowed-failures`` deaths), and a task that raises is
tried :data:`TASK_RETRIES` more times. A batch whose results cannot be had while the
scheduler is there (their worker died before the client fetched them, the task was
dropped) is submitted again by the client, :data:`RESUBMITS` times at most. Writes are
atomic (no partial file under a final name) and idempotent, so a batch that runs again
finds the files its first run put in place "unchanged", and the client takes one result
per batch: each file counts once. Temporary
files of a killed run are removed from the directories the run wrote in
(:meth:`ClusterRunner.finished`). A lost scheduler stops the command (:class:`ClusterLost`,
exit 75): files in place are complete and the same command run again completes the rest.

The address, the options, the key's way to the workers and TLS are in
:mod:`deidfs.export.cluster_config`. dask.distributed is optional (``pip install
'deidfs[cluster]'``) and imported only through
:func:`deidfs.export.cluster_config.import_distributed`, only when a run uses a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from deidfs import __version__
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError
from deidfs.export.cluster_config import (
    DEFAULT_BATCH_FILES,
    ClusterAddress,
    ClusterOptions,
    ClusterUnavailable,
    KeyFile,
    KeySource,
    import_distributed,
    security_of,
)
from deidfs.export.dirs import open_path_dirs
from deidfs.export.errors import ExportError
from deidfs.export.files import TEMP_PREFIX, TEMP_SUFFIX
from deidfs.export.workers import (
    FileResult,
    Item,
    Job,
    ScanJob,
    ScanResult,
    StopFlag,
    quiet_third_party,
    run_chunk,
    scan_chunk,
)
from deidfs.export.writer import ExportWriter, ViewLookup
from deidfs.secret import read_key_file

log = logging.getLogger(__name__)

#: Further tries of a task that raised (a worker that died is the scheduler's matter).
TASK_RETRIES = 2
#: Tasks in flight per worker thread: enough that no thread waits for the client, few
#: enough that the client never holds a whole archive's tasks at once.
IN_FLIGHT_PER_THREAD = 4
CONNECT_SECONDS = 30.0
#: How long a scheduler may have no worker before the command gives up.
WORKERS_SECONDS = 60.0
POLL_SECONDS = 0.05
#: Tasks submitted again for a batch whose results could not be had while the scheduler
#: was there (a worker died holding them, the task was dropped); then its files fail.
RESUBMITS = 3
#: How long fetching a done batch's results may take (some 300 bytes a file): longer, its
#: worker is gone with them, and the batch is submitted again.
FETCH_SECONDS = 5.0
#: How often the client asks how many worker threads there are (workers come and go).
LOOK_SECONDS = 2.0
CLOSE_SECONDS = 5.0


# -- errors -------------------------------------------------------------------------------------
class ClusterLost(DeidfsError):
    """The scheduler was lost during the run (exit 75): files in place are complete; the
    same command run again completes the rest."""

    exit_code = os.EX_TEMPFAIL


class WorkerRefused(DeidfsError):
    """A worker cannot do the run's work as the client would: another deidfs version,
    another key in the shared key file, or an output directory that is not the client's
    (exit 78). Raised in the task, so the client sees it as the task's error."""

    exit_code = os.EX_CONFIG


# -- batches ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, repr=False)
class Batch:
    """One task's sources. Its ``repr`` (which a worker logs for a failed task) shows their
    count only: paths may carry PHI."""

    number: int
    items: tuple[Item, ...]

    def __repr__(self) -> str:
        return f"Batch(#{self.number}, {len(self.items)} files)"


def partition(items: Sequence[Item], size: int) -> list[Batch]:
    """``items`` cut into batches of at most ``size``, in their order, by directory: the
    files of one directory stay in one batch unless there are more than ``size`` of them,
    and directories with fewer are packed together."""
    runs: list[list[Item]] = []
    last = None
    for item in items:
        directory = os.path.dirname(item[1])
        if directory != last or not runs:
            runs.append([])
            last = directory
        runs[-1].append(item)
    batches: list[tuple[Item, ...]] = []
    current: list[Item] = []
    for run in runs:
        if current and len(current) + len(run) > size:
            batches.append(tuple(current))
            current = []
        at = 0
        while len(run) - at > size:
            batches.append(tuple(run[at : at + size]))
            at += size
        current.extend(run[at:])
    if current:
        batches.append(tuple(current))
    return [Batch(number, chunk) for number, chunk in enumerate(batches)]


@dataclass(frozen=True, slots=True, repr=False)
class Work:
    """What every task of a run shares: a :class:`~deidfs.export.workers.Job` or
    :class:`~deidfs.export.workers.ScanJob` without its pseudonymizer (each worker makes its own
    from ``key``), the deidfs version the client runs, and the name of a file the client
    made in the output directory (to prove a worker writes into the same one)."""

    kind: type[Job] | type[ScanJob]
    values: tuple[tuple[str, Any], ...]
    key: KeySource
    version: str
    probe: str = ""

    def __repr__(self) -> str:
        return f"Work({self.kind.__name__}, deidfs {self.version})"

    @classmethod
    def of(cls, job: Job | ScanJob, key: KeySource, probe: str = "") -> Work:
        """The work of ``job``, its pseudonymizer left out."""
        values = tuple((f.name, getattr(job, f.name)) for f in fields(job) if f.name != "pseudo")
        return cls(type(job), values, key, __version__, probe)

    def bind(self, pseudo: Pseudonymizer) -> Job | ScanJob:
        """The job again, with ``pseudo``."""
        return self.kind(pseudo=pseudo, **dict(self.values))


@dataclass(frozen=True, slots=True, repr=False)
class BatchResult:
    """What one task returns: the results of its batch's files."""

    number: int
    results: list[FileResult] | list[ScanResult]

    def __repr__(self) -> str:
        return f"BatchResult(#{self.number}, {len(self.results)} files)"


# -- in the worker ------------------------------------------------------------------------------
_worker_lock = threading.Lock()
_worker_ready: set[int] = set()  #: processes (by pid) set up already
_pseudonymizers: dict[tuple[str, str], Pseudonymizer] = {}


def run_batch_task(work: Work, batch: Batch) -> BatchResult:
    """De-identify ``batch`` on a worker, as one process would; never raises for a file.

    Raises
    ------
    WorkerRefused
        This worker runs another deidfs version, reads another key, or does not see the
        client's output directory.
    SecretError
        The key file cannot be read here.
    """
    _set_up_worker_process()
    if work.version != __version__:
        raise WorkerRefused(
            f"a worker runs deidfs {__version__}, the client {work.version}: install the same "
            "version on every worker (they would not write the same bytes)"
        )
    job = work.bind(_pseudonymizer(work.key))
    stop = threading.Event()  # set by the chunk itself when the output takes no more files
    if isinstance(job, Job):
        _check_probe(job, work.probe)
        return BatchResult(batch.number, run_chunk(job, batch.items, stop))
    return BatchResult(batch.number, scan_chunk(job, batch.items, stop))


def _set_up_worker_process() -> None:
    pid = os.getpid()
    with _worker_lock:
        if pid not in _worker_ready:
            quiet_third_party()  # pydicom's warnings quote element values: never logged
            _worker_ready.add(pid)


def _pseudonymizer(key: KeySource) -> Pseudonymizer:
    where = key.path if isinstance(key, KeyFile) else ""
    with _worker_lock:
        pseudo = _pseudonymizers.get((where, key.fingerprint))
    if pseudo is not None:
        return pseudo
    material = read_key_file(Path(key.path)) if isinstance(key, KeyFile) else key.key
    pseudo = Pseudonymizer(material)
    if pseudo.fingerprint() != key.fingerprint:
        raise WorkerRefused(
            "the key file a worker reads holds another pseudonym key than the client's: "
            "--key-file must name the same file on storage every worker shares"
        )
    with _worker_lock:
        _pseudonymizers[(where, key.fingerprint)] = pseudo
    return pseudo


def _check_probe(job: Job, probe: str) -> None:
    """The client's output directory is the one this worker sees under its path."""
    if not probe:
        return
    if _probe_seen(job.out, probe):
        return
    raise WorkerRefused(
        "a worker does not see the client's output directory under its path: --to must be "
        "on storage every worker shares, mounted at the same path"
    )


def _probe_seen(out: Path, probe: str) -> bool:
    try:
        fd = open_path_dirs(out, create=False)
    except OSError:
        return False
    try:
        os.stat(probe, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# -- on the client ------------------------------------------------------------------------------


def _route_library_logs() -> None:
    """dask.distributed's records go through deidfs's handler, which withholds their text
    (:class:`deidfs.logs.ThirdPartyRedactor`), and only at ``--log-level debug``: the
    command says itself what went wrong (a lost scheduler, say, which the client would
    also report with tracebacks of its attempts to reconnect)."""
    lib_log = logging.getLogger("distributed")
    # Dask's configuration gives some of its loggers levels (and handlers) of their own.
    names = [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    for child in (logging.getLogger(n) for n in names):
        child.setLevel(logging.NOTSET)
        for handler in list(child.handlers):
            child.removeHandler(handler)
        child.propagate = True
    for handler in list(lib_log.handlers):
        lib_log.removeHandler(handler)
    lib_log.propagate = True
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    lib_log.setLevel(logging.WARNING if debug else logging.CRITICAL + 1)


@dataclass
class Connection:
    """A client of a cluster, and what is known of the cluster."""

    client: Any
    address: ClusterAddress
    seconds: float  #: to start (``local:N``) or reach the cluster, workers included
    clock: Callable[[], float] = time.monotonic
    _seen: tuple[float, int, int] = (-1e9, 0, 1)  #: (when, workers, threads), last asked

    def _look(self) -> tuple[int, int]:
        when, workers, threads = self._seen
        now = self.clock()
        if now - when >= LOOK_SECONDS and self.client.status == "running":
            with contextlib.suppress(Exception):  # the scheduler went away: the wait says so
                nthreads = self.client.nthreads()
                workers, threads = len(nthreads), max(1, sum(nthreads.values()))
            self._seen = (now, workers, threads)
        return workers, threads

    def threads(self) -> int:
        """Worker threads of the cluster (looked up every :data:`LOOK_SECONDS` at most)."""
        return self._look()[1]

    def workers(self) -> int:
        """Workers of the cluster (looked up every :data:`LOOK_SECONDS` at most)."""
        return self._look()[0]


@contextlib.contextmanager
def connect(options: ClusterOptions) -> Iterator[Connection]:
    """A client of the cluster ``options`` name, closed (and a ``local:N`` cluster
    stopped) on leaving.

    Raises
    ------
    ClusterUnavailable
        dask.distributed missing, the scheduler unreachable, or no worker within
        :data:`WORKERS_SECONDS`.
    ConfigError
        TLS certificates missing or incomplete for a ``tls://`` address.
    """
    distributed = import_distributed()
    security = security_of(options)
    _route_library_logs()
    address = options.address
    start = time.monotonic()
    cluster: Any = None
    client: Any = None
    try:
        if address.local:
            # Workers import deidfs as they start (their first task would, otherwise), after
            # the preloads of Dask's configuration.
            dask_config = import_distributed("dask.config")
            preload = list(dask_config.get("distributed.worker.preload", default=None) or [])
            cluster = distributed.LocalCluster(
                n_workers=address.local_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # No dashboard; the scheduler's HTTP routes (health, metrics) on loopback.
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
                preload=[*preload, __name__],
            )
            client = distributed.Client(cluster, set_as_default=False)
        else:
            client = distributed.Client(
                address.text,
                security=security,
                timeout=CONNECT_SECONDS,
                set_as_default=False,
            )
            client.wait_for_workers(1, timeout=WORKERS_SECONDS)
    except (OSError, TimeoutError) as exc:
        _close(client, cluster)
        what = "start a local cluster" if address.local else f"use the scheduler {address.text}"
        raise ClusterUnavailable(f"cannot {what}: {_why(exc)}") from None
    except BaseException:
        _close(client, cluster)
        raise
    try:
        yield Connection(client, address, time.monotonic() - start)
    finally:
        _close(client, cluster)


def _close(client: Any, cluster: Any) -> None:
    for thing in (client, cluster):
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close(timeout=CLOSE_SECONDS)


def _why(exc: BaseException) -> str:
    # A connection error names the scheduler's address (no PHI), and nothing else here.
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class ClusterRunner:
    """A :class:`deidfs.export.workers.Runner` on a Dask cluster: one task per :class:`Batch`.

    Parameters
    ----------
    connection
        The cluster (:func:`connect`).
    key
        How workers get the key (:func:`key_source`).
    batch_files
        Files per task at most (:func:`partition`).
    stream, quiet
        Where the start line and, without a terminal, the batch count go; ``quiet``
        prints nothing.
    """

    def __init__(
        self,
        connection: Connection,
        key: KeySource,
        *,
        batch_files: int = DEFAULT_BATCH_FILES,
        stream: TextIO | None = None,
        quiet: bool = True,
    ) -> None:
        self.connection = connection
        self.key = key
        self.batch_files = batch_files
        self.stream = stream
        self.quiet = quiet or stream is None
        #: Directories below the output that results named: where a killed task's
        #: temporary files can be.
        self._dirs: set[PurePosixPath] = set()
        self.batches_done = 0

    # -- Runner ---------------------------------------------------------------------------------
    def run(
        self,
        job: Job | ScanJob,
        items: Sequence[Item],
        report: Callable[[list[Any]], None],
        on_lost: Callable[[list[Item], str], list[Any]],
        stop: StopFlag | None = None,
        cached: ViewLookup | None = None,
    ) -> bool:
        """Run ``job`` over ``items`` on the cluster; see :meth:`deidfs.export.workers.Runner.run`.

        Raises
        ------
        ClusterLost
            The scheduler went away (the tasks in flight are abandoned).
        WorkerRefused
            A worker cannot do the work as this process would.
        """
        if cached is not None:
            raise ValueError("a cluster renders every view itself: no cached views")
        if not items:
            return True
        batches = partition(items, self.batch_files)
        if isinstance(job, Job) and not self.connection.address.local:
            # Device numbers of shared storage differ between machines: a worker elsewhere
            # can compare no directory identity (it still follows no link, and the probe
            # proves it writes into the client's directory).
            job = replace(job, out_id=None, guard=frozenset())
        probe = self._make_probe(job) if isinstance(job, Job) else ""
        try:
            return self._run(Work.of(job, self.key, probe), batches, report, on_lost, stop)
        finally:
            if probe:
                assert isinstance(job, Job)
                self._remove_probe(job, probe)

    def finished(self, writer: ExportWriter) -> None:
        """Remove the temporary files of tasks killed while they wrote (named, like every
        file of this run, by this process) from the directories the run wrote in."""
        dirs, self._dirs = self._dirs, set()
        writer.remove_own_temps(dirs)

    # -- internals ------------------------------------------------------------------------------
    def _run(
        self,
        work: Work,
        batches: list[Batch],
        report: Callable[[list[Any]], None],
        on_lost: Callable[[list[Item], str], list[Any]],
        stop: StopFlag | None,
    ) -> bool:
        client = self.connection.client
        run = secrets.token_hex(4)
        self._announce(work, batches)
        pending: dict[Any, Batch] = {}
        todo = list(reversed(batches))
        taken: set[int] = set()
        tries: dict[int, int] = {}  #: batch -> tasks submitted for it
        stopped = False

        def submit(batch: Batch) -> None:
            n = tries.get(batch.number, 0)
            tries[batch.number] = n + 1
            key = f"deidfs-batch-{run}-{batch.number}" + (f"-{n}" if n else "")
            # The work in each task: a worker holding it as data would draw every task.
            future = client.submit(
                run_batch_task, work, batch, key=key, pure=False, retries=TASK_RETRIES
            )
            pending[future] = batch

        try:
            while todo or pending:
                window = self.connection.threads() * IN_FLIGHT_PER_THREAD
                while todo and not stopped and len(pending) < window:
                    submit(todo.pop())
                done = [f for f in pending if f.status in ("finished", "error", "cancelled")]
                if not done:
                    if client.status not in ("running", "connecting"):
                        raise ClusterLost(self._lost_message())
                    time.sleep(POLL_SECONDS)
                    continue
                for future in done:
                    batch = pending.pop(future)
                    results = self._results(future, batch, on_lost)
                    with contextlib.suppress(Exception):
                        future.release()
                    if results is None:
                        # Its results went with a worker, or the scheduler dropped the task:
                        # the batch runs again (its files in place are found unchanged).
                        if tries[batch.number] > RESUBMITS:
                            results = on_lost(list(batch.items), "worker failed: results lost")
                        else:
                            submit(batch)
                            continue
                    if batch.number in taken:
                        continue  # one result per batch, whatever ran twice
                    taken.add(batch.number)
                    for res in results:
                        if isinstance(res, FileResult) and res.relpath:
                            self._dirs.add(PurePosixPath(res.relpath).parent)
                    report(results)
                    self._advance(len(batches))
                    if any(isinstance(r, FileResult) and r.fatal for r in results):
                        stopped = True  # the output takes no more: let the tasks in flight end
                if stop is not None and stop.is_set():
                    stopped = True
                if stopped:
                    todo.clear()
        except BaseException:
            for future in pending:
                with contextlib.suppress(Exception):
                    future.cancel()
            raise
        return not stopped

    def _results(
        self, future: Any, batch: Batch, on_lost: Callable[[list[Item], str], list[Any]]
    ) -> list[Any] | None:
        """The results of the done ``future``; None when they cannot be had but the
        scheduler is there (a worker died holding them, or the task was dropped).

        Raises
        ------
        ClusterLost
            The connection to the scheduler is gone.
        """
        status = future.status
        if status == "error":
            try:
                exc = future.exception(timeout=FETCH_SECONDS)
            except Exception:  # the error could not be fetched
                self._unless_lost()
                return None
            if isinstance(exc, DeidfsError):
                raise exc  # WorkerRefused, SecretError: the same for every batch
            # KilledWorker: the scheduler saw too many workers die on it.
            return on_lost(list(batch.items), f"worker failed: {type(exc).__name__}")
        if status != "finished":  # cancelled
            self._unless_lost()
            return None
        try:
            value = future.result(timeout=FETCH_SECONDS)
        except Exception:
            self._unless_lost()
            return None
        assert isinstance(value, BatchResult)
        return list(value.results)

    def _unless_lost(self) -> None:
        """Raise :class:`ClusterLost` unless the scheduler is there."""
        if self.connection.client.status != "running":
            raise ClusterLost(self._lost_message())

    def _lost_message(self) -> str:
        return (
            f"lost the connection to the cluster's scheduler ({self.connection.address.text}) "
            f"after {self.batches_done} batches: the files in place are complete; run the same "
            "command again to complete the rest"
        )

    def _announce(self, work: Work, batches: list[Batch]) -> None:
        self.batches_done = 0
        if self.quiet:
            return
        assert self.stream is not None
        what = "scanning" if work.kind is ScanJob else "writing"
        files = sum(len(b.items) for b in batches)
        key = "read by each worker" if isinstance(work.key, KeyFile) else "sent in the tasks"
        print(
            f"deidfs: cluster {self.connection.address.text} (ready in "
            f"{self.connection.seconds:.1f} s: {self.connection.workers()} workers, "
            f"{self.connection.threads()} threads): {what} {files} files in {len(batches)} "
            f"batch{'' if len(batches) == 1 else 'es'}; key {key}",
            file=self.stream,
        )

    def _advance(self, total: int) -> None:
        self.batches_done += 1
        if self.quiet or self.stream is None or self.stream.isatty():
            return  # a terminal shows the files' progress bar
        step = max(1, total // 10)
        if self.batches_done % step == 0 or self.batches_done == total:
            print(f"deidfs: {self.batches_done}/{total} batches done", file=self.stream)

    def _make_probe(self, job: Job) -> str:
        """A temporary file of this run (named as the writer names its own, so that only
        this process's writers keep it) in the output directory."""
        name = f"{TEMP_PREFIX}{job.owner_pid}-{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            fd = open_path_dirs(job.out, create=False, guard=job.guard)
        except OSError as exc:
            raise ExportError(
                f"cannot open the output directory: {exc.strerror}", exc.errno
            ) from None
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            os.close(os.open(name, flags, 0o600, dir_fd=fd))
        except OSError as exc:
            raise ExportError(
                f"cannot write to the output directory: {exc.strerror}", exc.errno
            ) from None
        finally:
            os.close(fd)
        return name

    def _remove_probe(self, job: Job, name: str) -> None:
        try:
            fd = open_path_dirs(job.out, create=False, guard=job.guard)
        except OSError:
            return
        try:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
