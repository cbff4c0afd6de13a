"""The work of one worker, and the worker processes that do it.

A :class:`Job` (profile, key, destination) is run over a chunk of sources by
:func:`run_chunk`: each is rendered and written with an
:class:`~deidfs.export.writer.ExportWriter`, one :class:`FileResult` each; a :class:`ScanJob`
only matches a selection (:func:`scan_chunk`). :func:`run_batch` hands chunks to a process
pool (:func:`pool_context`) and stops it at once when a file's failure is fatal or the caller
stops; a :class:`Runner` is what runs a batch (:class:`PoolRunner` here, or a Dask cluster's,
:mod:`deidfs.export.cluster`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    wait,
)
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import Refused
from deidfs.export.dirs import (
    DirId,
)
from deidfs.export.errors import ExportError
from deidfs.export.selection import (
    _SELECTOR_TAGS,
    Matcher,
    ServedIds,
    _values,
    served_ids,
)
from deidfs.export.writer import (
    ExportWriter,
    ViewLookup,
)
from deidfs.ops.lifeline import die_with_parent
from deidfs.view.render import (
    Layout,
    SourceStat,
    View,
    render,
)

#: Files per task handed to a worker process: large enough that inter-process traffic is
#: noise, small enough that progress moves, workers finish together and a stop is quick.
MAX_CHUNK = 32
#: Refusal reasons that are not the fail-closed verdict on a file's content but a failure to
#: read it consistently: counted as failures, since a second run may succeed.
FAILURE_REASONS = frozenset({"source_changed"})


#: (index, absolute source path, path relative to the folder): one source of a batch.
Item = tuple[int, str, str]


# -- the work of one worker ---------------------------------------------------------------------
class StopFlag(Protocol):
    """A :class:`threading.Event` or a :class:`multiprocessing.Event`."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a writing worker needs; handed over once per worker process."""

    plan: Plan
    pseudo: Pseudonymizer
    out: Path
    layout: Layout
    durable: bool
    owner_pid: int  #: the coordinating process, which settles pending files
    describe: bool = False  #: hash each file and read its identifiers (for a manifest)
    out_id: DirId | None = None  #: the identity ``out`` had when it was checked
    guard: frozenset[DirId] = frozenset()  #: directories never written in (ExportWriter)
    max_header_bytes: int | None = None  #: bound of a source's header (None: the default)


@dataclass(frozen=True, slots=True)
class FileResult:
    """How one file ended: ``status`` is an :class:`~deidfs.export.outcomes.Outcome` value,
    "refused", "failed" or (after :meth:`~deidfs.export.claims.Claims.settle`) "duplicate"."""

    index: int
    status: str
    detail: str = ""  #: refusal reason or a PHI-free error message
    size: int = 0
    relpath: str = ""  #: the output path below the output directory, when rendered
    temp: str = ""  #: the temporary file of a "pending" view
    sha256: str = ""  #: of the file written (``describe``; "" for "unchanged")
    ids: ServedIds | None = None  #: its identifiers (``describe``)
    reason: str = ""  #: bounded reason of a failure (metric label)
    fatal: bool = False  #: the output takes no more files: the batch stops


def _put_once_more_if_changed(
    writer: ExportWriter, job: Job, item: Item, cached: ViewLookup | None
) -> View:
    index, path, rel = item
    rel_path = PurePosixPath(rel)
    args = (index, path, job.plan, job.pseudo, job.layout, rel_path, cached, job.max_header_bytes)
    try:
        return writer.put_path(*args)
    except Refused as exc:
        if exc.reason != "source_changed":
            raise
    # Written to while it was exported: once more from its new state, from one open file.
    return writer.put_path(*args)


