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
are removed, and the next run resumes. :func:`export_folder` resolves the folder, its plan,
the destination and the selection in named steps; the run itself (its phases, tally,
manifest and summary) is :class:`~deidfs.export.folder_run.FolderExport`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound, ProfileError
from deidfs.export.confinement import (
    _precheck_destination,
    forbidden_places,
    guard_of,
    resolve_destination,
)
from deidfs.export.errors import ExportError, stopped_exit_code
from deidfs.export.folder_run import FolderExport, hash_and_write_manifest
from deidfs.export.selection import Matcher, Selection, make_matcher, walk_sources
from deidfs.export.summary import ExportListener, ExportStopped, ExportSummary, _utcnow
from deidfs.export.workers import Item, Runner, StopFlag, quiet_pydicom
from deidfs.export.writer import ExportWriter, ViewLookup

if TYPE_CHECKING:
    from deidfs.config.model import Config, FolderConfig
    from deidfs.export.confinement import Place
    from deidfs.ops.metrics import Metrics

log = logging.getLogger(__name__)


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
    folder, prof, plan, root = _folder_and_plan(config, folder_id, profile)
    dest, places = _destination(config, folder, to, confine)
    matcher = _matcher_of(config, folder, root, selection)
    _precheck_destination(dest)
    run = FolderExport(
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
        cached=cached if (profile or folder.profile) == folder.profile else None,
        max_header_bytes=config.daemon.max_header_bytes,
        runner=runner,
    )
    ok = False
    try:
        with quiet_pydicom():
            items = _chosen_sources(run, root, matcher)
            manifest = _write_with_manifest(run, items, dest, places, durable=durable)
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


# -- the steps of an export ---------------------------------------------------------------------
def _folder_and_plan(
    config: Config, folder_id: str, profile: str | None
) -> tuple[FolderConfig, Profile, Plan, Path]:
    """The folder, its profile (or ``profile``), the compiled plan and the folder's source
    directory. Raises NotFound (unknown folder, profile, a missing directory) or
    ProfileError (a disabled profile)."""
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
    return folder, prof, plan, root


def _destination(
    config: Config, folder: FolderConfig, to: Path | None, confine: bool
) -> tuple[Path, list[Place]]:
    """``<to or export_dir>/<folder>``, links resolved and checked, and the places no
    export may write in."""
    export_dir = Path(os.path.abspath(config.daemon.export_dir))
    base = Path(os.path.abspath(to)) if to is not None else export_dir
    places = forbidden_places(config)
    dest = resolve_destination(base / folder.id, places, within=export_dir if confine else None)
    return dest, places


def _matcher_of(
    config: Config, folder: FolderConfig, root: Path, selection: Selection | None
) -> Matcher | None:
    """The matcher of ``selection``; None for no selection (every source)."""
    sel = selection if selection is not None else Selection()
    mount_root = Path(os.path.abspath(config.daemon.mountpoint)) / folder.id
    return None if sel.empty else make_matcher(sel, root, mount_root)


def _chosen_sources(run: FolderExport, root: Path, matcher: Matcher | None) -> list[Item]:
    """Walk the folder's sources into ``run``; every one, or those ``matcher`` chooses
    (a scan of every header)."""
    run.files, run.skipped = walk_sources(str(root))
    if matcher is None:
        return [(i, p, r) for i, (p, r) in enumerate(run.files)]
    return run.scan(matcher)


def _write_with_manifest(
    run: FolderExport, items: list[Item], dest: Path, places: list[Place], *, durable: bool
) -> str:
    """Write ``items`` to ``dest`` and, when a file was put in place, the manifest;
    returns the manifest's path ("" for none)."""
    with contextlib.ExitStack() as stack:
        writer = ExportWriter(dest, durable=durable, guard=guard_of(places))
        stack.callback(writer.close)
        writer.check_root()
        run.write(items, writer)
        manifest = ""
        if run.tally.written:
            try:
                manifest = str(hash_and_write_manifest(run, writer))
            except ExportError as exc:
                code = stopped_exit_code(exc.reason)
                raise ExportStopped(
                    str(exc),
                    exc.errno,
                    summary=run.summary("", complete=False),
                    exit_code=code,
                ) from None
    return manifest


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
    folder, prof, plan, root = _folder_and_plan(config, folder_id, profile)
    matcher = _matcher_of(config, folder, root, selection)
    run = FolderExport(
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
        items = _chosen_sources(run, root, matcher)
    return SourceSet(folder, prof, plan, run.files, run.skipped, items)
