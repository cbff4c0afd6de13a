"""``deidfs export FOLDER``: permanent de-identified copies of what the mount serves.

The work is :func:`deidfs.export.folder.export_folder`, in this process (which then reads the
installation's key) or, with ``--via-daemon``, in the running daemon through its control
socket (the key never leaves the daemon). This module parses arguments, shows progress and
the summary, and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from deidfs.cli.common import (
    add_cluster_options,
    add_writer_options,
    cluster_usage_error,
    required_config,
)
from deidfs.cli.oneshot import cluster_key, cluster_options, run_with_runner, sigterm_interrupts
from deidfs.cli.terminal import Terminal, print_rows, refused_note, sent_exit_code
from deidfs.config.model import Config
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import SecretError
from deidfs.export.cluster_config import ClusterOptions, KeySource
from deidfs.export.folder import export_folder
from deidfs.export.selection import Selection
from deidfs.export.send import SendSummary, send_folder
from deidfs.export.summary import ExportStopped, ExportSummary
from deidfs.export.workers import Runner
from deidfs.ops.control_client import call
from deidfs.ops.control_protocol import ErrorCode, Reply
from deidfs.secret import load_or_create_key, read_key_file

#: How long ``--via-daemon`` waits for the daemon's answer (an export can be long).
DAEMON_TIMEOUT_SECONDS = 24 * 3600.0

DESCRIPTION = """\
Write permanent de-identified copies of a configured folder's files: exactly the bytes the
mount serves (same profile, same key), under the path it serves them, into
<export_dir>/FOLDER/ ([daemon] export_dir), or DIR/FOLDER/ with --to DIR. `deidfs verify
FOLDER --export [DIR]` checks such a tree against the originals.

Selection (without any, the whole folder). Each option may be repeated: values of one
option are ORed, different options are ANDed (--study A --study B --patient P: the files of
study A or B that belong to patient P). Every value must match some file, else nothing is
written (exit 66).
  --study UID       StudyInstanceUID, original (as in your PACS) or de-identified (as served)
  --patient ID      PatientID, original or de-identified (the token the mount shows)
  --accession NO    AccessionNumber, original or as served
  --path REL        a file or directory: relative to the folder (its original layout) or to
                    <mountpoint>/FOLDER (the served layout); an absolute path under either
A selection is matched by rendering every file's header first (a scan), then the selected
files are exported. Files the profile withholds (not DICOM, unsafe) are never exported.

The export is atomic per file and idempotent: each file is written without a name (or, where
the file system cannot, as a temporary dotfile) beside its target, flushed to disk and only
then given its name, so no partial file is ever visible under it; a file already in place
with the same bytes is left alone. An export that was killed, or stopped on a full disk,
resumes where it was when run again; temporary dotfiles left behind are removed by the next
run. A re-run that finds everything in place writes nothing and says so.

Manifest: an export that writes anything also writes FOLDER/.deidfs-manifest-<UTC time>.jsonl,
one JSON object per line for every file of the selection (path, size, sha256, status,
de-identified StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and PatientID, profile,
plan digest, deidfs version, time), then one summary line (counts). It holds no original
identifier and no original path (under the mirror layout, the files are named by their
original relative paths, and so are their lines).

Destinations: --to-destination NAME sends the same bytes to the node [destinations.NAME]:
kind = "dicom" by C-STORE, one association per batch_size files, each file in its own
transfer syntax, Explicit VR Little Endian only as a fallback for uncompressed files;
kind = "dicomweb" by STOW-RS, one request per study. Temporary failures (association
refused for now or aborted, unreachable, timeouts, HTTP 408/429/5xx, status 0xA7xx) are
retried with backoff; a permanent refusal (wrong AE title, HTTP 4xx) stops at once.
Files stored are recorded, by view path and SHA-256, in [daemon]
state_dir/destinations/NAME/FOLDER/sent.jsonl: a re-run sends only the others. Each run
writes .deidfs-manifest-<UTC time>.jsonl there (every file: stored, warning with its
status, failed with its reason, or already_stored).

With --cluster ADDRESS the scan and the writing run on the workers of a Dask cluster
(dask.distributed; pip install 'deidfs[cluster]'), as `deidfs anonymize --cluster` runs
them (see its help): local:N, or a scheduler tcp://HOST:PORT or tls://HOST:PORT whose
workers see the folder and the destination at the same paths. The files, the manifest and
the summary are those of a run without --cluster; the manifest is written here. The key:
with --key-file FILE (a copy of [daemon] state_dir/secret.key on storage the workers share;
it must hold the same key) each worker reads it itself; without, the key is sent in the
task, allowed to local:N and over tls://, refused over a plain tcp:// scheduler unless
--allow-plain-key is given.

Without --via-daemon this command reads the configuration's pseudonym key
([daemon] state_dir/secret.key). With --via-daemon the running daemon exports with its own
key: an operator needs access to the control socket only, not to the key. The daemon
writes only inside its [daemon] export_dir (a --to DIR must lie there), one export at a time,
and shows no progress bar: it answers once the export is done.

