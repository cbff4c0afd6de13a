"""``deidfs anonymize SRC... --profile NAME --to DIR``: de-identify files once, into DIR.

Every file is rendered exactly as the mount renders it (:func:`deidfs.render.render`) and
written with :class:`deidfs.export.ExportWriter`, so the bytes equal what the mount serves for
the same file, profile and key. Files are spread over a pool of worker processes, each
rendering and writing a chunk of files at a time.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import shutil
import signal
import stat
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from deidfs.cli.common import config_path, load_profiles
from deidfs.config import load_config
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound, ProfileError, Refused
from deidfs.export import ExportError, ExportWriter, Outcome
from deidfs.render import Layout
from deidfs.secret import load_or_create_key, read_key_file

log = logging.getLogger(__name__)

KEY_FILE_ENV = "DEIDFS_KEY_FILE"
#: Transfers in progress (dcm4che ``.part``, RSNA CTP ``.partial``), as the watcher skips them.
IGNORED_SUFFIXES = (".part", ".partial")
#: Files per task handed to a worker process: large enough that inter-process traffic is
#: noise, small enough that the progress bar moves and the workers finish together.
MAX_CHUNK = 32
#: Refusal reasons that are not the fail-closed verdict on a file's content but a failure to
#: read it: counted as failures (exit 1), since a second run may succeed.
_FAILURE_REASONS = frozenset({"source_changed"})

DESCRIPTION = """\
De-identify DICOM files once and write them into DIR, named by the layout: by default
DIR/<PatientID'>/<StudyInstanceUID'>/<SeriesInstanceUID'>/<SOPInstanceUID'>.dcm, from the
de-identified values. Each output file holds exactly the bytes the deidfs mount serves for
the same source, profile and key.

SRC may be files and folders; folders are read recursively. Skipped: names starting with a
dot (files and folders), *.part and *.partial (transfers in progress), symbolic links inside
folders (never followed), and anything that is not a regular file. Symbolic links given as SRC
themselves are followed. Originals are only ever opened read-only.

Files that are not DICOM or cannot be de-identified safely are refused (fail closed): they
are counted by reason and named only by a keyed token of their path, never by the path.

Writing is atomic and idempotent: each file is written to a temporary dotfile in its target
folder, flushed to disk (fsync) and renamed into place, so no partial file is ever visible
under its final name; temporary files of an interrupted run are removed by the next run. A
target that already holds the same view is left alone and counted "unchanged".

Pseudonym key (the same key gives the same UIDs, IDs and dates as the mount):
  1. --key-file FILE, or $DEIDFS_KEY_FILE: an existing key file (hex, mode 0600);
  2. else, with a configuration (--config, $DEIDFS_CONFIG or /etc/deidfs/deidfs.toml if it
     exists): the key in its [daemon] state_dir, created there on first use;
  3. else: the per-user state directory $XDG_STATE_HOME/deidfs (default
     ~/.local/state/deidfs), whose key is created on first use.
