"""The folder set: each configured folder's state, and what keeps the tree and index in step.

:class:`FolderSet` holds what the indexing threads, the reload and the status share: the
running configuration, the folders by id (replaced as a whole, copy on write, by reloads),
the key's pseudonymizer, the index, the work queue and the locks. It builds a folder's state
(plan compiled, view digest), starts its watcher, loads the index into the tree, queues what
watchers and FUSE report, and withholds or forgets sources. Nothing here renders: that is
:mod:`deidfs.service.indexing`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deidfs.config.model import Config, FolderConfig
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError
from deidfs.ops.metrics import Metrics
from deidfs.service.work import _Key, _Kind, _WorkQueue
from deidfs.view.index import Entry, Index, Status
from deidfs.view.render import SourceStat
from deidfs.view.tree import FolderView, ViewFile, ViewTree, pseudo_mtime_ns
from deidfs.watch.events import Change, FileEvent
from deidfs.watch.watcher import FolderWatcher

log = logging.getLogger(__name__)


#: Bumped when the bytes a view holds change for the same source, plan, layout and key
#: (render.py changes); part of every view digest, so old index rows are re-rendered.
RENDER_VERSION = "2"  # 2: data sets not whole at every depth withheld; bytes past the image zeroed


@dataclass
class _Folder:
    """Per-folder state; replaced as a whole when the folder's configuration changes."""

    config: FolderConfig
    view: FolderView
    prefix: str  #: root + "/", for cheap containment checks
    watcher: FolderWatcher | None = None
    #: Withheld sources: path -> (state, digest, reason).
    refused: dict[str, tuple[SourceStat, str, str]] = field(default_factory=dict)


def view_digest(
    plan_digest: str, layout: str, pseudonymizer: Pseudonymizer, max_header_bytes: int
) -> str:
    """Digest of everything a folder's views depend on besides the source itself (the
    header bound among them: what it withholds is part of what is served).

    The key enters as a keyed token, so the digest (stored in the index) reveals nothing.
    """
    key_id = pseudonymizer.token("view-digest", "key")
    blob = f"{RENDER_VERSION}\0{plan_digest}\0{layout}\0{key_id}\0{max_header_bytes}"
    return hashlib.sha256(blob.encode()).hexdigest()


