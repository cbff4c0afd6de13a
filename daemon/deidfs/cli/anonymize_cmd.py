"""``deidfs anonymize SRC... --profile NAME --to DIR``: de-identify files once, into DIR.

Every file is rendered exactly as the mount renders it (:func:`deidfs.view.render.render`)
and written with :class:`deidfs.export.writer.ExportWriter`, so the bytes equal what the mount
serves for the same file, profile and key. Files are spread over a pool of worker processes, each
rendering and writing a chunk of files at a time.

``--to-destination NAME`` sends the same views to the configuration's destination with
:func:`deidfs.export.send.send_sources` (one process: sending, not rendering, takes the time), its
state kept as that of a folder named :data:`SEND_STATE_NAME`.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from deidfs.cli.common import (
    add_cluster_options,
    add_writer_options,
    cluster_usage_error,
    config_path,
    load_profiles,
    required_config,
)
from deidfs.cli.oneshot import cluster_key, cluster_options, run_with_runner, sigterm_interrupts
from deidfs.cli.terminal import Progress, Terminal, print_rows, refused_note, sent_exit_code
from deidfs.config.load import load_config
from deidfs.config.model import FolderConfig
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound, ProfileError
from deidfs.export.claims import Claims
from deidfs.export.confinement import Place, forbidden_places, guard_of, resolve_destination
from deidfs.export.errors import ExportError, stopped_exit_code
from deidfs.export.folder import SourceSet
from deidfs.export.outcomes import Outcome
from deidfs.export.selection import walk_sources
from deidfs.export.send import destination_of, send_sources
from deidfs.export.summary import ExportStopped
from deidfs.export.workers import FileResult, Item, Job, Runner, quiet_pydicom
from deidfs.export.writer import ExportWriter
from deidfs.secret import load_or_create_key, read_key_file
from deidfs.view.render import Layout

log = logging.getLogger(__name__)

KEY_FILE_ENV = "DEIDFS_KEY_FILE"
#: The name the send state of ``anonymize --to-destination`` is kept under, beside the
#: configured folders' (no folder id starts with a dot): <state_dir>/destinations/NAME/.anonymize
SEND_STATE_NAME = ".anonymize"

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

Writing is atomic and idempotent: each file is written without a name (or, where the file
system cannot, as a temporary dotfile) in its target folder, flushed to disk and only then
given its final name, so no partial file is ever visible under it; an interrupted run leaves
nothing behind (temporary dotfiles are removed by the next run). A target that already holds
the same view is left alone and counted "unchanged".

DIR is taken with its symbolic links resolved, and refused (exit 77) inside a watched folder,
the state directory or the mount of the configuration. Below it, deidfs follows no symbolic
link: every file is written through descriptors of its directories, so a link put in DIR
meanwhile cannot send a file elsewhere.

With --to-destination NAME (instead of --to DIR) the same files, rendered the same way and
refused by the same rules, are sent to the node [destinations.NAME] of the configuration
(--config; C-STORE or STOW-RS), as `deidfs export FOLDER --to-destination NAME` sends: in
batches, retried on temporary failures, with a manifest of each run and a record of what
the node stored under <state_dir>/destinations/NAME/.anonymize/, so that a re-run sends
only the files not stored yet.

With --cluster ADDRESS the same files are rendered and written by the workers of a Dask
cluster (dask.distributed; pip install 'deidfs[cluster]'): local:N starts N worker
processes on this machine, tcp://HOST:PORT or tls://HOST:PORT names a running scheduler
whose workers see SRC and DIR at the same paths (shared storage). The sources are listed
here and cut into batches of at most --batch-size files (a directory's files stay
together), one task each; results are counted here. The output is byte for byte that of a
run without --cluster. A worker that dies has its batch run again on another, which counts
its files once (those already in place "unchanged"); a lost scheduler exits 75 and the
same command run again completes the rest. Tasks are named deidfs-batch-<run>-<n>, never
by a path or a value.
The key on a cluster: with --key-file (or $DEIDFS_KEY_FILE) each worker reads the key from
that file itself (the same path on shared storage; a worker that reads another key refuses
the work, exit 78) and the key never travels. Without, the key is sent in the tasks:
allowed to local:N (loopback) and over tls:// (--tls-ca-file, --tls-cert and
--tls-key, or Dask's distributed.comm.tls configuration), refused over a plain tcp://
scheduler (exit 78) unless --allow-plain-key is given.

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
      (--cluster: a key that may not travel so, TLS files missing, a worker that refuses the
      work: another deidfs version, another key, not the same DIR)
  75  DIR ran out of space (run again once there is room: files in place are complete), or
      --cluster lost the scheduler during the run (run again to complete it)
  69  --to-destination: the node refused the association or stayed unreachable (the files
      stored are recorded: run again to send the others); --cluster: dask.distributed is
      not installed, or the scheduler is unreachable or has no worker
  77  DIR (its symbolic links resolved) is inside a watched folder, the state directory or
      the mount of the configuration; or a symbolic link was put in DIR while writing
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
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="output directory")
    where.add_argument(
        "--to-destination",
        metavar="NAME",
        help="send to the node [destinations.NAME] of the configuration instead of writing files",
    )
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
        "--key-file",
        metavar="FILE",
        help=f"pseudonym key file (default: ${KEY_FILE_ENV}, else as described above)",
    )
    add_writer_options(p)
    add_cluster_options(p)
    p.set_defaults(func=run)


# -- sources ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sources:
    """The files to process: (absolute path, path relative to its SRC folder), in order."""

    files: list[tuple[str, str]]
    skipped: int  #: dotfiles, partial transfers, links and special files


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
            found, skips = walk_sources(path)
            files.extend(found)
            skipped += skips
        elif stat.S_ISREG(st.st_mode):
            files.append((path, os.path.basename(path)))
        else:
            skipped += 1
    return Sources(files, skipped)


# -- key and profile ----------------------------------------------------------------------------
def user_state_dir() -> Path:
    """The per-user state directory used without a configuration."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says relative values are to be ignored
        base = str(Path.home() / ".local" / "state")
    return Path(base) / "deidfs"