"""

EPILOG = """\
exit codes:
  0   every file written, unchanged, skipped or refused (refusals are fail-closed, not errors)
  1   some file could not be read or written
  66  a SRC does not exist; 73 DIR cannot be created or written; 78 bad profile, key or config
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``anonymize`` to ``sub``."""
    p = sub.add_parser(
        "anonymize",
        help="de-identify DICOM files and folders once, into a directory",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", nargs="+", metavar="SRC", help="DICOM files and folders")
    p.add_argument("--profile", required=True, help="profile name (built-in: Basic, HIPAA)")
    p.add_argument("--to", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="configuration file: its profiles and its key (default: $DEIDFS_CONFIG or "
        "/etc/deidfs/deidfs.toml if it exists)",
    )
    p.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=Layout.DICOM.value,
        help="output names: dicom (default: patient/study/series/instance from de-identified "
        "values), flat (<SOPInstanceUID'>.dcm), mirror (each file's path relative to its SRC "
        "folder: original names, which may carry PHI)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"worker processes (default: the number of CPUs, {os.cpu_count() or 1} here)",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"pseudonym key file (default: ${KEY_FILE_ENV}, else as described above)",
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not wait for each file to reach the disk before it appears (faster; after a "
        "machine crash, files may be empty under their final names)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, no summary, no per-file refusal lines (failures still shown)",
    )
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- sources ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sources:
    """The files to process: (absolute path, path relative to its SRC folder), in order."""

    files: list[tuple[str, str]]
    skipped: int  #: dotfiles, partial transfers, links and special files


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def collect_sources(srcs: Sequence[str]) -> Sources:
    """Walk ``srcs`` (files and folders) the way the watcher does; never follow inner links.

    Raises
    ------
    NotFound
        When a SRC does not exist (named by its position: paths may carry PHI).
    """
    files: list[tuple[str, str]] = []
    skipped = 0
    for number, src in enumerate(srcs, start=1):
        path = os.path.abspath(src)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise NotFound(f"SRC #{number} of {len(srcs)} cannot be read: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            found, skips = _walk(path)
            files.extend(found)
            skipped += skips
        elif stat.S_ISREG(st.st_mode):
            files.append((path, os.path.basename(path)))
        else:
            skipped += 1
    return Sources(files, skipped)


def _walk(root: str) -> tuple[list[tuple[str, str]], int]:
    found: list[tuple[str, str]] = []
    skipped = 0
    stack = [(root, "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            skipped += 1
            continue
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            try:
                if _ignored(name) or entry.is_symlink():
                    skipped += 1
                elif entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.path, f"{rel}{name}/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append((entry.path, rel + name))
                else:
                    skipped += 1
            except OSError:
                skipped += 1
        stack.extend(reversed(subdirs))
    return found, skipped


# -- key and profile ----------------------------------------------------------------------------
def user_state_dir() -> Path:
    """The per-user state directory used without a configuration."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says relative values are to be ignored
        base = str(Path.home() / ".local" / "state")
    return Path(base) / "deidfs"


def load_key(key_file: str | None, config: str | None) -> bytes:
    """The pseudonym key, by the order documented in ``deidfs anonymize --help``."""
    chosen = key_file or os.environ.get(KEY_FILE_ENV)
    if chosen:
        return read_key_file(Path(chosen))
    cfg = config_path(config)
    if cfg is not None:
        return load_or_create_key(load_config(cfg).daemon.state_dir)
    return load_or_create_key(user_state_dir())


# -- the work of one worker ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Job:
    """Everything a worker needs; handed over once per worker process."""

    plan: Plan
    pseudo: Pseudonymizer
    out: Path
    layout: Layout
    durable: bool
    owner_pid: int  #: the coordinating process, which settles pending files


@dataclass(frozen=True, slots=True)
class FileResult:
    """How one file ended: ``status`` is an :class:`Outcome` value, "refused" or "failed"."""

    index: int
    status: str
    detail: str = ""  #: refusal reason or a PHI-free error message
    size: int = 0
    relpath: str = ""  #: the output path below DIR, when rendered
    temp: str = ""  #: the temporary file of a "pending" view


_job: Job | None = None


def _init_worker(job: Job) -> None:
    global _job  # noqa: PLW0603 - one job per worker process, set once by the pool
    _job = job
    _quiet_third_party()


def _run_chunk_in_worker(chunk: list[tuple[int, str, str]]) -> list[FileResult]:
    assert _job is not None
    return run_chunk(_job, chunk)


def run_chunk(job: Job, chunk: list[tuple[int, str, str]]) -> list[FileResult]:
    """Render and write ``chunk`` of (index, path, relative path); never raises for a file.

    Existing targets with other bytes are not replaced here but left pending, for the
    coordinator to decide between sources that name the same target.
    """
    results: list[FileResult] = []
    writer = ExportWriter(job.out, durable=job.durable, replace=False, owner_pid=job.owner_pid)
    try:
        for index, path, rel in chunk:
            try:
                writer.put_path(index, path, job.plan, job.pseudo, job.layout, PurePosixPath(rel))
            except Refused as exc:
                status = "failed" if exc.reason in _FAILURE_REASONS else "refused"
                results.append(FileResult(index, status, exc.reason))
            except ExportError as exc:
                results.append(FileResult(index, "failed", str(exc)))
            except Exception as exc:  # one bad file must not stop the batch
                results.append(FileResult(index, "failed", f"internal error {type(exc).__name__}"))
        for res in writer.finish():
            assert isinstance(res.key, int)
            if res.error is not None or res.outcome is None:
                results.append(FileResult(res.key, "failed", str(res.error)))
            else:
                temp = str(res.temp) if res.temp is not None else ""
                results.append(
                    FileResult(res.key, res.outcome.value, "", res.size, str(res.relpath), temp)
                )
    except BaseException:
        writer.abort()
        raise
    return results