class FolderSet:
    """The configured folders and the state their indexing shares.

    Parameters
    ----------
    config
        The running configuration (replaced by reloads).
    tree
        The mount's tree of views.
    metrics
        Where folders, watch changes and withheld files are counted.
    clock
        Monotonic clock.
    stopping
        Set when the daemon stops.
    """

    def __init__(
        self,
        config: Config,
        tree: ViewTree,
        metrics: Metrics,
        clock: Callable[[], float],
        stopping: threading.Event,
    ) -> None:
        self.config = config
        self.tree = tree
        self.metrics = metrics
        self.clock = clock
        self.stopping = stopping
        self.index: Index | None = None
        self.pseudo: Pseudonymizer | None = None
        #: Replaced as a whole (copy on write) by reloads; readers take a reference.
        self.by_id: dict[str, _Folder] = {}
        self.queue = _WorkQueue()
        self.counter_lock = threading.Lock()
        #: Held while the index and the tree are updated, never across a render.
        self.index_lock = threading.Lock()
        self._hinted: dict[_Key, float] = {}
        self.rendered = 0
        self.reused = 0

    def new_folder(
        self, fc: FolderConfig, config: Config, plans: dict[str, Plan] | None = None
    ) -> _Folder:
        """The state of a folder under ``config``; touches nothing (reloads build first).

        ``plans`` caches compiled plans by profile name across the folders of one config.
        """
        assert self.pseudo is not None
        profile = config.profiles.get(fc.profile)
        if profile is None:
            raise ConfigError(f"folder {fc.id!r}: no profile named {fc.profile!r}")
        if not profile.enabled:
            raise ConfigError(f"folder {fc.id!r}: profile {fc.profile!r} is disabled")
        cache = plans if plans is not None else {}
        plan = cache.get(fc.profile)
        if plan is None:
            plan = cache[fc.profile] = compile_plan(profile)
        root = Path(os.path.abspath(fc.path))
        view = FolderView(
            id=fc.id,
            root=root,
            plan=plan,
            pseudonymizer=self.pseudo,
            layout=fc.layout,
            digest=view_digest(
                plan.digest, fc.layout.value, self.pseudo, config.daemon.max_header_bytes
            ),
            max_header_bytes=config.daemon.max_header_bytes,
        )
        return _Folder(config=fc, view=view, prefix=str(root).rstrip("/") + "/")

    def start_watcher(self, folder: _Folder) -> None:
        d = self.config.daemon
        watcher = FolderWatcher(
            folder.config.id,
            folder.view.root,
            folder.config.watch,
            settle_seconds=d.settle_seconds,
            poll_seconds=d.poll_seconds,
            reconcile_seconds=d.reconcile_seconds,
            sink=self.sink,
            clock=self.clock,
        )
        folder.watcher = watcher
        watcher.start()

    def load_index(self) -> None:
        """Fill the tree from the index: rows of unchanged plans are served at once."""
        assert self.index is not None
        for stale in self.index.folders() - set(self.by_id):
            log.info("folder %s left the configuration; forgetting its index rows", stale)
            self.index.remove_folder(stale)
        for folder in self.by_id.values():
            self.load_folder_index(folder)

    def load_folder_index(self, folder: _Folder) -> None:
        assert self.index is not None
        for entry in self.index.iter_entries(folder.config.id):
            if not entry.path.startswith(folder.prefix):
                self.index.remove(entry.folder, entry.path)  # the folder moved
            elif entry.digest == folder.view.digest:
                self.apply(folder, entry)
                self.count(reused=1)

    def apply(self, folder: _Folder, entry: Entry) -> None:
        """Make the tree (and the refusal table) reflect one index entry."""
        if entry.status is Status.OK:
            folder.refused.pop(entry.path, None)
            vf = self._view_file(folder, entry)
            before = self.tree.file(vf.mount_path)
            self.tree.put(vf)
            if before is not None and before.source != vf.source:
                self._log_duplicate(folder, vf.source, before.source, vf.mount_path)
        else:
            self.tree.remove(folder.config.id, entry.path)
            folder.refused[entry.path] = (entry.source, entry.digest, entry.reason)

    def _log_duplicate(self, folder: _Folder, new: str, other: str, mount_path: str) -> None:
        """Two sources have one view path (the same SOP Instance UID, say): one is served."""
        served = self.tree.file(mount_path)
        if served is None or served.source not in (new, other):
            return  # changed meanwhile; whatever holds the path now was logged in its turn
        hidden = other if served.source == new else new
        log.info(
            "duplicate: folder=%s file=%s not served: same view as file=%s, which is served "
            "(see deidfs withheld)",
            folder.config.id,
            self.token(hidden),
            self.token(served.source),
        )

    def _view_file(self, folder: _Folder, entry: Entry) -> ViewFile:
        assert self.pseudo is not None
        # One folder id and digest object for all of a folder's files, not one per file.
        fid, digest = folder.config.id, folder.view.digest
        return ViewFile(
            folder=fid if entry.folder == fid else entry.folder,
            source=entry.path,
            state=entry.source,
            digest=digest if entry.digest == digest else entry.digest,
            relpath=entry.relpath,
            size=entry.view_size,
            mtime_ns=pseudo_mtime_ns(self.pseudo, entry.source, entry.digest),
            header_length=entry.header_length,
            pixel_offset=entry.pixel_offset,
            pixel_length=entry.pixel_length,
            trailer_length=entry.trailer_length,
        )

    # -- events --------------------------------------------------------------------------

    def sink(self, change: Change) -> None:
        """Watcher callback (on the watcher's thread): only queue."""
        kind = _Kind.READY if change.kind is FileEvent.READY else _Kind.GONE
        self.metrics.watch_change(change.folder_id, change.kind.value)
        self.queue.put((change.folder_id, os.fspath(change.path)), kind)

    def on_stale(self, folder_id: str, source: str) -> None:
        """FUSE callback: an open found the source changed; index it again once settled.

        A viewer retrying a changed file calls this in a loop: at most one hint per
        source and second goes to the queue.
        """
        key = (folder_id, source)
        now = self.clock()
        with self.counter_lock:
            if now - self._hinted.get(key, -1e9) < 1.0:
                return
            if len(self._hinted) > 4096:
                self._hinted.clear()
            self._hinted[key] = now
        self.queue.put(key, _Kind.HINT)

    def withhold(self, folder: _Folder, path: str, state: SourceStat | None, reason: str) -> None:
        """Fail closed: the source is not shown; counted by reason, logged by token."""
        assert self.index is not None
        fid = folder.config.id
        self.tree.remove(fid, path)
        if state is None:
            folder.refused.pop(path, None)
            return
        before = folder.refused.get(path)
        first = before is None or before[2] != reason
        entry = Entry(
            folder=fid,
            path=path,
            source=state,
            digest=folder.view.digest,
            status=Status.REFUSED,
            reason=reason,
            indexed_ns=time.time_ns(),
        )
        self.index.put(entry)
        folder.refused[path] = (state, entry.digest, reason)
        if first:
            self.metrics.file_refused(fid, reason)
            log.info("withheld: folder=%s file=%s reason=%s", fid, self.token(path), reason)

    def forget(self, folder: _Folder, path: str) -> None:
        assert self.index is not None
        fid = folder.config.id
        self.tree.remove(fid, path)
        folder.refused.pop(path, None)
        if self.root_reachable(folder):
            self.index.remove(fid, path)
        # else: an outage; the row stays so the file comes back without being parsed again.

    @staticmethod
    def root_reachable(folder: _Folder) -> bool:
        try:
            return stat.S_ISDIR(os.stat(folder.view.root).st_mode)
        except OSError:
            return False

    def verify(self) -> None:
        """Drop what the index knows but the disk no longer has (deleted while stopped)."""
        for folder in list(self.by_id.values()):
            if self.stopping.is_set():
                return
            reachable = self.root_reachable(folder)
            known = [vf.source for vf in self.tree.sources(folder.config.id)]
            known += list(folder.refused)
            gone = 0
            for path in known:
                if self.stopping.is_set():
                    return
                try:
                    os.lstat(path)
                except FileNotFoundError:
                    if reachable:
                        self.queue.put((folder.config.id, path), _Kind.GONE)
                        gone += 1
                except OSError:
                    pass
            if not reachable:
                # Nothing can be read: withdraw the views until the watcher finds the root.
                for path in known:
                    self.tree.remove(folder.config.id, path)
                log.warning(
                    "folder %s: root unreachable; its views are withdrawn", folder.config.id
                )
            elif gone:
                log.info("folder %s: %d source(s) deleted while stopped", folder.config.id, gone)

    def count(self, rendered: int = 0, reused: int = 0) -> None:
        with self.counter_lock:
            self.rendered += rendered
            self.reused += reused

    def token(self, path: str) -> str:
        pseudo = self.pseudo
        return pseudo.token(path, "path")[:12] if pseudo is not None else "-"
