"""The C read path of one mount as its operations use it (:class:`CReadPath`).

:mod:`deidfs.mount.fastread` is the C code's interface (its tables of view files, handles
and templates); this is the glue a mount's operations call: starting and ending the C path
with the mount, registering what Python opened, adopting what C opened, the drains that
release in Python what libfuse released in C, and the counts in the metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from deidfs.mount.fastread import C_FH, DRAIN_SECONDS, FastReads
from deidfs.ops.metrics import Metrics
from deidfs.view.handles import SOURCE_OPEN_FLAGS, ViewFS

log = logging.getLogger(__name__)


class CReadPath:
    """The C read path of one mount, as its operations use it: the C tables
    (:class:`FastReads`), the tree's listener that keeps the file table in step, the drains
    that release in Python what libfuse released in C, and the counts in the metrics."""

    def __init__(self, fs: ViewFS, metrics: Metrics | None) -> None:
        self.fs = fs
        self.tree = fs.tree
        self.metrics = metrics
        self.fast = FastReads()
        self.tree.on_folders_change = self.fast.folders_changed
        self._drainer: threading.Thread | None = None
        self._draining = threading.Event()
        self._sync_lock = threading.Lock()
        self._adopt_lock = threading.Lock()

    def start(self) -> None:
        """libfuse is up (its init): the file table and the drains start."""
        if self._drainer is not None:
            return
        # Under the tree's lock: the C table holds every file served now, then follows
        # each change in order.
        self.tree.watch_files(self.fast.file_changed)
        # At most half the handles C opens itself: Python counts them against its bound,
        # and C never takes the rest from the opens Python must make.
        self.fs.open_elsewhere = self.fast.c_open
        self.fast.open_from_templates(
            SOURCE_OPEN_FLAGS, max(1, self.fs.max_handles // 2), self.fs.cache.max_bytes
        )
        self._draining.clear()
        self._drainer = threading.Thread(
            target=self._drain_loop, name="deidfs-release", daemon=True
        )
        self._drainer.start()

    def end(self) -> None:
        """Stop the drains and take every handle of this mount out of the C table (the
        handles stay open in Python, which releases or closes them)."""
        self._draining.set()
        drainer, self._drainer = self._drainer, None
        if drainer is not None and drainer is not threading.current_thread():
            drainer.join(5.0)
        self.tree.watch_files(None)
        # Every handle C opened becomes Python's, which closes it.
        for fh in self.fast.all_opened():
            self.adopt(fh)
        self.sync()
        self.fast.forget_all()
        self.fast.end()
        self.fs.open_elsewhere = None

    def before_open(self) -> int:
        """Release what libfuse released (descriptors first); the epoch to register the
        handle about to be opened with (read before open's checks: a reload after them
        is seen)."""
        self._reap()
        return self.fast.epoch()

    def register(self, path: str, fh: int, epoch: int, direct_io: bool = False) -> None:
        """Let the C path serve the reads of a handle just opened at ``path`` and, if it
        was opened through the page cache, later opens of the same version of the path."""
        held = self.fs.held_source(fh)
        if held is None:
            return
        fd, view, ctime_ns, vf = held
        if not direct_io and view.source == vf.state:
            # Under the tree's lock, served and settled: the file table's entry is vf's,
            # and its next change takes the template off before it is published.
            self.tree.if_current(path, vf, lambda: self.fast.set_template(path, vf, view, epoch))
        if not self.fast.register(fh, path, fd, view, ctime_ns, epoch):
            return
        # After registering: a change of the path published before it is seen here, one
        # published after it marks the handle (invalidate marks before the kernel's pages
        # are dropped). Either way Python checks that handle's reads from then on.
        if self.tree.file(path) is not vf:
            self.fast.mark_handle(fh)

    def adopt(self, fh: int) -> bool:
        """Hold handle ``fh``, which C opened, in Python from now on (its reads checked
        there, its version counted); whether Python holds it now."""
        if fh < C_FH:
            return False
        with self._adopt_lock:
            if self.fs.held(fh) is not None:
                return True
            got = self.fast.adopt(fh)
            if got is None:
                return False
            self.fs.adopt(got.fh, got.fd, got.file, got.view, got.ctime_ns, got.nlink)
            return True

    def mark(self, paths: Iterable[str]) -> None:
        """The tree changed ``paths``: Python holds every handle open on them from now on
        (their reads are checked there; an open of the new version sees the old ones)."""
        paths = list(paths)
        for fh in self.fast.opened_at(paths):
            self.adopt(fh)
        self.fast.mark(paths)

    def sync(self) -> None:
        """Release the handles the C path released, and count what it did in the metrics
        (every :data:`DRAIN_SECONDS` and at each scrape)."""
        self._reap()
        new = self.fast.new_counts()
        m = self.metrics
        if m is not None:
            m.fuse_op("read", new.reads)
            m.fuse_op("release", new.releases)
            m.fuse_op("getattr", new.getattrs)
            m.fuse_op("open", new.opens)
            m.fuse_read(new.bytes)

    def _reap(self) -> None:
        """Release in Python the handles the C path released (their descriptors)."""
        with self._sync_lock:
            for fh in self.fast.drain():
                self.fs.release(fh)

    def _drain_loop(self) -> None:
        while not self._draining.wait(DRAIN_SECONDS):
            try:
                self.sync()
            except Exception as exc:  # never end the loop: descriptors would pile up
                log.error("draining released handles failed: %s", type(exc).__name__)
