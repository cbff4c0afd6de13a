"""Directories opened without following a symbolic link.

An export writes relative to directory descriptors: :func:`open_path_dirs` opens a directory
from ``/`` down, one component at a time with ``O_NOFOLLOW`` (:func:`open_dir_at`, creating
missing ones when asked), and :func:`open_beneath` opens a file below such a descriptor the
same way. A link in the way, or a directory whose identity (:data:`DirId`) is guarded (a
watched folder, the state directory, the mount), is refused with
:class:`~deidfs.export.errors.ExportRefused`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

from deidfs.export.errors import ExportRefused

# -- directories, opened without following a link ----------------------------------------------
#: A directory's identity: (st_dev, st_ino).
DirId = tuple[int, int]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Directory descriptors a writer keeps open: those it wrote in most recently.
OPEN_DIRS = 32
_HERE = PurePosixPath(".")


def _dir_id(fd: int) -> DirId:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_dir_at(
    dir_fd: int, name: str, *, create: bool, guard: frozenset[DirId] = frozenset()
) -> tuple[int, bool]:
    """Open the directory ``name`` in the directory ``dir_fd`` without following a symbolic
    link, creating it when missing and ``create``; returns (descriptor, created).

    Raises
    ------
    ExportRefused
        When ``name`` is a symbolic link, or the directory is one of ``guard``.
    OSError
        When it cannot be opened or created.
    """
    created = False
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o777, dir_fd=dir_fd)  # the umask applies, as to any mkdir
            created = True
        except FileExistsError:
            pass  # made meanwhile by another writer
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link_at(dir_fd, name):
            raise ExportRefused(
                "a directory of the destination is a symbolic link: deidfs writes through none"
            ) from None
        raise
    if guard and _dir_id(fd) in guard:
        os.close(fd)
        raise ExportRefused(
            "the destination reaches into a watched folder, the state directory or the mount"
        )
    return fd, created


def open_path_dirs(path: Path, *, create: bool, guard: frozenset[DirId] = frozenset()) -> int:
    """Open the directory at the absolute ``path``, component by component from ``/``, never
    following a symbolic link (each missing one created when ``create``).

    Raises
    ------
    ExportRefused, OSError
        As :func:`open_dir_at` does.
    """
    fd = os.open("/", _DIR_FLAGS)
    try:
        for name in PurePosixPath(os.path.abspath(path)).parts[1:]:
            child, _ = open_dir_at(fd, name, create=create, guard=guard)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root_fd: int, relpath: PurePosixPath, flags: int = os.O_RDONLY) -> int:
    """Open the file ``relpath`` below the directory ``root_fd``, following no symbolic link.

    Raises
    ------
    ExportRefused, OSError
        As :func:`open_dir_at` does; OSError when the file cannot be opened.
    """
    parts = relpath.parts
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            child, _ = open_dir_at(fd, name, create=False)
            os.close(fd)
            fd = child
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
