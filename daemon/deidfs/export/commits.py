"""The commit of written views: hashed, flushed to disk and put under their names.

A :class:`CommitPipeline` takes a writer's views once their bytes are in their (unnamed or
temporary) files. Hashing for the manifest runs on commit threads while the caller renders
and writes the next view; durable views are held and flushed in groups (one ``syncfs`` for
the output's file system, ``fsync`` per file where that fails), then each is linked or
renamed under its name, or left ``PENDING`` in its temporary file when its target exists and
the writer does not replace.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deidfs.export.dirs import _lexists_at
from deidfs.export.errors import _oserror
from deidfs.export.files import (
    _link_new,
    _link_unnamed,
    _syncfs,
    _unlink_at_quietly,
    sha256_fd,
)
from deidfs.export.outcomes import Outcome, Result
from deidfs.export.outputdirs import OutputDirs

#: Views waiting for their hash or their flush to disk at most; bounds open file descriptors
#: and memory. A durable writer flushes this many at once (see :class:`CommitPipeline`).
MAX_PENDING = 64
#: Threads that hash, flush and rename written files while the caller writes the next ones:
#: hashing (without the GIL) takes longer than copying a file's pixels in the kernel.
COMMIT_THREADS = 2


@dataclass(slots=True)
class _Pending:
    key: Hashable
    fd: int
    temp: str | None  #: None: an unnamed file (``O_TMPFILE``), linked into place by ``fd``
    dir_fd: int  #: its directory (a descriptor of its own, closed with it)
    rel_dir: PurePosixPath
    relpath: PurePosixPath
    size: int
    dev: int  #: the file system the temporary file is on
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.relpath.name


class CommitPipeline:
    """Commits of one writer's views (see the module's notes).

    Parameters
    ----------
    out
        The writer's output directories (directories gaining entries are noted there).
    root
        The output directory, to name the temporary files of ``PENDING`` views.
    durable, replace, digest
        As :class:`~deidfs.export.writer.ExportWriter` takes them.
    temp_name
        A new temporary name for a file of the writer.
    """

    def __init__(
        self,
        out: OutputDirs,
        root: Path,
        durable: bool,
        replace: bool,
        digest: bool,
        temp_name: Callable[[], str],
    ) -> None:
        self._out = out
        self.root = root
        self.durable = durable
        self.replace = replace
        self.digest = digest
        self._temp_name = temp_name
        self._queue: queue.Queue[_Pending | None] = queue.Queue(MAX_PENDING)
        #: Durable views written (and hashed) that wait for the group flush.
        self._unsynced: list[_Pending] = []
        self._results: list[Result] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def submit(self, pending: _Pending) -> None:
        """Commit ``pending``: now, held for the group flush, or on a commit thread."""
        if not self.digest:
            # Nothing to hash: a commit thread would only cost hand-offs of the GIL.
            if self.durable:
                self._hold(pending)
            else:
                self.add(self._commit(pending))
            return
        self._ensure_thread()
        self._queue.put(pending)

    def finish(self) -> list[Result]:
        """Wait for every submitted view to be committed; return all results since the last
        call."""
        self._stop_threads()
        self._flush_group()
        with self._lock:
            results, self._results = self._results, []
        return results

    def abort(self) -> None:
        """Drop the views not yet renamed and remove their temporary files."""
        self._drop_unsynced()
        if self._threads:
            while True:  # drain what the threads have not taken yet
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._discard_pending(item)
            self._stop_threads()
            self._drop_unsynced()

    def _name(self, item: _Pending) -> str:
        """Give the unnamed file of ``item`` a temporary name in its directory."""
        temp = self._temp_name()
        _link_unnamed(item.fd, item.dir_fd, temp)
        return temp

    def _publish(self, item: _Pending) -> tuple[Outcome, str | None]:
        """Put ``item``'s file under its target name (its fd still open); returns the outcome
        and, for ``PENDING``, the name of the temporary file that holds the view."""
        d = item.dir_fd
        if item.temp is None:
            try:
                _link_unnamed(item.fd, d, item.name)
                return Outcome.WRITTEN, None
            except FileExistsError:
                item.temp = self._name(item)  # replaced below, or left pending
            if not self.replace:
                return Outcome.PENDING, item.temp
            os.rename(item.temp, item.name, src_dir_fd=d, dst_dir_fd=d)
            return Outcome.REPLACED, None
        if self.replace:
            outcome = Outcome.REPLACED if _lexists_at(d, item.name) else Outcome.WRITTEN
            os.rename(item.temp, item.name, src_dir_fd=d, dst_dir_fd=d)
            return outcome, None
        if not _link_new(d, item.temp, item.name):
            return Outcome.PENDING, item.temp
        return Outcome.WRITTEN, None

    def _discard_pending(self, item: _Pending) -> None:
        os.close(item.fd)
        if item.temp is not None:
            _unlink_at_quietly(item.dir_fd, item.temp)
        os.close(item.dir_fd)

    def add(self, result: Result) -> None:
        with self._lock:
            self._results.append(result)

    def _ensure_thread(self) -> None:
        while len(self._threads) < COMMIT_THREADS:
            thread = threading.Thread(
                target=self._commit_loop, name="deidfs-export-commit", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _stop_threads(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _commit_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not self.durable:
                self.add(self._commit(item))
                continue
            try:
                item.sha256 = sha256_fd(item.fd, item.size)
            except OSError as exc:
                self.add(self._fail(item, exc))
                continue
            self._hold(item)

    def _hold(self, item: _Pending) -> None:
        """Keep a durable view for the group flush; flush the group once it is full."""
        with self._lock:
            self._unsynced.append(item)
            full = len(self._unsynced) >= MAX_PENDING
        if full:
            self._flush_group()

    def _flush_group(self) -> None:
        """Flush the held views' files to disk and rename them into place."""
        with self._lock:
            group, self._unsynced = self._unsynced, []
        if not group:
            return
        # One syncfs for the files on the output's file system; fsync for the rest, and for
        # all when syncfs fails (then each file's own error is known).
        root_id = self._out.root_id
        root_dev = root_id[0] if root_id is not None else None
        shared = [item for item in group if item.dev == root_dev]
        if not shared or not _syncfs(shared[0].dir_fd):
            shared = []
        synced = {id(item) for item in shared}
        for item in group:
            if id(item) not in synced:
                try:
                    os.fsync(item.fd)
                except OSError as exc:
                    self.add(self._fail(item, exc))
                    continue
            self.add(self._commit(item))

    def _drop_unsynced(self) -> None:
        with self._lock:
            group, self._unsynced = self._unsynced, []
        for item in group:
            self._discard_pending(item)

    def _fail(self, item: _Pending, exc: OSError) -> Result:
        self._discard_pending(item)
        error = _oserror("cannot commit the file", exc)
        return Result(item.key, None, item.size, item.relpath, error=error)

    def _commit(self, item: _Pending) -> Result:
        """Close ``item``'s file and rename it into place (its data is flushed already, or
        need not be); non-durable views with a digest are hashed here."""
        digest = item.sha256
        try:
            if self.digest and not digest:
                digest = sha256_fd(item.fd, item.size)
            outcome, temp = self._publish(item)
        except OSError as exc:
            return self._fail(item, exc)
        os.close(item.fd)
        os.close(item.dir_fd)
        if temp is None:
            self._out.touch(item.rel_dir)
        temp_path = self.root.joinpath(*item.rel_dir.parts, temp) if temp is not None else None
        return Result(item.key, outcome, item.size, item.relpath, temp_path, sha256=digest)
