"""What the kernel lets a watcher do and what a folder sits on: the inotify limits
(``/proc/sys/fs/inotify``), the watches an inotify instance holds (``/proc/self/fdinfo``),
the file system type of a path (``/proc/self/mountinfo``) and whether it is a network file
system, where inotify misses changes made by other hosts and polling is used instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from watchdog.observers.api import BaseObserver

#: File systems where inotify misses changes made by other hosts (inotify(7): "remote network
#: file systems"); ``auto`` polls on these and on every ``fuse.*`` type.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "ceph",
        "glusterfs",
        "9p",
        "lustre",
        "gpfs",
        "beegfs",
        "virtiofs",
        "fuse",
        "fuseblk",
    }
)

_WATCH_LIMIT_FILES = (
    Path("/proc/sys/fs/inotify/max_user_watches"),
    # The limit of the current user namespace; inside a container it may be lower.
    Path("/proc/sys/user/max_inotify_watches"),
)
_INSTANCE_LIMIT_FILE = Path("/proc/sys/fs/inotify/max_user_instances")
_QUEUE_LIMIT_FILE = Path("/proc/sys/fs/inotify/max_queued_events")


def inotify_watch_limit() -> int | None:
    """Return the inotify watch limit that applies to this process.

    Reads ``/proc/sys/fs/inotify/max_user_watches`` and, inside a user namespace, the lower
    ``/proc/sys/user/max_inotify_watches`` of that namespace. The limit is per real uid and
    shared by every process of that user.

    Returns
    -------
    int or None
        The smallest limit found, or None when neither file is readable.
    """
    values: list[int] = []
    for limit_file in _WATCH_LIMIT_FILES:
        try:
            values.append(int(limit_file.read_text(encoding="ascii").strip()))
        except (OSError, ValueError):
            continue
    return min(values) if values else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _unescape_mountinfo(field_text: str) -> str:
    r"""Undo the octal escapes (``\040`` etc.) of /proc/self/mountinfo path fields."""
    if "\\" not in field_text:
        return field_text
    out: list[str] = []
    i = 0
    while i < len(field_text):
        chunk = field_text[i : i + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """Return the file system type of the mount that holds ``path``.

    Parameters
    ----------
    path : Path
        An absolute, symlink-free path (pass ``os.path.realpath``'s result).
    mountinfo : str, optional
        The text of ``/proc/self/mountinfo``; read when not given.

    Returns
    -------
    str or None
        The type (``ext4``, ``nfs4``, ``fuse.sshfs``, ...) of the longest mount point that
        contains ``path`` (the last one mounted, when several share it), or None if unknown.
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    target = str(path)
    best_len = -1
    best_type: str | None = None
    for line in mountinfo.splitlines():
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount_point = _unescape_mountinfo(fields[4])
        inside = mount_point in ("/", target) or target.startswith(mount_point + "/")
        if inside and len(mount_point) >= best_len:
            best_len = len(mount_point)
            best_type = right.split()[0]
    return best_type


def is_network_filesystem(fstype: str) -> bool:
    """Tell whether inotify misses remote changes on this file system type.

    Parameters
    ----------
    fstype : str
        A type as in /proc/self/mountinfo.

    Returns
    -------
    bool
        True for NFS, SMB/CIFS, cluster file systems, 9p, virtiofs and every FUSE file system.
    """
    return fstype in NETWORK_FS_TYPES or fstype.startswith("fuse.")


def _watched_inodes(fd: int) -> set[int] | None:
    """Inode numbers of the directories an inotify file descriptor of ours watches.

    /proc/self/fdinfo/<fd> lists one ``inotify wd:.. ino:<hex> sdev:<hex> ...`` line per
    watch that the kernel really holds. Device numbers are left out: on btrfs the
    superblock's device differs from what stat reports for a subvolume.
    """
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
            return None
        text = Path(f"/proc/self/fdinfo/{fd}").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    inodes: set[int] = set()
    for line in text.splitlines():
        if not line.startswith("inotify "):
            continue
        for item in line.split():
            if item.startswith("ino:"):
                with contextlib.suppress(ValueError):
                    inodes.add(int(item[4:], 16))
                break
    return inodes


def _inotify_fd_of(observer: BaseObserver) -> int | None:
    # watchdog keeps the inotify instance of an InotifyObserver in a private attribute; if a
    # later version moves it, the watch check falls back to comparing with the limit.
    holder = getattr(observer, "_inotify_fd", None)
    fd = getattr(holder, "_inotify_fd", None)
    return fd if isinstance(fd, int) else None


def _errname(exc: OSError) -> str:
    # Never str(exc): an OSError's text carries the file name.
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _observer_alive(observer: BaseObserver | None) -> bool:
    if observer is None or not observer.is_alive():
        return False
    try:
        emitters = list(observer.emitters)
    except RuntimeError:  # the set changed while copied; ask again at the next check
        return True
    # An emitter stops by itself when its root is deleted.
    return bool(emitters) and all(emitter.is_alive() for emitter in emitters)