def chosen_key_file(key_file: str | None) -> str | None:
    """The key file ``--key-file`` or ``$DEIDFS_KEY_FILE`` names, if any."""
    return key_file or os.environ.get(KEY_FILE_ENV) or None


def load_key(key_file: str | None, config: str | None) -> bytes:
    """The pseudonym key, by the order documented in ``deidfs anonymize --help``."""
    chosen = chosen_key_file(key_file)
    if chosen:
        return read_key_file(Path(chosen))
    cfg = config_path(config)
    if cfg is not None:
        return load_or_create_key(load_config(cfg).daemon.state_dir)
    return load_or_create_key(user_state_dir())


def _forbidden_places(key_file: str | None, config: str | None) -> list[Place]:
    """Where DIR may not be: the configuration's watched folders, state directory and mount
    (when there is a configuration), and the state directory whose key is used."""
    cfg = config_path(config)
    if cfg is not None:
        return forbidden_places(load_config(cfg))
    if key_file or os.environ.get(KEY_FILE_ENV):
        return []
    return forbidden_places(None, user_state_dir())


# -- progress and summary -----------------------------------------------------------------------
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
            refused_note(sorted(tally.refused.items())),
        ),
        ("failed", tally.failed, ""),
        (
            "duplicate",
            tally.by_status["duplicate"],
            "same output name as another file; the first by source path is kept",
        ),
        ("skipped", tally.skipped, "dotfiles, partial transfers, links"),
    ]
    print_rows(rows, out)


def _max_header_bytes(config: str | None) -> int | None:
    """The header bound of the configuration, if there is one (the default otherwise)."""
    path = config_path(config)
    return None if path is None else load_config(path).daemon.max_header_bytes


# -- the command --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run ``deidfs anonymize``; returns the exit code."""
    problem = cluster_usage_error(args, "anonymize")
    if problem is not None:
        print(f"deidfs anonymize: {problem}", file=sys.stderr)
        return 2
    config = getattr(args, "config", None)
    profiles = load_profiles(config)
    profile = profiles.get(args.profile)
    if profile is None:
        raise NotFound(f"no profile named {args.profile!r} (have: {', '.join(sorted(profiles))})")
    if not profile.enabled:
        raise ProfileError(f"profile {profile.name!r} is disabled")
    plan = compile_plan(profile)
    key = load_key(args.key_file, config)
    pseudo = Pseudonymizer(key)
    options = cluster_options(args)
    # Before anything is written: a key that may not travel so stops the command here.
    keys = cluster_key(options, key, chosen_key_file(args.key_file))
    layout = Layout(args.layout)
    sources = collect_sources(args.src)
    if args.to_destination is not None:
        return _send(args, config, profile, pseudo, layout, sources)
    try:
        places = _forbidden_places(args.key_file, config)
        out = resolve_destination(Path(args.to), places)
        writer = ExportWriter(out, durable=not args.no_fsync, guard=guard_of(places))
        writer.check_root()
    except ExportError as exc:
        print(f"deidfs: {exc}", file=sys.stderr)
        return exc.exit_code
    workers = min(args.workers or os.cpu_count() or 1, max(1, len(sources.files)))

    def write(runner: Runner) -> int:
        return _write(args, runner, writer, plan, pseudo, layout, sources, config)

    try:
        with sigterm_interrupts():
            return run_with_runner(options, keys, workers, args.quiet, write)
    finally:
        writer.close()  # its directory descriptors


