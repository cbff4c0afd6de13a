"""Export manifests: their names and how one is published.

A manifest is a dotfile ``.deidfs-manifest-<UTC time>[-n].jsonl`` in the export's root
(:func:`is_manifest_name`; never taken as a source or a view). :func:`write_manifest_file`
publishes one atomically: a temporary file, flushed, then linked under a name no other
manifest has, so a reader never sees a partial manifest.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import secrets
from pathlib import Path

from deidfs.export.dirs import (
    open_path_dirs,
)
from deidfs.export.errors import _oserror
from deidfs.export.files import TEMP_PREFIX, TEMP_SUFFIX, _fsync_dir_fd, _unlink_at_quietly
from deidfs.export.writer import FILE_MODE

MANIFEST_PREFIX = ".deidfs-manifest-"
MANIFEST_SUFFIX = ".jsonl"
_MANIFEST_NAME = re.compile(r"^\.deidfs-manifest-\d{8}T\d{6}Z(-\d+)?\.jsonl$")


def is_manifest_name(name: str) -> bool:
    """Whether ``name`` is an export manifest (a dotfile, never a source or a view)."""
    return _MANIFEST_NAME.match(name) is not None


def write_manifest_file(
    directory: Path,
    when: dt.datetime,
    data: bytes,
    *,
    durable: bool = True,
    dir_fd: int | None = None,
) -> Path:
    """Publish ``data`` as ``directory/.deidfs-manifest-<UTC time>[-n].jsonl``, atomically:
    a temporary file (removed on failure), flushed, then linked under a name no other
    manifest has. ``dir_fd``, when given, is ``directory`` open already (by a writer);
    else ``directory`` is opened without following a symbolic link.

    Raises
    ------
    ExportError
        When it cannot be written (full, read-only): no file is left.
    """
    if dir_fd is not None:
        return _write_manifest_at(directory, dir_fd, when, data, durable)
    try:
        fd = open_path_dirs(directory, create=False)
    except OSError as exc:
        raise _oserror("cannot write the manifest", exc) from None
    try:
        return _write_manifest_at(directory, fd, when, data, durable)
    finally:
        os.close(fd)


def _write_manifest_at(
    directory: Path, dir_fd: int, when: dt.datetime, data: bytes, durable: bool
) -> Path:
    stamp = when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    temp = f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{TEMP_SUFFIX}"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        raise _oserror("cannot write the manifest", exc) from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        for n in range(1, 1000):
            name = f"{MANIFEST_PREFIX}{stamp}{'' if n == 1 else f'-{n}'}{MANIFEST_SUFFIX}"
            try:
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(errno.EEXIST, "too many manifests with this time")
    except OSError as exc:
        raise _oserror("cannot write the manifest", exc) from None
    finally:
        _unlink_at_quietly(dir_fd, temp)
    if durable:
        _fsync_dir_fd(dir_fd)
    return directory / name