Confinement: DIR/FOLDER (or <export_dir>/FOLDER) is taken with its symbolic links resolved
and refused (exit 77) when it is, or is inside, a watched folder's source directory (the
daemon would take its own output as new sources), the state directory (but the export_dir
that lies in it) or the mount; through the daemon, also when it is not inside export_dir.
Below it, deidfs follows no symbolic link: every file is written through descriptors of its
directories, so a link put there meanwhile cannot send a file elsewhere.
"""

EPILOG = """\
exit codes:
  0   every selected file is in place (written or unchanged); refused files are withheld by
      the profile (fail closed), not errors
  1   some file could not be read consistently or written (the others are in place)
  66  unknown folder, profile, study, patient, accession or path; nothing is written
  69  --via-daemon: the daemon is not running; --to-destination: the node refused the
      association for good or stayed unreachable after its retries (what was stored is
      recorded: the next run sends the rest); --cluster: dask.distributed missing, the
      scheduler unreachable or without workers
  73  the destination cannot be created or written; 75 the destination is full (free space
      and run again: it resumes), or --cluster lost its scheduler (run again: it
      resumes); 77 no access to the control socket, or the destination is refused (see
      Confinement); 78 bad configuration, disabled profile, unreadable key, a key file
      or a worker that does not hold the configuration's key, a key that may not travel
