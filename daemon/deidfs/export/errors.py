"""Errors of an export and the exit codes they carry.

An :class:`ExportError` is a view that could not be written (exit 73, or 75 for a full disk:
free space and run again, the export resumes); an :class:`ExportRefused` a destination that
is not allowed (exit 77). Their messages name no source path and no value, and their
``reason`` is a short bounded identifier fit for a metric label; :func:`stopped_exit_code`
maps such a reason back to the exit code of an export it stopped.
"""

from __future__ import annotations

import errno
import os

from deidfs.errors import DeidfsError

#: Errors of the output that no further file can escape: the export stops.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FATAL_ERRNOS = _FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class ExportError(DeidfsError):
    """A view could not be written. The message names no source path and no value.

    ``source`` is true when the source could not be read (the output is not at fault).
    A full disk exits 75 (EX_TEMPFAIL: free space and run again, the export resumes), any
    other failure to write 73 (EX_CANTCREAT).
    """

    exit_code = os.EX_CANTCREAT

    def __init__(self, message: str, errno_: int | None = None, *, source: bool = False) -> None:
        super().__init__(message)
        self.errno = errno_
        self.source = source
        if errno_ in _FULL_ERRNOS and not source:
            self.exit_code = os.EX_TEMPFAIL

    @property
    def fatal(self) -> bool:
        """The output cannot take more files (full, read-only, not permitted): stop."""
        return not self.source and self.errno in _FATAL_ERRNOS

    @property
    def reason(self) -> str:
        """A short bounded identifier of the failure, fit for a metric label."""
        if self.source:
            return "source_unreadable"
        if self.errno in _FULL_ERRNOS:
            return "disk_full"
        if self.errno in _FATAL_ERRNOS:
            return "unwritable"
        return "io_error"


class ExportRefused(ExportError):
    """The destination is not allowed (exit 77, EX_NOPERM): inside a watched folder, the
    state directory or the mount; reached through a symbolic link while writing; or, for an
    export through the daemon, outside its export directory. Nothing more is written there.
    """

    exit_code = os.EX_NOPERM

    @property
    def fatal(self) -> bool:
        """No file can go there: the export stops."""
        return True

    @property
    def reason(self) -> str:
        """A short bounded identifier of the failure, fit for a metric label."""
        return "destination_refused"


def _oserror(what: str, exc: OSError, *, source: bool = False) -> ExportError:
    # str(OSError) carries the file name, which may carry PHI; strerror does not.
    return ExportError(f"{what}: {exc.strerror or type(exc).__name__}", exc.errno, source=source)


def stopped_exit_code(reason: str) -> int:
    """The exit code of an export stopped by an output failure of ``reason``: 75 full (run
    again once there is room), 77 a refused destination, 73 any other."""
    if reason == "disk_full":
        return os.EX_TEMPFAIL
    if reason == "destination_refused":
        return os.EX_NOPERM
    return os.EX_CANTCREAT