def run_chunk(
    job: Job,
    chunk: Sequence[Item],
    stop: StopFlag | None = None,
    cached: ViewLookup | None = None,
) -> list[FileResult]:
    """Render and write ``chunk``; never raises for a file.

    Existing targets with other bytes are not replaced here but left pending, for the
    coordinator to decide between sources that name the same target. A source that changes
    while it is written is tried once more, then reported failed (``source_changed``).
    On an error of the output that no file can escape (disk full, read-only), ``stop`` is
    set and the rest of the chunk is left undone (not reported); a set ``stop`` does the same.
    """
    results: list[FileResult] = []
    ids: dict[int, ServedIds] = {}
    writer = ExportWriter(
        job.out,
        durable=job.durable,
        replace=False,
        owner_pid=job.owner_pid,
        digest=job.describe,
        expect=job.out_id,
        guard=job.guard,
    )

    def fail(index: int, exc: ExportError) -> None:
        results.append(FileResult(index, "failed", str(exc), reason=exc.reason, fatal=exc.fatal))
        if exc.fatal and stop is not None:
            stop.set()

    try:
        for item in chunk:
            if stop is not None and stop.is_set():
                break
            index = item[0]
            try:
                view = _put_once_more_if_changed(writer, job, item, cached)
                if job.describe:
                    ids[index] = served_ids(view)
            except Refused as exc:
                failed = exc.reason in FAILURE_REASONS
                status = "failed" if failed else "refused"
                results.append(FileResult(index, status, exc.reason, reason=exc.reason))
            except ExportError as exc:
                fail(index, exc)
                if exc.fatal:
                    break
            except Exception as exc:  # one bad file must not stop the batch
                detail = f"internal error {type(exc).__name__}"
                results.append(FileResult(index, "failed", detail, reason="internal"))
        for res in writer.finish():
            assert isinstance(res.key, int)
            if res.error is not None or res.outcome is None:
                fail(res.key, res.error or ExportError("cannot commit the file"))
            else:
                results.append(
                    FileResult(
                        res.key,
                        res.outcome.value,
                        size=res.size,
                        relpath=str(res.relpath),
                        temp=str(res.temp) if res.temp is not None else "",
                        sha256=res.sha256,
                        ids=ids.get(res.key),
                    )
                )
    except BaseException:
        writer.abort()
        raise
    return results


@dataclass(frozen=True, slots=True)
class ScanJob:
    """Everything a scanning worker needs: what the mount would serve, and the selection."""

    plan: Plan
    pseudo: Pseudonymizer
    layout: Layout
    matcher: Matcher
    max_header_bytes: int | None = None  #: bound of a source's header (None: the default)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One source seen by a scan: its view path, or why it is withheld; what it matched."""

    index: int
    relpath: str = ""
    refused: str = ""
    matched: frozenset[tuple[str, int]] = frozenset()


def scan_chunk(
    job: ScanJob,
    chunk: Sequence[Item],
    stop: StopFlag | None = None,
    cached: ViewLookup | None = None,
) -> list[ScanResult]:
    """Render each source's header as the mount does and match it; never raises for a file.

    Original identifiers are compared here, in the worker, and never leave it.
    """
    results: list[ScanResult] = []
    matcher = job.matcher
    for index, path, rel in chunk:
        if stop is not None and stop.is_set():
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            results.append(ScanResult(index, refused="unreadable"))
            continue
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    results.append(ScanResult(index, refused="not_regular"))
                    continue
                source_rel = PurePosixPath(rel)
                state = SourceStat.of(st)
                view = cached(path, state) if cached is not None else None
                if view is None or view.source != state:
                    view = render(
                        f,
                        state,
                        job.plan,
                        job.pseudo,
                        job.layout,
                        source_rel,
                        max_header_bytes=job.max_header_bytes,
                    )
                original: dict[int, str] = {}
                served: dict[int, str] = {}
                if matcher.needs_values:
                    original = _values(f, _SELECTOR_TAGS.values())
                    served = _values(io.BytesIO(view.header), _SELECTOR_TAGS.values())
                matched = matcher.match(source_rel, view.relpath, original, served)
                results.append(ScanResult(index, str(view.relpath), "", matched))
        except Refused as exc:
            results.append(ScanResult(index, refused=exc.reason))
        except Exception as exc:  # one bad file must not stop the scan
            results.append(ScanResult(index, refused=f"internal_{type(exc).__name__}"))
    return results


# -- worker processes ---------------------------------------------------------------------------
_worker_job: object = None
_worker_stop: StopFlag | None = None


def quiet_third_party() -> None:
    """Silence pydicom for good in a worker process: it warns and logs element values."""
    warnings.simplefilter("ignore")
    lib_log = logging.getLogger("pydicom")
    lib_log.setLevel(logging.CRITICAL + 1)
    lib_log.propagate = False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and logs (which carry element values) for a while.

    Warning filters are process-wide: only the main thread changes them here. A daemon,
    whose other threads read files too, silences pydicom once at start instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    lib_log = logging.getLogger("pydicom")
    saved = lib_log.level, lib_log.propagate
    with warnings.catch_warnings():
        try:
            quiet_third_party()
            yield
        finally:
            lib_log.setLevel(saved[0])
            lib_log.propagate = saved[1]


def _init_worker(job: object, stop: StopFlag, coordinator: int) -> None:
    global _worker_job, _worker_stop  # one job per worker process, set once by the pool
    die_with_parent(coordinator)
    _worker_job, _worker_stop = job, stop
    quiet_third_party()


def _write_in_worker(chunk: list[Item]) -> list[FileResult]:
    assert isinstance(_worker_job, Job)
    return run_chunk(_worker_job, chunk, _worker_stop)


