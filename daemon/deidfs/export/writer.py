"""Write views as files: atomically, durably and idempotently.

A view is written to a file without a name (``O_TMPFILE``) in its target directory, flushed to
disk, and only then linked under its final name, so a reader (or a crash, or ``kill -9``)
never sees a partial file under a final name, and an interrupted writer leaves nothing behind.
Where the file system has no ``O_TMPFILE``, the file is a temporary dotfile
(``.deidfs-<pid>-<rand>.tmp``) renamed into place; temporary files left by a killed writer are
removed the next time a writer works in that directory, and until then they are dotfiles,
which deidfs never takes as sources. Directories that gain entries are fsynced too.

Flushing waits for the disk, so it is done for groups of files (one ``syncfs``), and hashing
for the manifest runs on commit threads while the caller renders and writes the next view:
:meth:`ExportWriter.put` returns once the bytes are in the file, and
:meth:`ExportWriter.finish` reports how each one ended.

A target that exists with the same size, the same header and trailer bytes, and was written
after the source last changed, is left alone ("unchanged"): the pixel bytes between come
unchanged from that same source.

Several sources may name one target (the same SOP Instance UID in two files). With
``replace=False`` a writer never replaces an existing file: a new target is created with
``link()``, which fails if another source created it meanwhile, and a view whose target already
exists with other bytes is left ``PENDING`` in its (durable) temporary file for the caller to
:meth:`~ExportWriter.settle` or :meth:`~ExportWriter.discard` once it knows which source wins.

A writer follows no symbolic link: it opens every directory from ``/`` down, one component
at a time with ``O_NOFOLLOW`` (:mod:`deidfs.export.dirs`), and creates, links and renames
files relative to the descriptor of their directory. A link in the way, there before or
swapped in meanwhile, is refused (:class:`~deidfs.export.errors.ExportRefused`, exit 77) and
never written through.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path, PurePosixPath

from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError, Refused
from deidfs.export.commits import CommitPipeline, _Pending
from deidfs.export.dirs import (
    _HERE,
    DirId,
    _lexists_at,
)
from deidfs.export.errors import ExportError, _oserror
from deidfs.export.files import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    _fsync_dir_fd,
    _proc_fd_dir,
    _start_writeback,
    _unlink_at_quietly,
    is_temp_name,
    remove_stale_temps,
)
from deidfs.export.outcomes import Outcome, Result
from deidfs.export.outputdirs import OutputDirs
from deidfs.view.render import (
    Layout,
    SourceStat,
    View,
    read_view,
    render,
    source_unchanged,
    write_view_fd,
)

log = logging.getLogger(__name__)


#: Mode of written files (before the umask), like any file a user creates.
FILE_MODE = 0o644


def target_path(root: Path, relpath: PurePosixPath) -> Path:
    """``root / relpath``, refusing any path that could leave ``root`` or hide as a dotfile."""
    parts = relpath.parts
    if not parts or relpath.is_absolute():
        raise ExportError("view path is empty or absolute")
    for part in parts:
        if part in (".", "..") or part.startswith(".") or "\x00" in part:
            raise ExportError("view path has a component that is not a plain name")
    return root.joinpath(*parts)


def _same_file(dir_fd: int, name: str, view: View, src_fd: int) -> bool:
    """The file ``name`` in ``dir_fd`` holds this view already: same size, header and
    trailer, newer than the source.

    A view with redacted pixels (in memory or zeroed ranges) is compared in its pixel bytes
    too: another mask leaves header and trailer as they were.
    """
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(name, flags, dir_fd=dir_fd)
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
        if trailer and os.pread(fd, len(trailer), view.size - len(trailer)) != trailer:
            return False
        if view.pixels or view.zeroed:
            at = len(header)
            end = view.size - len(trailer)
            while at < end:
                n = min(end - at, 1 << 20)
                if os.pread(fd, n, at) != read_view(view, src_fd, at, n):
                    return False
                at += n
        return True
    except (OSError, Refused):
        return False
    finally:
        os.close(fd)


class ExportWriter:
    """Writes views under ``root``; use as a context manager, or call :meth:`finish`.

    Every file is created, linked and renamed relative to descriptors of its directories,
    each opened from the one above without following a symbolic link, starting from ``/``:
    a link anywhere on the way (the root's path included), present or swapped in while the
    writer works, is refused (:class:`~deidfs.export.errors.ExportRefused`) and never written
    through. Callers resolve the links of an admin's destination first
    (:func:`~deidfs.export.confinement.resolve_destination`).

    Parameters
    ----------
    root
        The output directory, an absolute path without symbolic links; created if missing.
    durable
        Flush each file (and its directory) to disk before it appears under its name. Off,
        a crash of the machine (not of the process) may leave empty files under final names.
        Files are flushed in groups: the temporary files of up to
        :data:`~deidfs.export.commits.MAX_PENDING` views (or all those written before
        :meth:`finish`) are flushed with one ``syncfs(2)`` of
        the output's file system, then renamed; one journal commit for the group instead of
        one per file. Where ``syncfs`` is missing or fails, or a file lies on another file
        system, each file gets its own ``fsync``. Each file's writeback is started as soon
        as it is written, so the disk writes while the next views are rendered.
    replace
        Replace an existing target with other bytes. When false, such a view ends
        ``PENDING`` (see the module's notes).
    owner_pid
        The process whose id names the temporary files (default: this one). Writers in
        worker processes name the coordinating process, which outlives them and settles
        their ``PENDING`` files, so no other writer takes those for leftovers.
    digest
        Compute the SHA-256 of every file written (``Result.sha256``), from the temporary
        file on the commit thread, before it is flushed and renamed.
    expect
        The identity (:attr:`root_id`) the root must have: a writer in a worker process
        writes only into the directory its coordinator checked, not one put in its place.
    guard
        Identities of directories never to write in, nor below: each directory opened on the
        way to a file is compared with them.
    """

    def __init__(
        self,
        root: Path,
        *,
        durable: bool = True,
        replace: bool = True,
        owner_pid: int | None = None,
        digest: bool = False,
        expect: DirId | None = None,
        guard: frozenset[DirId] = frozenset(),
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.durable = durable
        self.replace = replace
        self.digest = digest
        self.guard = guard
        self._pid = os.getpid() if owner_pid is None else owner_pid
        self._out = OutputDirs(self.root, self._pid, expect, guard)
        #: Unnamed files work here (O_TMPFILE, and /proc to link them by descriptor).
        self._unnamed = _proc_fd_dir() is not None
        self._commits = CommitPipeline(
            self._out, self.root, durable, replace, digest, self._temp_name
        )

    # -- public ---------------------------------------------------------------------------------
    @property
    def root_id(self) -> DirId | None:
        """The root's identity, once it was opened (:meth:`check_root`)."""
        return self._out.root_id

    def root_fd(self) -> int:
        """An open descriptor of the root (the writer's own: do not close it).

        Raises
        ------
        ExportRefused
            A symbolic link on the way, or the root is not the directory it was.
        OSError
            When it cannot be opened or created.
        """
        return self._out.root_fd()

    def check_root(self) -> None:
        """Create the output directory and prove a file can be created in it.

        Raises
        ------
        ExportRefused
            When a symbolic link stands on its path (see the class's notes).
        ExportError
            When it cannot (read-only file system, permissions, not a directory).
        """
        try:
            root = self.root_fd()
        except OSError as exc:
            raise _oserror("cannot create the output directory", exc) from None
        temp = self._temp_name()
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(temp, flags, FILE_MODE, dir_fd=root)
        except OSError as exc:
            self.close()  # nothing to hold the directory open for (it may be unmounted)
            raise _oserror("cannot write to the output directory", exc) from None
        os.close(fd)
        os.unlink(temp, dir_fd=root)
        remove_stale_temps(root, self._pid)
        self._out.ready.add(_HERE)

    def put(self, key: Hashable, view: View, src_fd: int) -> None:
        """Write ``view`` (pixel bytes from ``src_fd``) to its temporary file and queue its
        commit. The result, reported by :meth:`finish`, carries ``key``.

        Raises
        ------
        Refused
            When the source changed while its view was being written (nothing is left).
        ExportError
            When the file cannot be written (nothing is left);
            :class:`~deidfs.export.errors.ExportRefused` when its directory cannot be reached
            without a symbolic link.
        """
        target_path(self.root, view.relpath)  # a plain relative path, or refused
        rel_dir = view.relpath.parent
        dir_fd = self._out.prepare(rel_dir)
        name = view.relpath.name
        if rel_dir not in self._out.new and _same_file(dir_fd, name, view, src_fd):
            self._commits.add(Result(key, Outcome.UNCHANGED, view.size, view.relpath))
            return
        fd, temp = self._create(dir_fd)
        try:
            write_view_fd(view, src_fd, fd)
            written = os.fstat(fd)
            if written.st_size != view.size:
                raise ExportError("cannot write the file: it came out short", errno.EIO)
            if not source_unchanged(view, src_fd):
                raise Refused("source_changed", "source changed while it was written")
        except BaseException as exc:
            os.close(fd)
            if temp is not None:
                _unlink_at_quietly(dir_fd, temp)
            if isinstance(exc, OSError):
                raise _oserror("cannot write the file", exc) from None
            raise
        if self.durable:
            _start_writeback(fd)
        own_dir = os.dup(dir_fd)  # the cached one may be closed before this file is committed
        pending = _Pending(key, fd, temp, own_dir, rel_dir, view.relpath, view.size, written.st_dev)
        self._commits.submit(pending)

    def put_path(
        self,
        key: Hashable,
        path: str | os.PathLike[str],
        plan: Plan,
        pseudonymizer: Pseudonymizer,
        layout: Layout = Layout.DICOM,
        source_rel: PurePosixPath | None = None,
        cached: ViewLookup | None = None,
        max_header_bytes: int | None = None,
    ) -> View:
        """Render the source at ``path``, :meth:`put` its view and return the view.

        The source is opened once, read-only and without following a final symbolic link
        (as :func:`~deidfs.view.render.render_path` does); its pixel bytes are copied from that
        same open file, so a file replaced meanwhile can never mix into the output.
        ``cached`` may hold the view already, for this path and the state the open file has
        (built with the same plan, layout and key): then it is not rendered again.

        Raises
        ------
        Refused
            As :func:`~deidfs.view.render.render` does, and when the source changes meanwhile.
        ExportError
            When the source cannot be opened or the file cannot be written.
        """
        try:
            # O_NONBLOCK: opening a FIFO swapped in for the file must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _oserror("cannot open the source", exc, source=True) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("not_regular", "not a regular file")
            state = SourceStat.of(st)
            view = cached(os.fspath(path), state) if cached is not None else None
            if view is None or view.source != state:
                view = render(
                    f,
                    state,
                    plan,
                    pseudonymizer,
                    layout,
                    source_rel,
                    max_header_bytes=max_header_bytes,
                )
            self.put(key, view, fd)
        return view

    def finish(self) -> list[Result]:
        """Wait for every queued view to be on disk under its name; return all results.

        The writer can be used again afterwards.
        """
        results = self._commits.finish()
        touched = self._out.take_touched()
        if self.durable:
            # Deepest first: a new directory's own entries, then its entry in its parent.
            for rel_dir in sorted(touched, key=lambda p: len(p.parts), reverse=True):
                try:
                    _fsync_dir_fd(self._out.dir(rel_dir))
                except (OSError, ExportError) as exc:
                    log.warning("could not flush a directory to disk: %s", _why(exc))
        self.close()
        return results

    def abort(self) -> None:
        """Stop: views not yet renamed are dropped and their temporary files removed."""
        self._commits.abort()
        self.close()

    def close(self) -> None:
        """Close the directory descriptors (opened again, checked, when the writer is used
        again)."""
        self._out.close()

    def __enter__(self) -> ExportWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _temp_name(self) -> str:
        return f"{TEMP_PREFIX}{self._pid}-{secrets.token_hex(6)}{TEMP_SUFFIX}"

    def _create(self, dir_fd: int) -> tuple[int, str | None]:
        """A new empty file in ``dir_fd``, open read-write (a digest reads it back):
        unnamed where the file system can, else a temporary dotfile (its name returned)."""
        if self._unnamed:
            try:
                flags = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
                return os.open(".", flags, FILE_MODE, dir_fd=dir_fd), None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise _oserror("cannot create a file", exc) from None
                self._unnamed = False  # not on this file system: named temporary files
        temp = self._temp_name()
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            raise _oserror("cannot create a temporary file", exc) from None
        return fd, temp

    def _pending_dir(self, temp: Path) -> tuple[PurePosixPath, str]:
        """(directory below the root, name) of a ``PENDING`` view's temporary file."""
        rel = PurePosixPath(Path(temp).relative_to(self.root).as_posix())
        if not is_temp_name(rel.name):
            raise ValueError("not a temporary file")
        if rel.parent != _HERE:
            target_path(self.root, rel.parent)  # plain names only
        return rel.parent, rel.name

    def settle(self, temp: Path, relpath: PurePosixPath) -> Outcome:
        """Put a ``PENDING`` view's temporary file in place, replacing its target.

        Raises
        ------
        ExportError
            When it cannot be renamed (the temporary file is removed).
        """
        target_path(self.root, relpath)
        try:
            rel_dir, temp_name = self._pending_dir(temp)
        except ValueError:
            raise ExportError(
                "cannot commit the file: not a temporary file of this writer"
            ) from None
        if rel_dir != relpath.parent:
            raise ExportError("cannot commit the file: not in its target's directory")
        try:
            dir_fd = self._out.dir(rel_dir)
        except OSError as exc:
            raise _oserror("cannot commit the file", exc) from None
        try:
            outcome = Outcome.REPLACED if _lexists_at(dir_fd, relpath.name) else Outcome.WRITTEN
            os.rename(temp_name, relpath.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            _unlink_at_quietly(dir_fd, temp_name)
            raise _oserror("cannot commit the file", exc) from None
        self._out.touch(rel_dir)
        return outcome

    def discard(self, temp: Path) -> None:
        """Remove a ``PENDING`` view's temporary file."""
        try:
            rel_dir, temp_name = self._pending_dir(temp)
            dir_fd = self._out.dir(rel_dir)
        except (OSError, ValueError, ExportError) as exc:
            log.warning("could not remove a temporary file: %s", _why(exc))
            return
        _unlink_at_quietly(dir_fd, temp_name)

    def remove_own_temps(self, rel_dirs: Iterable[PurePosixPath]) -> int:
        """Remove the temporary files named by this writer's owner from ``rel_dirs`` (below
        the root; each reached without following a link, none created).

        Once every worker of a run is done and its pending files are settled, such files
        can only be leftovers of a worker killed while it wrote, whose batch ran again
        (the owner outlives its workers, so no other writer removes them meanwhile).

        Returns
        -------
        int
            How many were removed.
        """
        removed = 0
        prefix = f"{TEMP_PREFIX}{self._pid}-"
        for rel_dir in sorted(set(rel_dirs)):
            try:
                if rel_dir != _HERE:
                    target_path(self.root, rel_dir)  # plain names only
                fd = self._out.existing(rel_dir)
                with os.scandir(fd) as entries:
                    names = [
                        e.name
                        for e in entries
                        if e.name.startswith(prefix) and is_temp_name(e.name)
                    ]
            except (OSError, ExportError):
                continue  # gone meanwhile, or never made: nothing of ours is there
            for name in names:
                _unlink_at_quietly(fd, name)
                removed += 1
        if removed:
            log.info("removed %d temporary file(s) of a worker that was killed", removed)
        return removed


def _why(exc: BaseException) -> str:
    """A PHI-free reason: never ``str`` of an OSError (it carries the file name)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, DeidfsError):
        return str(exc)
    return type(exc).__name__


#: A view the caller holds already for (absolute source path, its state), or None.
ViewLookup = Callable[[str, SourceStat], View | None]