"""

#: Exit codes of the daemon's error codes (``--via-daemon``).
_EXIT_CODES = {
    ErrorCode.BAD_REQUEST: os.EX_USAGE,
    ErrorCode.UNSUPPORTED_VERSION: os.EX_UNAVAILABLE,
    ErrorCode.UNKNOWN_COMMAND: os.EX_UNAVAILABLE,
    ErrorCode.NOT_AVAILABLE: os.EX_UNAVAILABLE,
    ErrorCode.CONFIG_INVALID: os.EX_CONFIG,
    ErrorCode.NOT_FOUND: os.EX_NOINPUT,
    ErrorCode.BUSY: os.EX_TEMPFAIL,
    ErrorCode.FAILED: 1,
    ErrorCode.INTERNAL: os.EX_SOFTWARE,
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``export`` to ``sub``."""
    p = sub.add_parser(
        "export",
        help="write de-identified copies of a folder, as the mount serves them",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="a folder id of the configuration")
    for name, metavar, what in (
        ("study", "UID", "StudyInstanceUID"),
        ("patient", "ID", "PatientID"),
        ("accession", "NO", "AccessionNumber"),
    ):
        p.add_argument(
            f"--{name}",
            action="append",
            default=[],
            metavar=metavar,
            help=f"only files with this {what}, original or de-identified (repeatable)",
        )
    p.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="REL",
        help="only this file or directory, relative to the folder or to its mount (repeatable)",
    )
    p.add_argument(
        "--to",
        metavar="DIR",
        help="export directory instead of [daemon] export_dir; files go to DIR/FOLDER/",
    )
    p.add_argument(
        "--to-destination",
        metavar="NAME",
        help="send to the node [destinations.NAME] (C-STORE) instead of writing files",
    )
    p.add_argument("--profile", metavar="NAME", help="a profile instead of the folder's")
    p.add_argument(
        "--via-daemon",
        action="store_true",
        help="ask the running daemon to export (through [daemon] control_socket), with its key",
    )
    add_writer_options(p)
    group = add_cluster_options(p)
    group.add_argument(
        "--key-file",
        metavar="FILE",
        help="--cluster: workers read the key from FILE (shared storage), which must hold "
        "the configuration's key; without, the key is sent in the tasks",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deidfs export``; returns the exit code."""
    problem = cluster_usage_error(args, "export")
    if problem is None and args.key_file and args.cluster is None:
        problem = "--key-file needs --cluster (without, the configuration's key is used)"
    if problem is not None:
        print(f"deidfs export: {problem}", file=sys.stderr)
        return 2
    config = required_config(getattr(args, "config", None), "no configuration")
    selection = Selection(
        study=tuple(args.study),
        patient=tuple(args.patient),
        accession=tuple(args.accession),
        path=tuple(args.path),
    )
    if args.to_destination is not None and args.to:
        print("deidfs export: --to-destination cannot be used with --to", file=sys.stderr)
        return 2
    if args.via_daemon:
        return _via_daemon(args, config, selection)
    try:
        key = load_or_create_key(config.daemon.state_dir)
    except SecretError as exc:
        raise SecretError(f"{exc} (to export without reading the key, use --via-daemon)") from None
    options = cluster_options(args)
    if options is not None and args.key_file and read_key_file(Path(args.key_file)) != key:
        raise SecretError(
            "--key-file holds another key than the configuration's state directory: the "
            "export would not be what the mount serves"
        )
    keys = cluster_key(options, key, args.key_file)  # before anything is written
    terminal = Terminal(args.quiet, sys.stderr)
    with sigterm_interrupts():
        if args.to_destination is not None:
            try:
                return _send(args, config, Pseudonymizer(key), selection, terminal)
            finally:
                terminal.clear()
        return _export(args, config, key, selection, terminal, options, keys)


def _export(
    args: argparse.Namespace,
    config: Config,
    key: bytes,
    selection: Selection,
    terminal: Terminal,
    options: ClusterOptions | None,
    keys: KeySource | None,
) -> int:
    """Export the folder with this process's workers or the cluster; the exit code."""
    workers = args.workers or os.cpu_count() or 1

    def export(runner: Runner) -> int:
        summary = export_folder(
            config,
            args.folder,
            Pseudonymizer(key),
            selection=selection,
            to=Path(args.to) if args.to else None,
            profile=args.profile,
            workers=workers,
            durable=not args.no_fsync,
            listener=terminal,
            runner=runner,
        )
        terminal.clear()
        if not args.quiet:
            print_summary(summary, sys.stdout)
        return 1 if summary.failed else 0

    try:
        return run_with_runner(options, keys, workers, args.quiet, export)
    except ExportStopped as exc:
        terminal.clear()
        if exc.summary is not None and not args.quiet:
            print_summary(exc.summary, sys.stdout)
        print(f"deidfs export: {exc}", file=sys.stderr)
        print(
            "deidfs export: the files in place are complete; run the same export again to resume",
            file=sys.stderr,
        )
        return exc.exit_code
    finally:
        terminal.clear()


def _send(
    args: argparse.Namespace,
    config: Config,
    pseudonymizer: Pseudonymizer,
    selection: Selection,
    terminal: Terminal,
) -> int:
    summary = send_folder(
        config,
        args.folder,
        args.to_destination,
        pseudonymizer,
        selection=selection,
        profile=args.profile,
        listener=terminal,
    )
    terminal.clear()
    return sent_exit_code(summary, args.quiet)


def _via_daemon(args: argparse.Namespace, config: Config, selection: Selection) -> int:
    if args.no_fsync:
        print("deidfs export: --no-fsync cannot be used with --via-daemon", file=sys.stderr)
        return 2
    request: dict[str, Any] = {"folder": args.folder}
    for kind, values in selection.kinds():
        request[kind] = list(values)
    if args.to:
        # The daemon runs elsewhere: a relative DIR means this shell's working directory.
        request["to"] = os.path.abspath(args.to)
    if args.profile:
        request["profile"] = args.profile
    if args.workers:
        request["workers"] = args.workers
    if args.to_destination is not None:
        request["destination"] = args.to_destination
    reply = call(config.daemon.control_socket, "export", request, timeout=DAEMON_TIMEOUT_SECONDS)
    if reply.ok and args.to_destination is not None:
        return sent_exit_code(SendSummary.from_json(reply.result), args.quiet)
    if reply.ok:
        summary = ExportSummary.from_json(reply.result)
        if not args.quiet:
            print_summary(summary, sys.stdout)
        return 1 if summary.failed else 0
    return _failure(reply)


def _failure(reply: Reply) -> int:
    error = reply.error
    assert error is not None
    code = _EXIT_CODES.get(error.code, 1)
    for detail in error.details:
        # The daemon may name the exit code the same export would have in this process.
        key, _, value = detail.partition("=")
        if key == "exit_code" and value.isdigit() and 0 < int(value) < 126:
            code = int(value)
    print(f"deidfs export: the daemon refused: {error.message}", file=sys.stderr)
    return code


def print_summary(summary: ExportSummary, out: TextIO) -> None:
    """The summary of an export, for people."""
    seconds = summary.seconds
    rate = summary.written / seconds if seconds > 0 else 0.0
    mbps = summary.bytes / seconds / 1e6 if seconds > 0 else 0.0
    print(
        f"deidfs export {summary.folder} (profile {summary.profile}): {summary.files} files "
        f"in place in {seconds:.2f} s ({rate:.0f} files/s, {mbps:.0f} MB/s written) at "
        f"{summary.destination}",
        file=out,
    )
    replaced = summary.replaced
    rows = [
        ("written", summary.written, f"{replaced} replaced an older file" if replaced else ""),
        ("unchanged", summary.unchanged, "already in place"),
        (
            "refused",
            summary.refused_total,
            refused_note(summary.refused),
        ),
        ("failed", summary.failed, ""),
        (
            "duplicate",
            summary.duplicates,
            "same output name as another file; the first by source path is kept, as served",
        ),
        ("skipped", summary.skipped, "dotfiles, partial transfers, links"),
    ]
    print_rows(rows, out)
    if summary.manifest:
        print(f"manifest: {summary.manifest}", file=out)
    elif not summary.files:
        print("nothing to export: no file of the folder is served", file=out)
    elif summary.complete and not summary.failed:
        print(
            f"nothing new: all {summary.files} files were already in place; no manifest written",
            file=out,
        )