def _scan_in_worker(chunk: list[Item]) -> list[ScanResult]:
    assert isinstance(_worker_job, ScanJob)
    return scan_chunk(_worker_job, chunk, _worker_stop)


def _chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def pool_context() -> BaseContext:
    """How worker processes start: ``fork`` from a single-threaded command (they inherit
    the imported modules and start in milliseconds), else ``forkserver``: forking a process
    with other threads (a daemon's) could copy a lock one of them holds."""
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["deidfs.export.folder"])
    return context


class _EitherFlag:
    """Set when either flag is; setting it sets the second."""

    def __init__(self, outer: StopFlag, own: StopFlag) -> None:
        self.outer, self.own = outer, own

    def is_set(self) -> bool:
        return self.outer.is_set() or self.own.is_set()

    def set(self) -> None:
        self.own.set()


def run_batch(
    job: Job | ScanJob,
    items: Sequence[Item],
    workers: int,
    report: Callable[[list[Any]], None],
    on_lost: Callable[[list[Item], str], list[Any]],
    stop: StopFlag | None = None,
    cached: ViewLookup | None = None,
) -> bool:
    """Run ``job`` over ``items`` in chunks: in this process (``workers`` 1) or a pool.

    ``report`` gets each chunk's results, in this process, as they come; ``on_lost`` makes
    the results of a chunk whose worker died. Returns False when ``stop`` (or a worker, on
    an error of the output) stopped the batch early: some items were not reported. With
    ``cached`` views (which live in this process) everything runs in this process.
    """
    worker_fn: Callable[[list[Item]], list[Any]]
    worker_fn = _write_in_worker if isinstance(job, Job) else _scan_in_worker
    outer: StopFlag = stop if stop is not None else threading.Event()
    if workers <= 1 or len(items) <= 1 or cached is not None:
        flag = _EitherFlag(outer, threading.Event())
        for chunk in _chunks(items, MAX_CHUNK):
            if flag.is_set():
                return False
            if isinstance(job, Job):
                report(run_chunk(job, chunk, flag, cached))
            else:
                report(scan_chunk(job, chunk, flag, cached))
        return not flag.is_set()
    size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * 4))))
    context = pool_context()
    flag2 = context.Event()
    pool = ProcessPoolExecutor(
        workers, context, initializer=_init_worker, initargs=(job, flag2, os.getpid())
    )
    pending: dict[Future[list[Any]], list[Item]] = {}
    try:
        for chunk in _chunks(items, size):
            pending[pool.submit(worker_fn, chunk)] = chunk
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            if outer.is_set() and not flag2.is_set():
                flag2.set()
            if flag2.is_set():
                for future in list(pending):
                    if future.cancel():
                        del pending[future]
            for future in done:
                chunk = pending.pop(future)
                try:
                    results = future.result()
                except Exception as exc:  # a worker died (killed, out of memory)
                    results = on_lost(chunk, f"worker failed: {type(exc).__name__}")
                report(results)
    except BaseException:
        flag2.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return not flag2.is_set()


class Runner(Protocol):
    """Where the chunks of a batch run: this machine's processes (:class:`PoolRunner`), or
    a Dask cluster's workers (:class:`deidfs.export.cluster.ClusterRunner`)."""

    def run(
        self,
        job: Job | ScanJob,
        items: Sequence[Item],
        report: Callable[[list[Any]], None],
        on_lost: Callable[[list[Item], str], list[Any]],
        stop: StopFlag | None = None,
        cached: ViewLookup | None = None,
    ) -> bool:
        """Run ``job`` over ``items`` as :func:`run_batch` does, with its meaning of the
        arguments and of the result."""
        ...

    def finished(self, writer: ExportWriter) -> None:
        """The batch is over and its pending files are settled (or discarded) by ``writer``,
        the coordinator's: clean up what only the runner knows about."""
        ...


@dataclass(frozen=True, slots=True)
class PoolRunner:
    """:func:`run_batch` on this machine, with ``workers`` processes."""

    workers: int

    def run(
        self,
        job: Job | ScanJob,
        items: Sequence[Item],
        report: Callable[[list[Any]], None],
        on_lost: Callable[[list[Item], str], list[Any]],
        stop: StopFlag | None = None,
        cached: ViewLookup | None = None,
    ) -> bool:
        """:func:`run_batch` with this runner's worker count."""
        return run_batch(job, items, self.workers, report, on_lost, stop, cached)

    def finished(self, writer: ExportWriter) -> None:
        """Nothing to do: a lost chunk's files are counted failed, its leftovers are
        removed by the next run."""
