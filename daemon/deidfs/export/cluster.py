"""The one-shot de-identification of ``deidfs anonymize`` and ``deidfs export`` on a Dask
cluster (dask.distributed): ``--cluster local:N`` or a scheduler's address.

The client (the command) lists the sources as on one machine and cuts them into batches by
directory (:func:`deidfs.export.cluster_tasks.partition`); each batch is one task,
:func:`deidfs.export.cluster_tasks.run_batch_task` (the worker side, in
:mod:`deidfs.export.cluster_tasks`), which renders
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
path or the key. Each task carries the run's :class:`~deidfs.export.cluster_tasks.Work`
(some 35 kB, mostly the plan):
a worker holding it as data would draw every task to itself.

The pseudonym key (:mod:`deidfs.export.cluster_config`):

- :class:`~deidfs.export.cluster_config.KeyFile`: with a key file named on storage every
  worker shares, each worker reads the key itself; only the file's path and a fingerprint
  of the key travel (a worker whose file holds another key refuses the task:
  :class:`~deidfs.export.cluster_tasks.WorkerRefused`).
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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, TextIO

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
from deidfs.export.cluster_tasks import Batch, BatchResult, Work, partition, run_batch_task
from deidfs.export.dirs import open_path_dirs
from deidfs.export.errors import ExportError
from deidfs.export.files import TEMP_PREFIX, TEMP_SUFFIX
from deidfs.export.workers import FileResult, Item, Job, ScanJob, StopFlag
from deidfs.export.writer import ExportWriter, ViewLookup

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
    """A :class:`deidfs.export.workers.Runner` on a Dask cluster: one task per
    :class:`~deidfs.export.cluster_tasks.Batch`.

    Parameters
    ----------
    connection
        The cluster (:func:`connect`).
    key
        How workers get the key (:func:`key_source`).
    batch_files
        Files per task at most (:func:`~deidfs.export.cluster_tasks.partition`).
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
            A worker cannot do the work as this process would
            (:class:`deidfs.export.cluster_tasks.WorkerRefused`).
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
