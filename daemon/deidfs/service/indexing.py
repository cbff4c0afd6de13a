"""The index work: the ``deidfs-index-N`` threads and what each does with a queued source.

Each :class:`Indexer` thread owns a render process (:mod:`deidfs.view.pool`) that renders
the source header-only while the thread waits on its pipe; only the bookkeeping before and
after a render is serialized (the folder set's ``index_lock``), so a slow source holds up
its own thread only. A source is checked first (lstat, what the tree, the refusal table and
the index already know, whether it may be served at all), rendered, and the result stored
in the index and the tree unless the source or the folder's views changed meanwhile.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path, PurePosixPath

from deidfs.ops.logs import LibraryWarnings
from deidfs.service.folders import FolderSet, _Folder
from deidfs.service.work import _Key, _Kind
from deidfs.view.handles import ViewFS, unsettled_ns
from deidfs.view.index import Entry, Status
from deidfs.view.pool import TIMEOUT_REASON, Rendered, RenderProcess
from deidfs.view.render import SourceStat, View

log = logging.getLogger(__name__)

#: Indexing threads (each with its render process) at least, whatever ``workers`` says: with
#: one, a source taking its whole time bound would hold up every other.
MIN_INDEX_WORKERS = 2


class Indexer:
    """The indexing threads of a folder set, each with its render process.

    Parameters
    ----------
    folders
        The folder set whose queue is worked and whose tree and index are updated.
    fs
        The mount's file handles: a rendered header is kept in its cache.
    library_warnings
        Where the render processes' pydicom warnings are counted.
    """

    def __init__(self, folders: FolderSet, fs: ViewFS, library_warnings: LibraryWarnings) -> None:
        self.folders = folders
        self.fs = fs
        self.library_warnings = library_warnings
        self.workers: list[threading.Thread] = []
        self.renderers: list[RenderProcess] = []
        #: Renders in progress: worker slot -> (folder id, file token, start on the clock).
        self.rendering: dict[int, tuple[str, str, float]] = {}

    def start_workers(self, count: int) -> None:
        for _ in range(count):
            n = len(self.workers)
            renderer = RenderProcess(f"deidfs-render-{n}")
            renderer.start()
            t = threading.Thread(
                target=self._work, args=(n, renderer), name=f"deidfs-index-{n}", daemon=True
            )
            self.renderers.append(renderer)
            t.start()
            self.workers.append(t)

    def _work(self, slot: int, renderer: RenderProcess) -> None:
        """An indexing worker: index queued sources one by one, rendering each in its own
        render process (see the module notes)."""
        try:
            while not self.folders.stopping.is_set():
                item = self.folders.queue.get(timeout=0.5)
                if item is not None:
                    self._index_item(slot, renderer, *item)
                if not len(self.folders.queue):
                    self._flush_index()
        finally:
            renderer.close()

    def _index_item(self, slot: int, renderer: RenderProcess, key: _Key, kind: _Kind) -> None:
        """Handle one queued source; a failure is logged, never raised."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event: folder=%s file=%s %s", key[0], self.folders.token(key[1]), kind.value)
        try:
            folder = self.folders.by_id.get(key[0])
            if folder is not None:
                if kind is _Kind.GONE:
                    with self.folders.index_lock:
                        self.folders.forget(folder, key[1])
                else:
                    self._index_source(folder, key[1], slot, renderer, hint=kind is _Kind.HINT)
        except Exception as exc:  # contain: one bad file must not stop indexing
            log.error(
                "indexing failed: folder=%s file=%s error=%s",
                key[0],
                self.folders.token(key[1]),
                type(exc).__name__,
            )
        finally:
            self.folders.queue.done(key)

    def _flush_index(self) -> None:
        """Nothing (more) to index for now: commit the index rows written in a batch."""
        if self.folders.index is not None:
            self.folders.index.flush()

    def _index_source(
        self,
        folder: _Folder,
        path: str,
        slot: int,
        renderer: RenderProcess,
        hint: bool = False,
    ) -> None:
        with self.folders.index_lock:
            checked = self._needs_render(folder, path, hint)
        if checked is None:
            return
        st, state = checked
        fid = folder.config.id
        wait = unsettled_ns(st, time.time_ns())
        if wait:
            # Changed within a timestamp tick: a write later in that tick would not show in
            # the state. Render once the tick is over, from the same state.
            time.sleep(wait / 1e9)
            try:
                st = os.lstat(path)
            except OSError:
                return  # gone or unreadable: the watcher reports it
            if SourceStat.of(st) != state:
                return  # changed again: the watcher reports it once it has settled
            if unsettled_ns(st, time.time_ns()):
                self.folders.queue.put((fid, path), _Kind.READY)  # only its ctime moved: again
                return
        rel = _relative(path, folder.prefix, folder.view.root)
        view = folder.view
        token = self.folders.token(path)
        self.rendering[slot] = (fid, token, self.folders.clock())
        try:
            outcome = renderer.render(
                path,
                rel,
                view.digest,
                (view.plan, view.pseudonymizer, view.layout, view.max_header_bytes),
                self.folders.config.daemon.parse_timeout_seconds,
            )
        finally:
            self.rendering.pop(slot, None)
        if outcome.warnings:
            self.library_warnings.add(dict(outcome.warnings), token)
        if outcome.lost and self.folders.stopping.is_set():
            return  # stopping: the render was abandoned, the file is indexed at the next start
        self.folders.metrics.observe_render(fid, outcome.seconds)
        self.folders.count(rendered=1)
        after = self._still(path, state)
        with self.folders.index_lock:
            self._store(folder, path, st, state, after, outcome)

    def _needs_render(
        self, folder: _Folder, path: str, hint: bool
    ) -> tuple[os.stat_result, SourceStat] | None:
        """The source's lstat and state when it must be rendered; None when it was handled
        here (forgotten, withheld, taken from the index, or nothing to do). Index lock held."""
        assert self.folders.index is not None
        fid = folder.config.id
        digest = folder.view.digest
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.folders.forget(folder, path)
            return None
        except OSError:
            self.folders.withhold(folder, path, None, "unreadable")
            return None
        state = SourceStat.of(st)
        if (
            hint
            and time.time_ns() - st.st_mtime_ns < self.folders.config.daemon.settle_seconds * 1e9
        ):
            return None  # still being written: the watcher reports it once it has settled
        served = self.folders.tree.by_source(fid, path)
        if served is not None and served.state == state and served.digest == digest:
            return None
        known = folder.refused.get(path)
        if known is not None and known[0] == state and known[1] == digest:
            return None
        row = self.folders.index.get(fid, path)
        if row is not None and row.source == state and row.digest == digest:
            self.folders.apply(folder, row)
            self.folders.count(reused=1)
            return None
        reason = self._unsafe(folder, path, st)
        if reason:
            self.folders.withhold(folder, path, state, reason)
            return None
        return st, state

    def _store(
        self,
        rendered_for: _Folder,
        path: str,
        st: os.stat_result,
        state: SourceStat,
        after: os.stat_result | None,
        outcome: Rendered,
    ) -> None:
        """Make the index and the tree say what the render found. Index lock held."""
        assert self.folders.index is not None
        fid = rendered_for.config.id
        folder = self.folders.by_id.get(fid)
        if (
            folder is None
            or folder.view.digest != rendered_for.view.digest
            or not path.startswith(folder.prefix)
        ):
            # A reload replaced the folder's views meanwhile: the source is queued again
            # for them (or the folder is gone).
            return
        rendered = outcome.view
        if after is None or (rendered is not None and rendered.source != state):
            # Written to while it was parsed (a copy in place): what was read may be a
            # mix. The watcher reports the file again once it has settled.
            log.debug("folder=%s file=%s changed while indexed", fid, self.folders.token(path))
            return
        if after.st_ctime_ns != st.st_ctime_ns:
            # Same state, later ctime: a chmod (which the watcher does not report), or a
            # rewrite that kept size and mtime. What was read may be a mix: again (as
            # READY: the watcher reported this state and will not report it again).
            self.folders.queue.put((fid, path), _Kind.READY)
            return
        if outcome.error:
            log.error(
                "indexing failed: folder=%s file=%s error=%s",
                fid,
                self.folders.token(path),
                outcome.error,
            )
            return
        reason = outcome.reason
        if outcome.lost:
            # The render process died under this file (killed, out of memory, a crash in
            # a decoder): fail closed.
            log.warning(
                "render process died while rendering folder=%s file=%s; withheld",
                fid,
                self.folders.token(path),
            )
            reason = "unparseable"
        if rendered is None:
            if reason == TIMEOUT_REASON:
                log.warning(
                    "folder=%s file=%s: render took longer than %g s; abandoned",
                    fid,
                    self.folders.token(path),
                    self.folders.config.daemon.parse_timeout_seconds,
                )
            log.debug(
                "folder=%s file=%s refused at size %d", fid, self.folders.token(path), state.size
            )
            self.folders.withhold(folder, path, state, reason)
            return
        entry = self._entry(folder, path, rendered)
        self.folders.index.put(entry)
        self.folders.apply(folder, entry)
        key = (path, rendered.source, folder.view.digest)
        # The header was just built: keep it so the first open of the view is cheap.
        self.fs.cache.put(key, rendered)

    @staticmethod
    def _still(path: str, state: SourceStat) -> os.stat_result | None:
        """The source's lstat if it still has ``state``."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st if SourceStat.of(st) == state else None

    def _unsafe(self, folder: _Folder, path: str, st: os.stat_result) -> str:
        """Why a path must not be served although it may be DICOM ("" if it may)."""
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if not path.startswith(folder.prefix):
            return "outside_folder"
        # A directory on the way replaced by a link would lead out of the folder.
        real_root = _real_directory(str(folder.view.root))
        real_dir = _real_directory(os.path.dirname(path))
        if real_dir != real_root and not real_dir.startswith(real_root.rstrip("/") + "/"):
            return "outside_folder"
        return ""

    def _entry(self, folder: _Folder, path: str, view: View) -> Entry:
        return Entry(
            folder=folder.config.id,
            path=path,
            source=view.source,
            digest=folder.view.digest,
            status=Status.OK,
            relpath=str(view.relpath),
            view_size=view.size,
            header_length=len(view.header),
            pixel_offset=view.pixel_offset,
            pixel_length=view.pixel_length,
            trailer_length=len(view.trailer),
            indexed_ns=time.time_ns(),
        )


def _index_workers(workers: int) -> int:
    """Indexing threads (and render processes) for ``[daemon] workers``."""
    return max(MIN_INDEX_WORKERS, workers)


def _relative(path: str, prefix: str, root: Path) -> PurePosixPath:
    """``path`` relative to the folder ``root``; ``path`` starts with ``prefix`` (root + /)."""
    rel = path[len(prefix) :]
    # Watcher paths are normalized: slicing is enough (PurePosixPath drops "//" and "/./");
    # only "..", which it keeps, needs os.path.relpath.
    if ".." not in rel:
        return PurePosixPath(rel)
    return PurePosixPath(os.path.relpath(path, root))


def _real_directory(path: str) -> str:
    """``os.path.realpath`` of a directory, asked of the kernel where it can answer.

    The directory is opened ``O_PATH`` (symlinks followed, as realpath does) and the link
    /proc shows for the descriptor is read: three system calls, where realpath makes one
    ``lstat`` per path component. Falls back to realpath when the directory cannot be
    opened (gone, not a directory) or /proc does not answer.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        return os.path.realpath(path)
    return real
