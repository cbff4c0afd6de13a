"""Write views as files: atomically, durably and idempotently.

A view is written to a temporary dotfile in its target directory (``.deidfs-<pid>-<rand>.tmp``),
flushed to disk with ``fsync``, and only then renamed to its final name, so a reader (or a
crash, or ``kill -9``) never leaves a partial file under a final name. Renamed directories are
fsynced too. Temporary files left by a killed writer are removed the next time a writer works
in that directory; until then they are dotfiles, which deidfs never takes as sources.

``fsync`` waits for the disk, so it runs on a commit thread while the caller renders and writes
the next view: :meth:`ExportWriter.put` returns once the bytes are in the temporary file, and
:meth:`ExportWriter.finish` reports how each one ended.

A target that exists with the same size, the same header and trailer bytes, and was written
after the source last changed, is left alone ("unchanged"): the pixel bytes between come
unchanged from that same source.

Several sources may name one target (the same SOP Instance UID in two files). With
``replace=False`` a writer never replaces an existing file: a new target is created with
``link()``, which fails if another source created it meanwhile, and a view whose target already
exists with other bytes is left ``PENDING`` in its (durable) temporary file for the caller to
:meth:`~ExportWriter.settle` or :meth:`~ExportWriter.discard` once it knows which source wins.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import secrets
import stat
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError, Refused
from deidfs.render import Layout, SourceStat, View, render, source_unchanged, write_view

log = logging.getLogger(__name__)

TEMP_PREFIX = ".deidfs-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.deidfs-(\d+)-[0-9a-f]+\.tmp$")
#: Views waiting for their fsync at most; bounds open file descriptors and memory.
MAX_PENDING = 64
#: Mode of written files (before the umask), like any file a user creates.
FILE_MODE = 0o644


class Outcome(Enum):
    """How one view ended on disk."""

    WRITTEN = "written"  #: a new file
    REPLACED = "replaced"  #: an existing file with other bytes was replaced
    UNCHANGED = "unchanged"  #: an identical file was already there
    PENDING = "pending"  #: written to ``Result.temp``; the target exists (``replace=False``)


class ExportError(DeidfsError):
    """A view could not be written. The message names no source path and no value."""

    exit_code = os.EX_CANTCREAT

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Result:
    """What became of the view submitted under ``key``; ``error`` set when it failed."""

    key: Hashable
    outcome: Outcome | None
    size: int
    relpath: PurePosixPath
    temp: Path | None = None  #: the temporary file of a ``PENDING`` view
    error: ExportError | None = None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of a writer (a dotfile, never a source)."""
    return _TEMP_NAME.match(name) is not None


def target_path(root: Path, relpath: PurePosixPath) -> Path:
    """``root / relpath``, refusing any path that could leave ``root`` or hide as a dotfile."""
    parts = relpath.parts
    if not parts or relpath.is_absolute():
        raise ExportError("view path is empty or absolute")
    for part in parts:
        if part in (".", "..") or part.startswith(".") or "\x00" in part:
            raise ExportError("view path has a component that is not a plain name")
    return root.joinpath(*parts)


