"""The worker side of a run on a Dask cluster (:mod:`deidfs.export.cluster`): the batches
the client cuts the sources into (:func:`partition`), the :class:`Work` every task of a run
shares, and the task itself, :func:`run_batch_task`, which sets up its worker process, makes
the run's pseudonymizer from the key (:mod:`deidfs.export.cluster_config`), checks that the
worker writes into the client's output directory and runs the batch with
:func:`deidfs.export.workers.run_chunk` or :func:`deidfs.export.workers.scan_chunk`. Every
``repr`` here shows counts only (a worker logs a failed task with its arguments' ``repr``):
never a path or the key. A worker that cannot do the work as the client would raises
:class:`WorkerRefused`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deidfs import __version__
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError
from deidfs.export.cluster_config import KeyFile, KeySource
from deidfs.export.dirs import open_path_dirs
from deidfs.export.workers import (
    FileResult,
    Item,
    Job,
    ScanJob,
    ScanResult,
    quiet_third_party,
    run_chunk,
    scan_chunk,
)
from deidfs.secret import read_key_file


# -- errors -------------------------------------------------------------------------------------
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
