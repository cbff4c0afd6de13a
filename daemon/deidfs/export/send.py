"""Send exports to DICOM nodes and DICOMweb servers: ``deidfs export FOLDER
--to-destination NAME``.

The files sent are the files the mount serves and a folder export writes: every source is
rendered by :func:`deidfs.view.render.render` with the folder's profile and the key, under the same
fail-closed rules (a refused source is never sent), and its bytes are those of
:func:`deidfs.view.render.write_view_fd`, checked against their SHA-256 right before they leave.
This module is part of the export edge: it takes its sources from
:func:`deidfs.export.folder.select_sources`, as :func:`deidfs.export.folder.export_folder` does.

The senders are :class:`deidfs.export.cstore.CStoreSender` (C-STORE) and
:class:`deidfs.export.stow.StowSender` (STOW-RS); what goes out, what comes back and the
state of a destination are in :mod:`deidfs.export.destinations`. This module renders and
hashes the files, runs the send loop in batches, and writes each run's manifest and summary."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from deidfs import __version__
from deidfs.config.model import Destination, DestinationKind
from deidfs.errors import NotFound, Refused
from deidfs.export.cstore import (
    LOSSLESS_COMPRESSED,
    MAX_CONTEXTS,
    UNCOMPRESSED,
    CStoreSender,
    quiet_pynetdicom,
)
from deidfs.export.destinations import (
    STATE_NAME,
    Outgoing,
    Sender,
    SendError,
    SendResult,
    _State,
    node_key,
    state_dir_of,
)
from deidfs.export.folder import SourceSet, select_sources
from deidfs.export.manifest import write_manifest_file
from deidfs.export.selection import Selection, served_ids
from deidfs.export.stow import StowSender
from deidfs.export.summary import (
    ExportListener,
    _iso,
    _utcnow,
    json_count,
    json_refused,
    json_seconds,
)
from deidfs.export.workers import StopFlag, quiet_pydicom
from deidfs.view.model import EXPLICIT_LE
from deidfs.view.render import (
    SourceStat,
    View,
    render,
    source_unchanged,
    write_view_fd,
)

if TYPE_CHECKING:
    from deidfs.config.model import Config
    from deidfs.deid.pseudonym import Pseudonymizer
    from deidfs.ops.metrics import Metrics

log = logging.getLogger(__name__)

SOP_CLASS_UID = 0x00080016
LOSSY_IMAGE_COMPRESSION = 0x00282110
_HASH_CHUNK = 1 << 20


# -- rendering the files --------------------------------------------------------------------
def _sha256_view(view: View, src_fd: int) -> tuple[str, int]:
    """SHA-256 and size of the view's bytes, written through a memory file."""
    fd = os.memfd_create("deidfs-view", os.MFD_CLOEXEC)
    try:
        write_view_fd(view, src_fd, fd)
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    at = 0
    while chunk := os.pread(fd, _HASH_CHUNK, at):
        h.update(chunk)
        at += len(chunk)
    return h.hexdigest(), at


def _classes(view: View) -> tuple[str, str, bool]:
    """The SOP Class UID and the Transfer Syntax UID of ``view`` ("" when absent), and
    whether its Lossy Image Compression says "01"."""
    from pydicom import dcmread  # noqa: PLC0415

    try:
        ds = dcmread(
            io.BytesIO(view.header),
            stop_before_pixels=True,
            specific_tags=[SOP_CLASS_UID, LOSSY_IMAGE_COMPRESSION],
            force=True,
        )
        ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        return str(ds.get("SOPClassUID", "") or ""), ts, _says_lossy(ds)
    except Exception:  # pydicom raises many types; such a view is not sent
        return "", "", True


def _says_lossy(ds: Any) -> bool:
    value = ds.get("LossyImageCompression", "")
    return str(value or "").strip() == "01"


def _lossy_marked(f: Any) -> bool:
    """Whether the source open as ``f`` says Lossy Image Compression "01" (or cannot be
    read: then it is not taken as lossless either)."""
    from pydicom import dcmread  # noqa: PLC0415

    try:
        f.seek(0)
        ds = dcmread(
            f, stop_before_pixels=True, specific_tags=[LOSSY_IMAGE_COMPRESSION], force=True
        )
        return _says_lossy(ds)
    except Exception:  # pydicom raises many types: not known lossless
        return True


