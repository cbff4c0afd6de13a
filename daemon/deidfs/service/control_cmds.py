"""Status and the control socket's commands: what the daemon reports and what it is asked.

:class:`Commands` takes the snapshot ``deidfs status``, the metrics' state part and the
``STATUS=`` line report, and answers the control socket's ``status``, ``withheld``,
``reload`` and ``export`` requests (an export runs here with the daemon's key, one at a
time, confined to ``export_dir``).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deidfs.errors import DeidfsError, NotFound
from deidfs.export import folder as export_module
from deidfs.export.selection import Selection
from deidfs.mount.lifecycle import FuseMount
from deidfs.mount.ops import DeidOperations
from deidfs.ops.control import may_read_sources
from deidfs.ops.control_protocol import ErrorCode, ExportRequest, Handler, Reply, Request
from deidfs.ops.logs import LibraryWarnings
from deidfs.ops.metrics import FolderState, StateSnapshot
from deidfs.service.folders import FolderSet
from deidfs.service.indexing import Indexer
from deidfs.service.reload import Reloader
from deidfs.service.status import FolderStatus, ServiceStatus
from deidfs.service.work import _CancelFlag
from deidfs.view.handles import ViewFS

#: A render running longer than this is shown by ``status`` (as in progress).
SHOW_RENDER_AFTER_SECONDS = 1.0


class Commands:
    """Status reports and control commands of a running daemon.

    Parameters
    ----------
    folders, indexer, reloads
        The parts reported on and asked.
    ops, fs
        The mount's operations (synced before a report) and file handles.
    mountpoint
        Where the mount is.
    started_at
        Start on the folder set's clock (for the uptime).
    library_warnings
        pydicom's warnings, counted by category.
    ready
        The daemon's ``/-/ready``.
    mount
        The mount, once started.
    """

    def __init__(
        self,
        folders: FolderSet,
        indexer: Indexer,
        reloads: Reloader,
        ops: DeidOperations,
        fs: ViewFS,
        mountpoint: Path,
        started_at: float,
        library_warnings: LibraryWarnings,
        ready: Callable[[], bool],
        mount: Callable[[], FuseMount | None],
    ) -> None:
        self.folders = folders
        self.indexer = indexer
        self.reloads = reloads
        self.ops = ops
        self.fs = fs
        self.mountpoint = mountpoint
        self.started_at = started_at
        self.library_warnings = library_warnings
        self._ready = ready
        self._mount = mount
        self._export_lock = threading.Lock()

    def status(self) -> ServiceStatus:
        """A consistent-enough snapshot for reporting (counts may move while it is taken)."""
        self.ops.sync()  # handles the C read path released are closed, and counted
        folders = []
        for fid, folder in sorted(self.folders.by_id.items()):
            counts = self.folders.tree.counts(fid)
            reasons = Counter(r for _, _, r in list(folder.refused.values()))
            w = folder.watcher
            folders.append(
                FolderStatus(
                    id=fid,
                    profile=folder.config.profile,
                    layout=folder.config.layout.value,
                    visible=counts.visible,
                    duplicates=counts.duplicates,
                    refused=tuple(sorted(reasons.items())),
                    bytes=counts.bytes,
                    watch=w.kind if w is not None else "",
                    watch_healthy=w.healthy if w is not None else False,
                    settling=w.pending if w is not None else 0,
                    watch_degraded=(w.degraded_reason or "") if w is not None else "",
                    directories=w.directories if w is not None else 0,
                    missed=w.missed_files if w is not None else 0,
                    events=tuple(sorted(w.event_counts.items())) if w is not None else (),
                    overflows=w.overflows if w is not None else 0,
                    last_overflow_age=w.last_overflow_age if w is not None else None,
                )
            )
        m = self._mount()
        cache = self.fs.cache
        now = self.folders.clock()
        rendering = sorted(
            (fid, token, now - since)
            for fid, token, since in list(self.indexer.rendering.values())
            if now - since > SHOW_RENDER_AFTER_SECONDS
        )
        return ServiceStatus(
            mountpoint=str(self.mountpoint),
            mounted=m is not None and m.alive,
            libfuse=m.libfuse_version if m is not None else "",
            folders=tuple(folders),
            backlog=len(self.folders.queue),
            rendered=self.folders.rendered,
            reused=self.folders.reused,
            open_files=self.fs.open_handles,
            cache_bytes=cache.size_bytes,
            cache_entries=len(cache),
            stale_opens=self.fs.stale,
            uptime_seconds=self.folders.clock() - self.started_at,
            ready=self._ready(),
            config_path=str(self.folders.config.source or ""),
            config_sha256=self.folders.config.sha256,
            last_reload=self.reloads.last_reload,
            cache_hits=cache.hits,
            cache_misses=cache.misses,
            pydicom_warnings=tuple(sorted(self.library_warnings.counts().items())),
            open_limit=self.fs.max_handles,
            refused_opens=self.fs.exhausted,
            rendering=tuple(rendering),
        )

    def metrics_state(self) -> StateSnapshot:
        """The state part of the metrics (read at each scrape, on the HTTP thread)."""
        s = self.status()
        return StateSnapshot(
            mounted=s.mounted,
            backlog=s.backlog,
            open_files=s.open_files,
            stale_opens=s.stale_opens,
            refused_opens=s.refused_opens,
            cache_hits=s.cache_hits,
            cache_misses=s.cache_misses,
            cache_bytes=s.cache_bytes,
            cache_entries=s.cache_entries,
            pydicom_warnings=s.pydicom_warnings,
            folders=tuple(
                FolderState(
                    folder=f.id,
                    profile=f.profile,
                    layout=f.layout,
                    visible=f.visible,
                    duplicates=f.duplicates,
                    view_bytes=f.bytes,
                    withheld=f.refused,
                    watch_polling=f.watch == "poll",
                    watch_healthy=f.watch_healthy,
                    settling=f.settling,
                    directories=f.directories,
                    missed=f.missed,
                    events=f.events,
                    overflows=f.overflows,
                )
                for f in s.folders
            ),
        )

    def status_line(self) -> str:
        """One line for ``STATUS=`` (systemctl status)."""
        s = self.status()
        visible = sum(f.visible for f in s.folders)
        refused = sum(f.refused_total for f in s.folders)
        line = (
            f"{len(s.folders)} folder(s), {visible} file(s) served, {refused} withheld, "
            f"{s.backlog} queued"
        )
        warned = sum(n for _, n in s.pydicom_warnings)
        if warned:
            line += f", {warned} pydicom warning(s)"
        last = self.reloads.last_reload
        if last is not None and not last.ok:
            line += "; configuration rejected, the last good one is serving"
        return line

    def handlers(self) -> dict[str, Handler]:
        """The control socket's commands by name."""
        return {
            "status": self._cmd_status,
            "reload": self._cmd_reload,
            "export": self._cmd_export,
            "withheld": self._cmd_withheld,
        }

    def _cmd_status(self, request: Request) -> Reply:
        return Reply.success(self.status().to_json())

    def _cmd_withheld(self, request: Request) -> Reply:
        """Source paths not served (withheld or duplicates), each with reason and token.

        Paths can carry patient names: only root and the configuration file's owner get
        them (see :func:`~deidfs.ops.control.may_read_sources`).
        """
        if not may_read_sources(request.peer, self.folders.config.source):
            return Reply.failure(
                ErrorCode.DENIED,
                "only root or the owner of the configuration file may list withheld sources",
            )
        unknown = set(request.args) - {"folder"}
        if unknown:
            return Reply.failure(
                ErrorCode.BAD_REQUEST, f"unknown argument(s): {', '.join(sorted(unknown))}"
            )
        wanted = request.args.get("folder")
        if wanted is not None and not isinstance(wanted, str):
            return Reply.failure(ErrorCode.BAD_REQUEST, "'folder' must be a string")
        folders = dict(self.folders.by_id)
        if wanted is not None and wanted not in folders:
            return Reply.failure(ErrorCode.NOT_FOUND, f"no folder {wanted!r} is configured")
        out = []
        for fid, folder in sorted(folders.items()):
            if wanted is not None and fid != wanted:
                continue
            sources: list[dict[str, str]] = [
                {"path": path, "token": self.folders.token(path), "reason": reason}
                for path, (_, _, reason) in sorted(folder.refused.items())
            ]
            for vf in sorted(self.folders.tree.sources(fid), key=lambda v: v.source):
                served = self.folders.tree.file(vf.mount_path)
                if served is not None and served.source != vf.source:
                    sources.append(
                        {
                            "path": vf.source,
                            "token": self.folders.token(vf.source),
                            "reason": "duplicate",
                            "served": served.source,
                            "served_token": self.folders.token(served.source),
                        }
                    )
            out.append({"id": fid, "sources": sources})
        return Reply.success({"folders": out})

    def _cmd_reload(self, request: Request) -> Reply:
        wait = request.args.get("wait", True)
        if not isinstance(wait, bool):
            return Reply.failure(ErrorCode.BAD_REQUEST, "'wait' must be true or false")
        if not self._ready():
            return Reply.failure(ErrorCode.BUSY, "the daemon is starting or stopping; try again")
        if not wait:
            self.reloads.request_reload("control")
            return Reply.success({"queued": True})
        outcome = self.reloads.reload("control")
        if outcome.ok:
            return Reply.success(outcome.to_json())
        return Reply.failure(
            ErrorCode.CONFIG_INVALID,
            "configuration rejected; the last good configuration keeps serving",
            outcome.errors,
        )

    def _cmd_export(self, request: Request) -> Reply:
        """``export``: :func:`deidfs.export.folder.export_folder` with the daemon's key.

        The destination is confined to ``export_dir``; one export runs at a time; a daemon
        shutting down cancels it after the files in progress. Failures carry
        ``exit_code=N`` in their details: the code the same export would exit with locally.
        """
        try:
            req = ExportRequest.from_args(request.args)
        except ValueError as exc:
            return Reply.failure(ErrorCode.BAD_REQUEST, str(exc))
        if req.folder not in self.folders.by_id:
            return Reply.failure(
                ErrorCode.NOT_FOUND,
                f"no folder {req.folder!r} is configured",
                (f"exit_code={os.EX_NOINPUT}",),
            )
        if not self._export_lock.acquire(blocking=False):
            return Reply.failure(ErrorCode.BUSY, "another export is running; try again later")
        try:
            selection = Selection(
                study=req.study, patient=req.patient, accession=req.accession, path=req.path
            )
            return self._forward_export(selection, req)
        finally:
            self._export_lock.release()

    def _forward_export(self, selection: Selection, req: ExportRequest) -> Reply:
        assert self.folders.pseudo is not None
        if req.destination is not None:
            return self._forward_send(selection, req)
        extra: dict[str, Any] = {}
        folder = self.folders.by_id.get(req.folder)
        same_profile = req.profile is None or (
            folder is not None and req.profile == folder.config.profile
        )
        # The header cache holds views of the folder's own profile only: an export with
        # another profile must render its own.
        if folder is not None and same_profile and (req.workers or 1) <= 1:
            # Headers rendered while indexing: an export of indexed files is mostly copying.
            # (Worker processes cannot share the cache; they render for themselves.)
            cache, digest = self.fs.cache, folder.view.digest
            extra["cached"] = lambda path, state: cache.peek((path, state, digest))
        try:
            summary = export_module.export_folder(
                self.folders.config,
                req.folder,
                self.folders.pseudo,
                selection=selection,
                to=Path(req.to) if req.to else None,
                profile=req.profile,
                workers=req.workers or 1,
                confine=True,
                metrics=self.folders.metrics,
                stop=_CancelFlag(self.folders.stopping),
                **extra,
            )
        except NotFound as exc:
            return Reply.failure(ErrorCode.NOT_FOUND, str(exc), (f"exit_code={exc.exit_code}",))
        except DeidfsError as exc:
            return Reply.failure(ErrorCode.FAILED, str(exc), (f"exit_code={exc.exit_code}",))
        return Reply.success(summary.to_json())

    def _forward_send(self, selection: Selection, req: ExportRequest) -> Reply:
        """``export`` with a ``destination``: :func:`deidfs.export.send.send_folder`, counted in
        ``deidfs_export_sent_total``."""
        assert self.folders.pseudo is not None
        assert req.destination is not None
        if req.to is not None:
            return Reply.failure(ErrorCode.BAD_REQUEST, "'to' and 'destination' exclude each other")
        from deidfs.export import send as send_module  # noqa: PLC0415  (pynetdicom only when sending)

        try:
            summary = send_module.send_folder(
                self.folders.config,
                req.folder,
                req.destination,
                self.folders.pseudo,
                selection=selection,
                profile=req.profile,
                metrics=self.folders.metrics,
                stop=_CancelFlag(self.folders.stopping),
            )
        except NotFound as exc:
            return Reply.failure(ErrorCode.NOT_FOUND, str(exc), (f"exit_code={exc.exit_code}",))
        except DeidfsError as exc:
            return Reply.failure(ErrorCode.FAILED, str(exc), (f"exit_code={exc.exit_code}",))
        return Reply.success(summary.to_json())
