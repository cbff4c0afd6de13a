"""Export a configured folder as the mount serves it.

Views are written by :class:`~deidfs.export.writer.ExportWriter` (atomically, durably,
idempotently, following no symbolic link). Destinations are resolved and checked before that
(:func:`~deidfs.export.confinement.resolve_destination`): never in a watched folder, the state
directory or the mount, and through the daemon only inside ``export_dir``.

Exports of a configured folder (``deidfs export`` and the control socket's ``export``)
are :func:`export_folder`; the daemon calls it as::

    summary = export_folder(
        config, req.folder, pseudonymizer,            # the daemon's config and key
        selection=Selection(req.study, req.patient, req.accession, req.path),
        to=Path(req.to) if req.to else None, profile=req.profile,
        workers=req.workers, confine=True,            # --to only inside export_dir
        metrics=metrics, stop=stopping_event,
        # headers rendered while indexing: an export of indexed files is mostly copying
        cached=lambda path, state: header_cache.get((path, state, folder_view_digest)),
    )
    reply = summary.to_json()                         # ExportSummary.from_json reads it back

and maps its errors: :class:`~deidfs.errors.NotFound` (unknown folder, profile, selector:
nothing written) to ``not_found``; any other :class:`~deidfs.errors.DeidfsError` to
``failed`` with the detail ``exit_code=<n>`` (the exit code the same export has in the
command: 73 unwritable, 75 full or cancelled, 77 ``to`` refused, 78 disabled profile).
:func:`export_folder` counts its own metrics (per file and ``export_finished``).

Its sources are the files the watcher takes (:func:`~deidfs.export.selection.walk_sources`),
read with the folder's profile (or another) and the key, in worker processes
(:func:`~deidfs.export.workers.run_batch`, the :class:`~deidfs.export.workers.PoolRunner`; or a
Dask cluster's workers, :mod:`deidfs.export.cluster`) that render and write a chunk of files
each; the coordinating process settles sources naming one target
(:class:`~deidfs.export.claims.Claims`, the first by path wins, as in the mount) and writes a
manifest. A full or read-only output stops the batch at once
(:class:`~deidfs.export.summary.ExportStopped`): files in place are complete, temporary files
are removed, and the next run resumes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import (
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NoReturn

from deidfs import __version__
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound, ProfileError
from deidfs.export.claims import Claims
from deidfs.export.confinement import (
    _precheck_destination,
    forbidden_places,
    guard_of,
    resolve_destination,
)
from deidfs.export.dirs import (
    open_beneath,
)
from deidfs.export.errors import ExportError, _oserror, stopped_exit_code
from deidfs.export.files import sha256_fd
from deidfs.export.manifest import write_manifest_file
from deidfs.export.outcomes import Outcome
from deidfs.export.selection import (
    Matcher,
    Selection,
    ServedIds,
    make_matcher,
    walk_sources,
)
from deidfs.export.summary import ExportListener, ExportStopped, ExportSummary, _iso, _utcnow
from deidfs.export.workers import (
    FileResult,
    Item,
    Job,
    PoolRunner,
    Runner,
    ScanJob,
    ScanResult,
    StopFlag,
    quiet_pydicom,
)
from deidfs.export.writer import ExportWriter, ViewLookup

if TYPE_CHECKING:
    from deidfs.config.model import Config, FolderConfig
    from deidfs.ops.metrics import Metrics

log = logging.getLogger(__name__)


# -- folder export ------------------------------------------------------------------------------
@dataclass
class _Tally:
    written: int = 0
    replaced: int = 0
    unchanged: int = 0
    failed: int = 0
    duplicates: int = 0
    bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class _FolderExport:
    """One export of one folder (see :func:`export_folder`)."""

    def __init__(
        self,
        folder: FolderConfig,
        profile: Profile,
        plan: Plan,
        pseudo: Pseudonymizer,
        dest: Path,
        *,
        workers: int,
        durable: bool,
        listener: ExportListener,
        metrics: Metrics | None,
        stop: StopFlag | None,
        clock: Callable[[], dt.datetime],
        cached: ViewLookup | None,
        max_header_bytes: int | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.runner: Runner = runner if runner is not None else PoolRunner(workers)
        self.cached = cached
        self.max_header_bytes = max_header_bytes
        self.folder = folder
        self.profile = profile
        self.plan = plan
        self.pseudo = pseudo
        self.dest = dest
        self.workers = workers
        self.durable = durable
        self.listener = listener
        self.metrics = metrics
        self.stop = stop
        self.clock = clock
        self.started = clock()
        self.start = time.monotonic()
        self.files: list[tuple[str, str]] = []
        self.skipped = 0
        self.selected = 0
        self.tally = _Tally()
        self.final: list[tuple[FileResult, str]] = []  #: (result, time) of files in place
        self.fatal: FileResult | None = None

    # -- phases ---------------------------------------------------------------------------------
    def scan(self, matcher: Matcher) -> list[Item]:
        """Which sources to write: the first source (by path) of every view path that a
        matching source has. Raises NotFound for a selector that matches nothing."""
        job = ScanJob(self.plan, self.pseudo, self.folder.layout, matcher, self.max_header_bytes)
        items = [(i, p, r) for i, (p, r) in enumerate(self.files)]
        self.listener.phase("scan", len(items))
        scanned: list[ScanResult] = []

        def report(results: list[ScanResult]) -> None:
            scanned.extend(results)
            self.listener.advance(len(results))

        def lost(chunk: list[Item], why: str) -> list[ScanResult]:
            return [ScanResult(i, refused="worker_failed") for i, _, _ in chunk]

        if not self.runner.run(job, items, report, lost, self.stop, self.cached):
            self._raise_stopped()
        matched: set[tuple[str, int]] = set()
        winners: dict[str, int] = {}
        chosen: set[str] = set()
        selection = {
            "study": matcher.study,
            "patient": matcher.patient,
            "accession": matcher.accession,
            "path": matcher.paths,
        }
        kinds = [k for k, v in selection.items() if v]
        for res in scanned:
            if not res.relpath:
                continue
            matched |= res.matched
            best = winners.get(res.relpath)
            if best is None or self.files[res.index][0] < self.files[best][0]:
                winners[res.relpath] = res.index
            if all(any(m[0] == kind for m in res.matched) for kind in kinds):
                chosen.add(res.relpath)
        for kind in kinds:
            values = selection[kind]
            for n in range(len(values)):
                if (kind, n) not in matched:
                    raise NotFound(
                        f"--{kind} #{n + 1} of {len(values)} matches no file that folder "
                        f"{self.folder.id!r} serves"
                    )
        if not chosen:
            raise NotFound(
                f"no file that folder {self.folder.id!r} serves matches all of the selection "
                "(each selector matches some file, but not together)"
            )
        return sorted(((winners[r], *self.files[winners[r]]) for r in chosen), key=lambda it: it[0])

    def write(self, items: list[Item], writer: ExportWriter) -> None:
        """Write ``items`` and settle their targets; record what ended in place."""
        job = Job(
            self.plan,
            self.pseudo,
            self.dest,
            self.folder.layout,
            self.durable,
            os.getpid(),
            describe=True,
            out_id=writer.root_id,
            guard=writer.guard,
            max_header_bytes=self.max_header_bytes,
        )
        self.selected = len(items)
        claims = Claims([p for p, _ in self.files])
        self.listener.phase("export", len(items))

        def report(results: list[FileResult]) -> None:
            for res in results:
                if res.status in ("refused", "failed"):
                    self._count(res)
                else:
                    claims.add(res)
            self.listener.advance(len(results))

        def lost(chunk: list[Item], why: str) -> list[FileResult]:
            return [FileResult(i, "failed", why, reason="worker_failed") for i, _, _ in chunk]

        try:
            finished = self.runner.run(job, items, report, lost, self.stop, self.cached)
        except BaseException:
            claims.discard_pending(writer)
            raise
        if not finished:
            # Complete files already in place still count; pending ones are dropped.
            for res in claims.in_place():
                self._count(res)
            claims.discard_pending(writer)
            writer.finish()
            self.runner.finished(writer)
            self._raise_stopped()
        for res in claims.settle(writer):
            self._count(res)
        self.runner.finished(writer)
        if self.fatal is not None:
            self._raise_stopped()

    def _count(self, res: FileResult) -> None:
        t = self.tally
        status = res.status
        folder = self.folder.id
        if status == "refused":
            t.refused[res.detail] += 1
            self.listener.file(status, res.detail, self._token(res.index))
            return
        if status == "failed":
            t.failed += 1
            if res.fatal and self.fatal is None:
                self.fatal = res
            if self.metrics is not None:
                self.metrics.export_failure(folder, res.reason or "io_error")
            if not res.fatal or self.fatal is res:
                self.listener.file(status, res.detail, self._token(res.index))
            return
        if status == "duplicate":
            t.duplicates += 1
            return
        if status == Outcome.UNCHANGED.value:
            t.unchanged += 1
        else:
            t.written += 1
            t.bytes += res.size
            if status == Outcome.REPLACED.value:
                t.replaced += 1
        if self.metrics is not None:
            self.metrics.export_file(folder, status, res.size)
        self.final.append((res, _iso(self.clock())))

    def _token(self, index: int) -> str:
        return self.pseudo.token(self.files[index][0], "path")[:12]

    def _raise_stopped(self) -> NoReturn:
        summary = self.summary("", complete=False)
        fatal = self.fatal
        if fatal is None:
            raise ExportStopped(
                "the export was cancelled", summary=summary, exit_code=os.EX_TEMPFAIL
            )
        code = stopped_exit_code(fatal.reason)
        raise ExportStopped(f"export stopped: {fatal.detail}", summary=summary, exit_code=code)

    # -- manifest -------------------------------------------------------------------------------
    def hash_unchanged(self, root_fd: int) -> None:
        """Hash the files found already in place (below the open directory ``root_fd``), so
        the manifest covers the selection."""
        todo = [i for i, (res, _) in enumerate(self.final) if not res.sha256]

        def digest(i: int) -> str:
            res = self.final[i][0]
            try:
                fd = open_beneath(root_fd, PurePosixPath(res.relpath))
            except (OSError, ExportError):
                return ""
            try:
                return sha256_fd(fd, res.size)
            except OSError:
                return ""
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max(1, min(self.workers, 8))) as pool:
            for i, value in zip(todo, pool.map(digest, todo), strict=True):
                res, when = self.final[i]
                self.final[i] = (replace(res, sha256=value), when)

    def write_manifest(self, root_fd: int) -> Path:
        """Write the manifest atomically next to the files (in the open directory
        ``root_fd``); returns its path."""
        lines = []
        common = {
            "profile": self.profile.name,
            "plan_digest": self.plan.digest,
            "deidfs_version": __version__,
        }
        for res, when in sorted(self.final, key=lambda rw: rw[0].relpath):
            ids = res.ids or ServedIds()
            record = {
                "type": "file",
                "path": res.relpath,
                "size": res.size,
                "sha256": res.sha256,
                "status": res.status,
                "StudyInstanceUID": ids.StudyInstanceUID,
                "SeriesInstanceUID": ids.SeriesInstanceUID,
                "SOPInstanceUID": ids.SOPInstanceUID,
                "PatientID": ids.PatientID,
                **common,
                "time": when,
            }
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        summary = self.summary("")
        tail = {
            "type": "summary",
            "folder": self.folder.id,
            **common,
            "started": _iso(self.started),
            "finished": _iso(self.clock()),
            "files": summary.files,
            "written": summary.written,
            "replaced": summary.replaced,
            "unchanged": summary.unchanged,
            "failed": summary.failed,
            "duplicates": summary.duplicates,
            "refused": dict(summary.refused),
            "skipped": summary.skipped,
            "sources": summary.sources,
            "selected": summary.selected,
            "bytes": summary.bytes,
        }
        lines.append(json.dumps(tail, ensure_ascii=False, separators=(",", ":")))
        data = ("\n".join(lines) + "\n").encode()
        return write_manifest_file(
            self.dest, self.started, data, durable=self.durable, dir_fd=root_fd
        )

    def summary(self, manifest: str, *, complete: bool = True) -> ExportSummary:
        t = self.tally
        return ExportSummary(
            folder=self.folder.id,
            profile=self.profile.name,
            plan_digest=self.plan.digest,
            destination=str(self.dest),
            sources=len(self.files),
            selected=self.selected,
            files=t.written + t.unchanged,
            written=t.written,
            replaced=t.replaced,
            unchanged=t.unchanged,
            failed=t.failed,
            duplicates=t.duplicates,
            skipped=self.skipped,
            refused=tuple(sorted(t.refused.items())),
            bytes=t.bytes,
            seconds=time.monotonic() - self.start,
            manifest=manifest,
            complete=complete,
        )


def _hash_and_write_manifest(run: _FolderExport, writer: ExportWriter) -> Path:
    try:
        root_fd = writer.root_fd()
    except OSError as exc:
        raise _oserror("cannot write the manifest", exc) from None
    run.hash_unchanged(root_fd)
    return run.write_manifest(root_fd)


def export_folder(
    config: Config,
    folder_id: str,
    pseudonymizer: Pseudonymizer,
    *,
    selection: Selection | None = None,
    to: Path | None = None,
    profile: str | None = None,
    workers: int | None = 1,
    durable: bool = True,
    confine: bool = False,
    listener: ExportListener | None = None,
    metrics: Metrics | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    cached: ViewLookup | None = None,
    runner: Runner | None = None,
) -> ExportSummary:
    """Export a configured folder as the mount serves it: ``deidfs export`` and the control
    socket's ``export`` command both call this.

    Every file is rendered with the folder's profile (or ``profile``) and ``pseudonymizer``
    (the installation's key) and written with :class:`~deidfs.export.writer.ExportWriter` to
    ``<to or [daemon] export_dir>/<folder>/<view path>``: the bytes the mount serves, under
    the path it serves them, written atomically; files already in place are left alone.
    Sources are the files the watcher takes (:func:`~deidfs.export.selection.walk_sources`); no
    index is needed.

    With a non-empty ``selection``, every source's header is rendered first (a scan) and
    matched; nothing is written unless each selector matches a file. Several sources with
    one view path: the first by source path is exported, as the mount serves it.

    A manifest, ``.deidfs-manifest-<UTC time>.jsonl`` in ``<...>/<folder>``, lists every
    file of the selection (path, size, SHA-256, served identifiers, profile, plan digest,
    version, time) and ends with a summary line; it holds no original identifier and no
    source path. It is written only when this export put a file in place: a re-run that
    finds everything in place writes nothing.

    Parameters
    ----------
    config
        The configuration: its folders, profiles, ``export_dir`` and ``mountpoint``.
    folder_id
        The folder to export.
    pseudonymizer
        The installation's key (the daemon's).
    selection
        Which files (:class:`~deidfs.export.selection.Selection`); None or empty: all.
    to
        Export directory instead of ``[daemon] export_dir``; files go to ``to/<folder>``.
    profile
        A profile name instead of the folder's.
    workers
        Worker processes (1 or None: all in this thread). From a process with other
        threads (the daemon), workers start through a fork server (see
        :func:`~deidfs.export.workers.pool_context`).
    durable
        fsync each file and directory before it appears.
    confine
        Refuse a destination outside ``export_dir``, symbolic links resolved (exports
        requested through the daemon).
    listener
        Progress hooks.
    metrics
        Counted per file (``export_file``, ``export_failure``) and per export.
    stop
        Set from another thread to cancel: the export stops after the files in progress
        and raises :class:`~deidfs.export.summary.ExportStopped` (exit 75).
    clock
        Wall clock (UTC) for the manifest; injectable for tests.
    cached
        Views the caller holds already (the daemon's header cache of this folder), by
        absolute source path and state, built with the folder's own profile, layout and
        key: a hit is not rendered again, so an export of indexed files is mostly copying.
        Ignored when ``profile`` names another profile. Runs the export in this thread.
    runner
        Where the scan and the writing run (default: :class:`~deidfs.export.workers.PoolRunner` of
        ``workers``);
        :class:`deidfs.export.cluster.ClusterRunner` runs them on a Dask cluster. Counting,
        settling and the manifest stay in this process either way.

    Returns
    -------
    ExportSummary
        Counts, destination and manifest path. ``failed`` > 0 when some source could not be
        read or its file not written (the others are in place).

    Raises
    ------
    NotFound
        Unknown folder or profile, a missing folder directory, a selector that matches
        nothing (exit 66). Nothing is written.
    ProfileError
        The profile is disabled (exit 78). Nothing is written.
    ExportRefused
        A destination (links resolved) in a watched folder, the state directory or the
        mount, or outside ``export_dir`` with ``confine`` (exit 77). Nothing is written.
    ExportError
        The destination cannot be created or written (exit 73).
    ExportStopped
        The output failed during the export (full: exit 75; read-only or not permitted:
        73; a symbolic link swapped in: 77) or it was cancelled (75). Files in place are
        complete, no temporary file is left, no manifest is written; running the export
        again resumes it.
    """
    listener = listener if listener is not None else ExportListener()
    folder = config.folders.get(folder_id)
    if folder is None:
        known = ", ".join(sorted(config.folders)) or "none"
        raise NotFound(f"no folder {folder_id!r} in the configuration (have: {known})")
    name = profile or folder.profile
    prof = config.profiles.get(name)
    if prof is None:
        raise NotFound(f"no profile named {name!r} (have: {', '.join(sorted(config.profiles))})")
    if not prof.enabled:
        raise ProfileError(f"profile {name!r} is disabled")
    plan = compile_plan(prof)
    root = Path(os.path.abspath(folder.path))
    if not root.is_dir():
        raise NotFound(f"folder {folder.id!r}: its source directory does not exist")
    export_dir = Path(os.path.abspath(config.daemon.export_dir))
    base = Path(os.path.abspath(to)) if to is not None else export_dir
    places = forbidden_places(config)
    dest = resolve_destination(base / folder.id, places, within=export_dir if confine else None)
    sel = selection if selection is not None else Selection()
    mount_root = Path(os.path.abspath(config.daemon.mountpoint)) / folder.id
    matcher = None if sel.empty else make_matcher(sel, root, mount_root)
    _precheck_destination(dest)
    run = _FolderExport(
        folder,
        prof,
        plan,
        pseudonymizer,
        dest,
        workers=max(1, workers or 1),
        durable=durable,
        listener=listener,
        metrics=metrics,
        stop=stop,
        clock=clock,
        cached=cached if name == folder.profile else None,
        max_header_bytes=config.daemon.max_header_bytes,
        runner=runner,
    )
    ok = False
    try:
        with quiet_pydicom(), contextlib.ExitStack() as stack:
            run.files, run.skipped = walk_sources(str(root))
            if matcher is None:
                items = [(i, p, r) for i, (p, r) in enumerate(run.files)]
            else:
                items = run.scan(matcher)
            writer = ExportWriter(dest, durable=durable, guard=guard_of(places))
            stack.callback(writer.close)
            writer.check_root()
            run.write(items, writer)
            manifest = ""
            if run.tally.written:
                try:
                    manifest = str(_hash_and_write_manifest(run, writer))
                except ExportError as exc:
                    code = stopped_exit_code(exc.reason)
                    raise ExportStopped(
                        str(exc),
                        exc.errno,
                        summary=run.summary("", complete=False),
                        exit_code=code,
                    ) from None
        summary = run.summary(manifest)
        ok = summary.failed == 0
        log.debug(
            "export: folder=%s profile=%s files=%d written=%d unchanged=%d failed=%d",
            folder.id,
            prof.name,
            summary.files,
            summary.written,
            summary.unchanged,
            summary.failed,
        )
        return summary
    finally:
        if metrics is not None:
            metrics.export_finished(folder.id, time.monotonic() - run.start, ok, time.time())


@dataclass(frozen=True, slots=True)
class SourceSet:
    """The sources an export of a folder takes, resolved as :func:`export_folder` does
    (for exports that send instead of writing: :mod:`deidfs.export.send`)."""

    folder: FolderConfig
    profile: Profile
    plan: Plan
    #: (absolute source path, path relative to the folder) of every source, sorted by path
    files: list[tuple[str, str]]
    skipped: int  #: dotfiles, partial transfers, links, special files
    items: list[Item]  #: the selected sources (every source without a selection)


def select_sources(
    config: Config,
    folder_id: str,
    pseudonymizer: Pseudonymizer,
    *,
    selection: Selection | None = None,
    profile: str | None = None,
    workers: int | None = 1,
    listener: ExportListener | None = None,
    stop: StopFlag | None = None,
) -> SourceSet:
    """The folder, profile, plan and selected sources of an export, with the checks and
    the selection of :func:`export_folder` (a selection is matched on every rendered header).

    Raises
    ------
    NotFound
        Unknown folder or profile, a missing folder directory, a selector that matches
        nothing.
    ProfileError
        The profile is disabled.
    ExportStopped
        ``stop`` was set during the scan.
    """
    folder = config.folders.get(folder_id)
    if folder is None:
        known = ", ".join(sorted(config.folders)) or "none"
        raise NotFound(f"no folder {folder_id!r} in the configuration (have: {known})")
    name = profile or folder.profile
    prof = config.profiles.get(name)
    if prof is None:
        raise NotFound(f"no profile named {name!r} (have: {', '.join(sorted(config.profiles))})")
    if not prof.enabled:
        raise ProfileError(f"profile {name!r} is disabled")
    plan = compile_plan(prof)
    root = Path(os.path.abspath(folder.path))
    if not root.is_dir():
        raise NotFound(f"folder {folder.id!r}: its source directory does not exist")
    sel = selection if selection is not None else Selection()
    mount_root = Path(os.path.abspath(config.daemon.mountpoint)) / folder.id
    matcher = None if sel.empty else make_matcher(sel, root, mount_root)
    run = _FolderExport(
        folder,
        prof,
        plan,
        pseudonymizer,
        root,  # never written: only the scan runs
        workers=max(1, workers or 1),
        durable=False,
        listener=listener if listener is not None else ExportListener(),
        metrics=None,
        stop=stop,
        clock=_utcnow,
        cached=None,
        max_header_bytes=config.daemon.max_header_bytes,
    )
    with quiet_pydicom():
        run.files, run.skipped = walk_sources(str(root))
        if matcher is None:
            items = [(i, p, r) for i, (p, r) in enumerate(run.files)]
        else:
            items = run.scan(matcher)
    return SourceSet(folder, prof, plan, run.files, run.skipped, items)