def _open_source(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        raise Refused("unreadable", "cannot open the source") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("not_regular", "not a regular file")
    return fd


@contextlib.contextmanager
def opened_view(out: Outgoing) -> Iterator[str]:
    """The exact bytes of ``out`` in a memory file, as a path: rendered from its source
    again, refused (``source_changed``) unless they are the bytes hashed before."""
    src = _open_source(out.path)
    fd = os.memfd_create("deidfs-view", os.MFD_CLOEXEC)
    try:
        if SourceStat.of(os.fstat(src)) != out.view.source:
            raise Refused("source_changed", "the source changed since it was rendered")
        write_view_fd(out.view, src, fd)
        if not source_unchanged(out.view, src) or _sha256_fd(fd)[0] != out.sha256:
            raise Refused("source_changed", "the source changed while it was read")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
        os.close(src)


# -- the export -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendSummary:
    """What one export to a destination did. Carries no original identifier or path."""

    folder: str
    destination: str
    profile: str
    files: int = 0  #: files of the selection stored at the destination (now or before)
    stored: int = 0  #: sent and stored now (warnings included)
    warnings: int = 0
    already: int = 0  #: stored by an earlier run: not sent again
    failed: int = 0
    duplicates: int = 0
    refused: tuple[tuple[str, int], ...] = ()
    skipped: int = 0
    seconds: float = 0.0
    manifest: str = ""
    error: str = ""  #: why the destination stopped taking files ("" if it did not)

    @property
    def refused_total(self) -> int:
        return sum(n for _, n in self.refused)

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object (the control socket's answer)."""
        return {
            "folder": self.folder,
            "destination": self.destination,
            "profile": self.profile,
            "files": self.files,
            "stored": self.stored,
            "warnings": self.warnings,
            "already": self.already,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "refused": dict(self.refused),
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "manifest": self.manifest,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SendSummary:
        """Read :meth:`to_json`'s form back; missing or odd fields count as zero."""

        def num(key: str) -> int:
            return json_count(data, key)

        return cls(
            folder=str(data.get("folder", "")),
            destination=str(data.get("destination", "")),
            profile=str(data.get("profile", "")),
            files=num("files"),
            stored=num("stored"),
            warnings=num("warnings"),
            already=num("already"),
            failed=num("failed"),
            duplicates=num("duplicates"),
            refused=json_refused(data),
            skipped=num("skipped"),
            seconds=json_seconds(data),
            manifest=str(data.get("manifest", "")),
            error=str(data.get("error", "")),
        )


def make_sender(
    dest: Destination, *, sleep: Callable[[float], None], stop: StopFlag | None
) -> Sender:
    """The sender of ``dest``'s kind."""
    if dest.kind is DestinationKind.DICOM:
        return CStoreSender(dest, sleep=sleep, stop=stop)
    return StowSender(dest, sleep=sleep, stop=stop)


def send_folder(
    config: Config,
    folder_id: str,
    destination: str,
    pseudonymizer: Pseudonymizer,
    *,
    selection: Selection | None = None,
    profile: str | None = None,
    listener: ExportListener | None = None,
    metrics: Metrics | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    on_stored: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send a configured folder, as the mount serves it, to ``destination``.

    Sources and selection are those of :func:`deidfs.export.folder.export_folder`; files already
    stored there by an earlier run (same view path, same bytes) are not sent again.
    ``on_stored`` is called with the count of files stored so far after each one (tests).

    Raises
    ------
    NotFound
        Unknown folder, profile or destination; a selector that matches nothing.
    SendError
        The destination cannot be used at all (kind, missing pynetdicom, state unwritable).
        A node that refuses or stays unreachable is not raised but reported in
        :attr:`SendSummary.error`, with the files not stored "failed".
    """
    listener = listener if listener is not None else ExportListener()
    dest = destination_of(config, destination)
    since = (time.monotonic(), clock())  # the scan of a selection is part of the export
    sources = select_sources(
        config,
        folder_id,
        pseudonymizer,
        selection=selection,
        profile=profile,
        listener=listener,
        stop=stop,
    )
    return send_sources(
        config,
        sources,
        dest,
        pseudonymizer,
        listener=listener,
        metrics=metrics,
        stop=stop,
        clock=clock,
        sleep=sleep,
        on_stored=on_stored,
        since=since,
    )


def destination_of(config: Config, name: str) -> Destination:
    """The destination ``name`` of ``config``.

    Raises
    ------
    NotFound
        There is no such destination.
    """
    dest = config.destinations.get(name)
    if dest is None:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise NotFound(f"no destination {name!r} in the configuration (have: {known})")
    return dest


def send_sources(
    config: Config,
    sources: SourceSet,
    dest: Destination,
    pseudonymizer: Pseudonymizer,
    *,
    listener: ExportListener | None = None,
    metrics: Metrics | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    on_stored: Callable[[int], None] | None = None,
    since: tuple[float, dt.datetime] | None = None,
) -> SendSummary:
    """Render ``sources`` (their items, in order: the first of two with one view path is
    sent) with their plan and layout, and send what ``dest`` does not hold yet; the state
    and manifests are those of ``sources.folder.id`` (see :func:`send_folder`). ``since``:
    when the export began (monotonic and wall clock), if before this call."""
    listener = listener if listener is not None else ExportListener()
    start, started = since if since is not None else (time.monotonic(), clock())
    folder = sources.folder
    sender = make_sender(dest, sleep=sleep, stop=stop)
    where = state_dir_of(config, dest.name, folder.id)
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SendError(f"cannot create the send state directory: {exc.strerror}") from None
    state = _State.load(where / STATE_NAME, node_key(dest))
    refused: Counter[str] = Counter()
    outgoing: list[Outgoing] = []
    duplicates = 0
    seen: set[str] = set()
    listener.phase("render", len(sources.items))
    with quiet_pydicom():
        for index, path, rel in sources.items:
            try:
                out = _render_one(index, path, rel, sources, pseudonymizer, config)
            except Refused as exc:
                refused[exc.reason] += 1
                listener.file("refused", exc.reason, pseudonymizer.token(path, "path")[:12])
                continue
            finally:
                listener.advance(1)
            if out.relpath in seen:  # the first source by path is served, as in the mount
                duplicates += 1
                continue
            seen.add(out.relpath)
            outgoing.append(out)
    results: dict[int, SendResult] = {}
    already = [o for o in outgoing if (o.relpath, o.sha256) in state.stored]
    todo = [o for o in outgoing if (o.relpath, o.sha256) not in state.stored]
    by_index = {o.index: o for o in todo}
    stored_now = 0
    listener.phase("send", len(todo))

    def on_result(index: int, result: SendResult) -> None:
        nonlocal stored_now
        listener.advance(1)
        if result.status in ("stored", "warning"):
            out = by_index[index]
            state.add(out.relpath, out.sha256)
            stored_now += 1
            if on_stored is not None:
                on_stored(stored_now)

    try:
        with quiet_pynetdicom(), quiet_pydicom():
            for batch in _batches(todo, dest.batch_size):
                if sender.error or (stop is not None and stop.is_set()):
                    for o in batch:
                        results[o.index] = SendResult("failed", sender.error or "cancelled")
                    continue
                results.update(sender.send_batch(batch, opened_view, on_result))
                state.sync()
    finally:
        state.close()
    tally: Counter[str] = Counter(r.status for r in results.values())
    for r in results.values():
        if metrics is not None:
            metrics.file_sent(dest.name, r.status)
    for index, r in sorted(results.items()):
        if r.status == "failed" and r.detail != sender.error:  # that one is said once
            listener.file(
                "failed", r.detail, pseudonymizer.token(by_index[index].path, "path")[:12]
            )
    manifest = _write_manifest(
        where, started, clock, sources, dest, outgoing, already, results, refused, duplicates
    )
    summary = SendSummary(
        folder=folder.id,
        destination=dest.name,
        profile=sources.profile.name,
        files=len(already) + tally["stored"] + tally["warning"],
        stored=tally["stored"] + tally["warning"],
        warnings=tally["warning"],
        already=len(already),
        failed=tally["failed"],
        duplicates=duplicates,
        refused=tuple(sorted(refused.items())),
        skipped=sources.skipped,
        seconds=time.monotonic() - start,
        manifest=manifest,
        error=sender.error,
    )
    log.info(
        "sent: folder=%s destination=%s stored=%d already=%d failed=%d",
        folder.id,
        dest.name,
        summary.stored,
        summary.already,
        summary.failed,
    )
    return summary


def _render_one(
    index: int,
    path: str,
    rel: str,
    sources: SourceSet,
    pseudonymizer: Pseudonymizer,
    config: Config,
) -> Outgoing:
    """Render one source as the mount serves it, and hash its bytes."""
    src = _open_source(path)
    try:
        with os.fdopen(os.dup(src), "rb") as f:
            state = SourceStat.of(os.fstat(src))
            view = render(
                f,
                state,
                sources.plan,
                pseudonymizer,
                sources.folder.layout,
                PurePosixPath(rel),
                max_header_bytes=config.daemon.max_header_bytes,
            )
            source_lossy = _lossy_marked(f)
        sha, _ = _sha256_view(view, src)
        if not source_unchanged(view, src):
            raise Refused("source_changed", "the source changed while it was read")
    finally:
        os.close(src)
    sop_class, ts, view_lossy = _classes(view)
    if not sop_class or not ts:
        raise Refused("no_sop_class", "no SOP Class UID or Transfer Syntax UID")
    marked = source_lossy or view_lossy
    lossless = (ts in UNCOMPRESSED or ts in LOSSLESS_COMPRESSED) and not marked
    ids = served_ids(view)
    return Outgoing(index, path, str(view.relpath), view, sha, sop_class, ts, ids, lossless, marked)


def _batches(items: Sequence[Outgoing], size: int) -> Iterator[list[Outgoing]]:
    """Batches of at most ``size`` files whose presentation contexts fit one association."""
    batch: list[Outgoing] = []
    pairs: set[tuple[str, str]] = set()
    for out in items:
        new = {(out.sop_class, out.transfer_syntax), (out.sop_class, EXPLICIT_LE)} - pairs
        if batch and (len(batch) >= size or len(pairs) + len(new) > MAX_CONTEXTS):
            yield batch
            batch, pairs = [], set()
            new = {(out.sop_class, out.transfer_syntax), (out.sop_class, EXPLICIT_LE)}
        batch.append(out)
        pairs |= new
    if batch:
        yield batch


def _write_manifest(
    where: Path,
    started: dt.datetime,
    clock: Callable[[], dt.datetime],
    sources: SourceSet,
    dest: Destination,
    outgoing: Sequence[Outgoing],
    already: Sequence[Outgoing],
    results: dict[int, SendResult],
    refused: Counter[str],
    duplicates: int,
) -> str:
    if not results:
        return ""
    common = {
        "destination": dest.name,
        "profile": sources.profile.name,
        "plan_digest": sources.plan.digest,
        "deidfs_version": __version__,
    }
    lines = []
    was_there = {o.index for o in already}
    for out in sorted(outgoing, key=lambda o: o.relpath):
        res = results.get(out.index)
        if res is None and out.index not in was_there:
            continue
        record: dict[str, Any] = {
            "type": "file",
            "path": out.relpath,
            "size": out.view.size,
            "sha256": out.sha256,
            "result": "already_stored" if res is None else res.status,
            "status": None if res is None or res.code is None else f"0x{res.code:04X}",
            "detail": "" if res is None else res.detail,
            "converted": False if res is None else res.converted,
            "StudyInstanceUID": out.ids.StudyInstanceUID,
            "SeriesInstanceUID": out.ids.SeriesInstanceUID,
            "SOPInstanceUID": out.ids.SOPInstanceUID,
            "PatientID": out.ids.PatientID,
            **common,
        }
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    tally = Counter(r.status for r in results.values())
    lines.append(
        json.dumps(
            {
                "type": "summary",
                "folder": sources.folder.id,
                **common,
                "started": _iso(started),
                "finished": _iso(clock()),
                "stored": tally["stored"],
                "warning": tally["warning"],
                "failed": tally["failed"],
                "already_stored": len(already),
                "duplicates": duplicates,
                "refused": dict(refused),
            },
            separators=(",", ":"),
        )
    )
    data = ("\n".join(lines) + "\n").encode()
    path = write_manifest_file(where, started, data, durable=True)
    return str(path)
