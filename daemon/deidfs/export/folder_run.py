"""One export of one folder while it runs (:class:`FolderExport`): its phases, the scan of
a selection and the writing of the chosen sources through a
:class:`~deidfs.export.workers.Runner`, the settling of sources that name one target
(:class:`~deidfs.export.claims.Claims`), the :class:`Tally` of what its files came to,
its manifest (every file in place, hashed, and a summary line) and its
:class:`~deidfs.export.summary.ExportSummary`. What the export takes and where it writes
are resolved by :func:`deidfs.export.folder.export_folder`, which drives it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NoReturn

from deidfs import __version__
from deidfs.deid.plan import Plan
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound
from deidfs.export.claims import Claims
from deidfs.export.dirs import open_beneath
from deidfs.export.errors import ExportError, _oserror, stopped_exit_code
from deidfs.export.files import sha256_fd
from deidfs.export.manifest import write_manifest_file
from deidfs.export.outcomes import Outcome
from deidfs.export.selection import Matcher, ServedIds
from deidfs.export.summary import ExportListener, ExportStopped, ExportSummary, _iso
from deidfs.export.workers import (
    FileResult,
    Item,
    Job,
    PoolRunner,
    Runner,
    ScanJob,
    ScanResult,
    StopFlag,
)
from deidfs.export.writer import ExportWriter, ViewLookup

if TYPE_CHECKING:
    from deidfs.config.model import FolderConfig
    from deidfs.ops.metrics import Metrics


@dataclass
class Tally:
    """What an export's files came to, counted as they are settled."""

    written: int = 0
    replaced: int = 0
    unchanged: int = 0
    failed: int = 0
    duplicates: int = 0
    bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class FolderExport:
    """One export of one folder (see :func:`deidfs.export.folder.export_folder`)."""

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
        self.tally = Tally()
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


def hash_and_write_manifest(run: FolderExport, writer: ExportWriter) -> Path:
    """Hash the files found in place and write the manifest of ``run``; returns its path."""
    try:
        root_fd = writer.root_fd()
    except OSError as exc:
        raise _oserror("cannot write the manifest", exc) from None
    run.hash_unchanged(root_fd)
    return run.write_manifest(root_fd)