def _quiet_third_party() -> None:
    # pydicom warns and logs with element values in the message (names, IDs, dates).
    warnings.simplefilter("ignore")
    lib_log = logging.getLogger("pydicom")
    lib_log.setLevel(logging.CRITICAL + 1)
    lib_log.propagate = False


# -- progress and summary -----------------------------------------------------------------------
class Progress:
    """A one-line progress bar on a terminal; does nothing when disabled."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and total > 0
        self.clock = clock
        self.start = clock()
        self.done = 0
        self._last = -1.0
        self._shown = False

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        pct = self.done / self.total
        tail = f" {self.done}/{self.total} {pct:4.0%} {rate:6.0f} files/s"
        width = shutil.get_terminal_size((80, 24)).columns
        bar_width = max(10, min(40, width - len(tail) - 3))
        filled = int(bar_width * pct)
        line = "[" + "#" * filled + "-" * (bar_width - filled) + "]" + tail
        self.stream.write("\r" + line[: width - 1])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (before printing a line, and at the end)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._last = -1.0


@dataclass
class Tally:
    """Counts of a run."""

    skipped: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    bytes_out: int = 0

    def add(self, status: str, detail: str = "", size: int = 0) -> None:
        self.by_status[status] += 1
        if status == "refused":
            self.refused[detail] += 1
        elif status not in ("failed", "duplicate"):
            self.bytes_out += size

    @property
    def failed(self) -> int:
        return self.by_status["failed"]


def _summary(tally: Tally, seconds: float, out: TextIO) -> None:
    done = sum(tally.by_status.values())
    rate = done / seconds if seconds > 0 else 0.0
    mbps = tally.bytes_out / seconds / 1e6 if seconds > 0 else 0.0
    print(
        f"deidfs anonymize: {done} files in {seconds:.2f} s ({rate:.0f} files/s, {mbps:.0f} MB/s)",
        file=out,
    )
    written = tally.by_status[Outcome.WRITTEN.value] + tally.by_status[Outcome.REPLACED.value]
    replaced = tally.by_status[Outcome.REPLACED.value]
    rows = [
        ("written", written, f"{replaced} replaced an older file" if replaced else ""),
        ("unchanged", tally.by_status[Outcome.UNCHANGED.value], ""),
        (
            "refused",
            sum(tally.refused.values()),
            ", ".join(f"{reason} {n}" for reason, n in sorted(tally.refused.items())),
        ),
        ("failed", tally.failed, ""),
        (
            "duplicate",
            tally.by_status["duplicate"],
            "same output name as another file; the first by source path is kept",
        ),
        ("skipped", tally.skipped, "dotfiles, partial transfers, links"),
    ]
    for name, n, note in rows:
        print(f"  {name:<10}{n:>8}" + (f"   {note}" if note and n else ""), file=out)


class _Claims:
    """Output names claimed in this run; settles sources that name the same target."""

    def __init__(self, files: list[tuple[str, str]]) -> None:
        self.files = files
        self.by_relpath: dict[str, list[FileResult]] = {}

    def add(self, res: FileResult) -> None:
        self.by_relpath.setdefault(res.relpath, []).append(res)

    def settle(self, writer: ExportWriter, tally: Tally) -> list[FileResult]:
        """Count every claim; put the winner of each target in place. Returns failures."""
        failures: list[FileResult] = []
        for relpath, claims in self.by_relpath.items():
            # The first source path wins, as in the mount: deterministic across runs.
            claims.sort(key=lambda c: self.files[c.index][0])
            winner, losers = claims[0], claims[1:]
            for loser in losers:
                if loser.temp:
                    writer.discard(Path(loser.temp))
                tally.add("duplicate")
            status = winner.status
            if status == Outcome.PENDING.value:
                try:
                    status = writer.settle(Path(winner.temp), PurePosixPath(relpath)).value
                except ExportError as exc:
                    failed = FileResult(winner.index, "failed", str(exc))
                    tally.add("failed")
                    failures.append(failed)
                    continue
            tally.add(status, "", winner.size)
        writer.finish()
        return failures

    def discard_pending(self, writer: ExportWriter) -> None:
        """Remove the temporary files of every pending claim (the run is interrupted)."""
        for claims in self.by_relpath.values():
            for claim in claims:
                if claim.temp:
                    writer.discard(Path(claim.temp))


# -- the command --------------------------------------------------------------------------------
def _chunks(files: list[tuple[str, str]], size: int) -> Iterator[list[tuple[int, str, str]]]:
    for start in range(0, len(files), size):
        yield [(i, p, r) for i, (p, r) in enumerate(files[start : start + size], start=start)]


def run(args: argparse.Namespace) -> int:
    """Run ``deidfs anonymize``; returns the exit code."""
    config = getattr(args, "config", None)
    profiles = load_profiles(config)
    profile = profiles.get(args.profile)
    if profile is None:
        raise NotFound(f"no profile named {args.profile!r} (have: {', '.join(sorted(profiles))})")
    if not profile.enabled:
        raise ProfileError(f"profile {profile.name!r} is disabled")
    plan = compile_plan(profile)
    pseudo = Pseudonymizer(load_key(args.key_file, config))
    layout = Layout(args.layout)
    sources = collect_sources(args.src)
    out = Path(args.to)
    writer = ExportWriter(out, durable=not args.no_fsync)
    try:
        writer.check_root()
    except ExportError as exc:
        print(f"deidfs: {exc}", file=sys.stderr)
        return exc.exit_code
    job = Job(plan, pseudo, out, layout, not args.no_fsync, os.getpid())
    files = sources.files
    tally = Tally(skipped=sources.skipped)
    claims = _Claims(files)
    progress = Progress(len(files), sys.stderr, sys.stderr.isatty() and not args.quiet)

    def show(res: FileResult) -> None:
        if res.status == "failed" or not args.quiet:
            progress.clear()
            token = pseudo.token(files[res.index][0], "path")[:12]
            print(f"deidfs: {res.status} ({res.detail}): file {token}", file=sys.stderr)

    def report(results: list[FileResult]) -> None:
        for res in results:
            if res.status in ("refused", "failed"):
                tally.add(res.status, res.detail)
                show(res)
            else:
                claims.add(res)
        progress.advance(len(results))

    workers = min(args.workers or os.cpu_count() or 1, max(1, len(files)))
    start = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)
    own_handler = (
        previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    )
    if own_handler:
        signal.signal(signal.SIGTERM, _terminate)
    with warnings.catch_warnings():
        saved = _save_pydicom_logging()
        try:
            _quiet_third_party()
            if workers == 1:
                for chunk in _chunks(files, MAX_CHUNK):
                    report(run_chunk(job, chunk))
            else:
                _run_pool(job, files, workers, report)
        except BaseException:
            claims.discard_pending(writer)
            raise
        finally:
            _restore_pydicom_logging(saved)
            progress.clear()
            if own_handler:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for res in claims.settle(writer, tally):
        show(res)
    seconds = time.monotonic() - start
    if not args.quiet:
        _summary(tally, seconds, sys.stdout)
    return 1 if tally.failed else 0


def _run_pool(
    job: Job,
    files: list[tuple[str, str]],
    workers: int,
    report: Callable[[list[FileResult]], None],
) -> None:
    size = max(1, min(MAX_CHUNK, math.ceil(len(files) / (workers * 4))))
    # fork: the workers inherit the imported modules and the compiled plan, so they start in
    # milliseconds; the parent has no other threads at this point.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(job,))
    pending: dict[Future[list[FileResult]], list[tuple[int, str, str]]] = {}
    try:
        for chunk in _chunks(files, size):
            pending[pool.submit(_run_chunk_in_worker, chunk)] = chunk
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                chunk = pending.pop(future)
                try:
                    results = future.result()
                except Exception as exc:  # a worker died (killed, out of memory)
                    reason = f"worker failed: {type(exc).__name__}"
                    results = [FileResult(index, "failed", reason) for index, _, _ in chunk]
                report(results)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM: stop like Ctrl-C, so workers are shut down and temporary files removed.
    raise KeyboardInterrupt


def _save_pydicom_logging() -> tuple[int, bool]:
    lib_log = logging.getLogger("pydicom")
    return lib_log.level, lib_log.propagate


def _restore_pydicom_logging(saved: tuple[int, bool]) -> None:
    lib_log = logging.getLogger("pydicom")
    lib_log.setLevel(saved[0])
    lib_log.propagate = saved[1]