def _write(
    args: argparse.Namespace,
    runner: Runner,
    writer: ExportWriter,
    plan: Plan,
    pseudo: Pseudonymizer,
    layout: Layout,
    sources: Sources,
    config: str | None,
) -> int:
    """Write every source with ``runner``; the exit code."""
    out = writer.root
    job = Job(
        plan,
        pseudo,
        out,
        layout,
        not args.no_fsync,
        os.getpid(),
        out_id=writer.root_id,
        guard=writer.guard,
        max_header_bytes=_max_header_bytes(config),
    )
    files = sources.files
    tally = Tally(skipped=sources.skipped)
    claims = Claims([path for path, _ in files])
    progress = Progress(len(files), sys.stderr, sys.stderr.isatty() and not args.quiet)
    fatal: list[FileResult] = []

    def show(res: FileResult) -> None:
        if res.status == "failed" or not args.quiet:
            progress.clear()
            token = pseudo.token(files[res.index][0], "path")[:12]
            print(f"deidfs: {res.status} ({res.detail}): file {token}", file=sys.stderr)

    def report(results: list[FileResult]) -> None:
        for res in results:
            if res.status in ("refused", "failed"):
                tally.add(res.status, res.detail)
                if res.fatal:
                    if fatal:
                        continue  # the files after the first of a full disk say the same
                    fatal.append(res)
                show(res)
            else:
                claims.add(res)
        progress.advance(len(results))

    def lost(chunk: list[Item], why: str) -> list[FileResult]:
        return [FileResult(index, "failed", why, reason="worker_failed") for index, _, _ in chunk]

    items = [(index, path, rel) for index, (path, rel) in enumerate(files)]
    start = time.monotonic()
    with quiet_pydicom():
        try:
            finished = runner.run(job, items, report, lost)
        except BaseException:
            claims.discard_pending(writer)
            raise
        finally:
            progress.clear()
    if not finished:
        # The output takes no more files (full, read-only): what is in place is complete.
        for res in claims.in_place():
            tally.add(res.status, "", res.size)
        claims.discard_pending(writer)
        writer.finish()
        runner.finished(writer)
        if not args.quiet:
            _summary(tally, time.monotonic() - start, sys.stdout)
        first = fatal[0] if fatal else None
        detail = first.detail if first is not None else "interrupted"
        code = os.EX_TEMPFAIL if first is None else stopped_exit_code(first.reason)
        raise ExportStopped(f"stopped: {detail}", exit_code=code)
    for res in claims.settle(writer):
        tally.add(res.status, res.detail, res.size)
        if res.status == "failed":
            show(res)
    runner.finished(writer)
    seconds = time.monotonic() - start
    if not args.quiet:
        _summary(tally, seconds, sys.stdout)
    return 1 if tally.failed else 0


def _send(
    args: argparse.Namespace,
    config_arg: str | None,
    profile: Profile,
    pseudo: Pseudonymizer,
    layout: Layout,
    sources: Sources,
) -> int:
    """``--to-destination``: send the files ``--to`` would write, with deidfs export's sender."""

    config = required_config(
        config_arg, "--to-destination needs a configuration with [destinations]"
    )
    dest = destination_of(config, args.to_destination)
    # The first source by path takes a view path two sources share, as with --to.
    files = sorted(sources.files)
    items = [(index, src, rel) for index, (src, rel) in enumerate(files)]
    folder = FolderConfig(SEND_STATE_NAME, Path("/"), profile.name, layout)
    source_set = SourceSet(folder, profile, compile_plan(profile), files, sources.skipped, items)
    terminal = Terminal(args.quiet, sys.stderr)
    with sigterm_interrupts():
        try:
            summary = send_sources(config, source_set, dest, pseudo, listener=terminal)
        finally:
            terminal.clear()
    title = f"deidfs anonymize: {len(files)} files"
    return sent_exit_code(summary, args.quiet, "anonymize", title)