def _oserror(what: str, exc: OSError) -> ExportError:
    # str(OSError) carries the file name, which may carry PHI; strerror does not.
    return ExportError(f"{what}: {exc.strerror or type(exc).__name__}", exc.errno)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temps(directory: Path) -> int:
    """Remove temporary files of writers that no longer run from ``directory``.

    Returns
    -------
    int
        How many were removed.
    """
    removed = 0
    try:
        entries = os.scandir(directory)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            m = _TEMP_NAME.match(entry.name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                continue  # removed meanwhile by another writer
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted writer", removed)
    return removed


def _same_file(target: Path, view: View) -> bool:
    """The target already holds this view: same size, header and trailer, newer than source."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != view.size
            or st.st_mtime_ns < view.source.mtime_ns
        ):
            return False
        header = view.header
        if os.pread(fd, len(header), 0) != header:
            return False
        trailer = view.trailer
        return not trailer or os.pread(fd, len(trailer), view.size - len(trailer)) == trailer
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Pending:
    key: Hashable
    fd: int
    temp: Path
    target: Path
    relpath: PurePosixPath
    size: int


class ExportWriter:
    """Writes views under ``root``; use as a context manager, or call :meth:`finish`.

    Parameters
    ----------
    root
        The output directory; created if missing.
    durable
        Flush each file (and its directory) to disk before it appears under its name. Off,
        a crash of the machine (not of the process) may leave empty files under final names.
    replace
        Replace an existing target with other bytes. When false, such a view ends
        ``PENDING`` (see the module's notes).
    owner_pid
        The process whose id names the temporary files (default: this one). Writers in
        worker processes name the coordinating process, which outlives them and settles
        their ``PENDING`` files, so no other writer takes those for leftovers.
    """

    def __init__(
        self,
        root: Path,
        *,
        durable: bool = True,
        replace: bool = True,
        owner_pid: int | None = None,
    ) -> None:
        self.root = root
        self.durable = durable
        self.replace = replace
        self._pid = os.getpid() if owner_pid is None else owner_pid
        self._dirs_ready: set[Path] = set()
        self._dirs_touched: set[Path] = set()
        self._queue: queue.Queue[_Pending | None] = queue.Queue(MAX_PENDING)
        self._results: list[Result] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- public ---------------------------------------------------------------------------------
    def check_root(self) -> None:
        """Create the output directory and prove a file can be created in it.

        Raises
        ------
        ExportError
            When it cannot (read-only file system, permissions, not a directory).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _oserror("cannot create the output directory", exc) from None
        temp = self.root / self._temp_name()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise _oserror("cannot write to the output directory", exc) from None
        os.close(fd)
        os.unlink(temp)
        self._dirs_ready.add(self.root)

    def put(self, key: Hashable, view: View, src_fd: int) -> None:
        """Write ``view`` (pixel bytes from ``src_fd``) to its temporary file and queue its
        commit. The result, reported by :meth:`finish`, carries ``key``.

        Raises
        ------
        Refused
            When the source changed while its view was being written (nothing is left).
        ExportError
            When the file cannot be written (nothing is left).
        """
        target = target_path(self.root, view.relpath)
        directory = target.parent
        self._prepare_dir(directory)
        if _same_file(target, view):
            self._add(Result(key, Outcome.UNCHANGED, view.size, view.relpath))
            return
        temp = directory / self._temp_name()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise _oserror("cannot create a temporary file", exc) from None
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                write_view(view, src_fd, out)
            if not source_unchanged(view, src_fd):
                raise Refused("source_changed", "source changed while it was written")
        except BaseException as exc:
            os.close(fd)
            _unlink_quietly(temp)
            if isinstance(exc, OSError):
                raise _oserror("cannot write the file", exc) from None
            raise
        self._ensure_thread()
        self._queue.put(_Pending(key, fd, temp, target, view.relpath, view.size))

    def put_path(
        self,
        key: Hashable,
        path: str | os.PathLike[str],
        plan: Plan,
        pseudonymizer: Pseudonymizer,
        layout: Layout = Layout.DICOM,
        source_rel: PurePosixPath | None = None,
    ) -> None:
        """Render the source at ``path`` and :meth:`put` its view.

        The source is opened once, read-only and without following a final symbolic link
        (as :func:`~deidfs.render.render_path` does); its pixel bytes are copied from that
        same open file, so a file replaced meanwhile can never mix into the output.

        Raises
        ------
        Refused
            As :func:`~deidfs.render.render` does, and when the source changes meanwhile.
        ExportError
            When the source cannot be opened or the file cannot be written.
        """
        try:
            # O_NONBLOCK: opening a FIFO swapped in for the file must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _oserror("cannot open the source", exc) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("not_regular", "not a regular file")
            view = render(f, SourceStat.of(st), plan, pseudonymizer, layout, source_rel)
            self.put(key, view, fd)

    def finish(self) -> list[Result]:
        """Wait for every queued view to be on disk under its name; return all results.

        The writer can be used again afterwards.
        """
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()
            self._thread = None
        with self._lock:
            results, self._results = self._results, []
            touched, self._dirs_touched = self._dirs_touched, set()
        if self.durable:
            # Deepest first: a new directory's own entries, then its entry in its parent.
            for directory in sorted(touched, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(directory)
        return results

    def abort(self) -> None:
        """Stop: views not yet renamed are dropped and their temporary files removed."""
        thread = self._thread
        if thread is None:
            return
        while True:  # drain what the thread has not taken yet
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                os.close(item.fd)
                _unlink_quietly(item.temp)
        self._queue.put(None)
        thread.join()
        self._thread = None

    def __enter__(self) -> ExportWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    # -- internals ------------------------------------------------------------------------------
    def _temp_name(self) -> str:
        return f"{TEMP_PREFIX}{self._pid}-{secrets.token_hex(6)}{TEMP_SUFFIX}"

    def _add(self, result: Result) -> None:
        with self._lock:
            self._results.append(result)

    def _prepare_dir(self, directory: Path) -> None:
        if directory in self._dirs_ready:
            return
        missing: list[Path] = []
        probe = directory
        while probe != self.root and not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _oserror("cannot create a directory", exc) from None
        if missing:
            # A new directory is durable only once the directory holding it is synced.
            with self._lock:
                self._dirs_touched.update(p.parent for p in missing)
        else:
            remove_stale_temps(directory)
        self._dirs_ready.add(directory)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._commit_loop, name="deidfs-export-commit", daemon=True
            )
            self._thread.start()

    def _commit_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._add(self._commit(item))

    def _commit(self, item: _Pending) -> Result:
        outcome = Outcome.WRITTEN
        temp: Path | None = None
        try:
            try:
                if self.durable:
                    os.fsync(item.fd)
            finally:
                os.close(item.fd)
            if self.replace:
                if os.path.lexists(item.target):
                    outcome = Outcome.REPLACED
                os.rename(item.temp, item.target)
            elif not _link_new(item.temp, item.target):
                outcome, temp = Outcome.PENDING, item.temp
        except OSError as exc:
            _unlink_quietly(item.temp)
            error = _oserror("cannot commit the file", exc)
            return Result(item.key, None, item.size, item.relpath, error=error)
        if temp is None:
            with self._lock:
                self._dirs_touched.add(item.target.parent)
        return Result(item.key, outcome, item.size, item.relpath, temp)

    def settle(self, temp: Path, relpath: PurePosixPath) -> Outcome:
        """Put a ``PENDING`` view's temporary file in place, replacing its target.

        Raises
        ------
        ExportError
            When it cannot be renamed (the temporary file is removed).
        """
        target = target_path(self.root, relpath)
        outcome = Outcome.REPLACED if os.path.lexists(target) else Outcome.WRITTEN
        try:
            os.rename(temp, target)
        except OSError as exc:
            _unlink_quietly(temp)
            raise _oserror("cannot commit the file", exc) from None
        with self._lock:
            self._dirs_touched.add(target.parent)
        return outcome

    @staticmethod
    def discard(temp: Path) -> None:
        """Remove a ``PENDING`` view's temporary file."""
        _unlink_quietly(temp)


def _link_new(temp: Path, target: Path) -> bool:
    """Publish ``temp`` as ``target`` unless ``target`` exists; True when published (then
    ``temp`` is gone)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        # No hard links here (some network and FUSE file systems): a plain rename, which
        # can race with another writer of the same target; the later one then wins.
        if os.path.lexists(target):
            return False
        os.rename(temp, target)
        return True
    _unlink_quietly(temp)
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove a temporary file: %s", exc.strerror)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("could not flush a directory to disk: %s", exc.strerror)
    finally:
        os.close(fd)
