"""The system calls under an atomic, durable write.

Temporary names (``.deidfs-<pid>-<rand>.tmp``, :func:`is_temp_name`) and the removal of those a
killed writer left (:func:`remove_stale_temps`); linking an unnamed ``O_TMPFILE`` file
through ``/proc/self/fd`` or a temporary one under a new name without replacing anything;
flushing a whole file system at once (``syncfs``), starting a file's writeback early
(``sync_file_range``) and fsyncing directories; hashing a written file (:func:`sha256_fd`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

from deidfs.export.dirs import (
    _lexists_at,
)

log = logging.getLogger(__name__)


#: Each process's open descriptor of its /proc/self/fd (to link unnamed files), by pid.
_PROC_FD_DIRS: dict[int, int | None] = {}
TEMP_PREFIX = ".deidfs-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.deidfs-(\d+)-[0-9a-f]+\.tmp$")


#: Bytes read at a time to hash a written file.
HASH_CHUNK = 1 << 20


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of a writer (a dotfile, never a source)."""
    return _TEMP_NAME.match(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temps(directory: Path | int, keep: int | None = None) -> int:
    """Remove temporary files of writers that no longer run from ``directory`` (a path, or
    an open descriptor of it).

    Parameters
    ----------
    directory
        The directory, or an open descriptor of it.
    keep
        A process whose temporary files are never taken for leftovers: the writer's own
        owner. On another machine than the owner's (a cluster's worker), whether that
        process runs cannot be seen, and its files wait there to be settled.

    Returns
    -------
    int
        How many were removed.
    """
    removed = 0
    dir_fd = directory if isinstance(directory, int) else None
    try:
        entries = os.scandir(directory)
    except OSError:
        return 0
    with entries:
        for entry in entries:
            m = _TEMP_NAME.match(entry.name)
            if m is None or int(m.group(1)) == keep or _pid_alive(int(m.group(1))):
                continue
            try:
                if dir_fd is None:
                    os.unlink(entry.path)
                else:
                    os.unlink(entry.name, dir_fd=dir_fd)
                removed += 1
            except OSError:
                continue  # removed meanwhile by another writer
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted writer", removed)
    return removed


def sha256_fd(fd: int, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the open file ``fd`` (read with ``pread``).

    Raises
    ------
    OSError
        When it cannot be read, or is shorter than ``size``.
    """
    h = hashlib.sha256()
    at = 0
    while at < size:
        # pread and a large update both release the GIL: hashing overlaps other work.
        chunk = os.pread(fd, min(size - at, HASH_CHUNK), at)
        if not chunk:
            raise OSError(errno.EIO, "file is shorter than written")
        h.update(chunk)
        at += len(chunk)
    return h.hexdigest()


def _proc_fd_dir() -> int | None:
    """This process's /proc/self/fd, open (a forked worker opens its own); None without
    /proc."""
    pid = os.getpid()
    if pid not in _PROC_FD_DIRS:
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            _PROC_FD_DIRS[pid] = os.open("/proc/self/fd", flags)
        except OSError:
            _PROC_FD_DIRS[pid] = None
    return _PROC_FD_DIRS[pid]


def _link_unnamed(fd: int, dir_fd: int, name: str) -> None:
    """Give the unnamed (``O_TMPFILE``) file open as ``fd`` the name ``name`` in ``dir_fd``.

    Raises
    ------
    FileExistsError
        When ``name`` exists.
    """
    proc = _proc_fd_dir()
    if proc is None:  # pragma: no cover - checked before any unnamed file is made
        raise OSError(errno.ENOENT, "no /proc/self/fd")
    # linkat(AT_SYMLINK_FOLLOW) through /proc (open(2), O_TMPFILE): os.link takes that path
    # only with a directory descriptor; plain link(2) would not follow the magic link.
    os.link(str(fd), name, src_dir_fd=proc, dst_dir_fd=dir_fd, follow_symlinks=True)


def _link_new(dir_fd: int, temp: str, name: str) -> bool:
    """Publish ``temp`` as ``name`` (both in ``dir_fd``) unless ``name`` exists; True when
    published (then ``temp`` is gone)."""
    try:
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        # No hard links here (some network and FUSE file systems): a plain rename, which
        # can race with another writer of the same target; the later one then wins.
        if _lexists_at(dir_fd, name):
            return False
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    _unlink_at_quietly(dir_fd, temp)
    return True


def _syncfs(fd: int) -> bool:
    """``syncfs(2)`` of the file system holding the open file ``fd``: its dirty data and
    metadata are on disk when this returns True. False when it is not available or fails."""
    fn = _syncfs_function()
    if fn is None:
        return False
    return bool(fn(fd) == 0)


def _syncfs_function() -> Callable[[int], int] | None:
    # The os module has no syncfs; glibc has had it since 2.14 (Linux 2.6.39), and reports
    # writeback errors through it since Linux 5.8.
    return _libc_function("syncfs", "c_int")


@functools.cache
def _libc_function(name: str, *argtypes: str) -> Callable[..., int] | None:
    """The C library's function ``name`` returning an int, its arguments' types named as in
    :mod:`ctypes` (``"c_int"``); None where the library lacks it."""
    import ctypes  # noqa: PLC0415  (only durable writers need it)

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    fn.restype = ctypes.c_int
    return cast("Callable[..., int]", fn)


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk now, without waiting for it
    (``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``): the disk works while the next
    files are rendered, and the group's ``syncfs`` or ``fsync`` later finds little left to
    do. Only a hint: it makes nothing durable, and its errors are those the flush reports."""
    fn = _sync_file_range_function()
    if fn is not None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def _sync_file_range_function() -> Callable[[int, int, int, int], int] | None:
    return _libc_function("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")


def _unlink_at_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove a temporary file: %s", exc.strerror)


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("could not flush a directory to disk: %s", exc.strerror)
