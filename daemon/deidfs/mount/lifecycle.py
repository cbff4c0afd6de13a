"""Mounting and unmounting: the mount's options, the mfusepy loop's thread, stale mounts.

:class:`FuseMount` runs the mfusepy loop (multithreaded, foreground) in a thread, so the
main thread stays free for signals. :func:`clear_stale_mount` unmounts a dead FUSE mount a
killed run left behind, and refuses a live one; :func:`mounted_fstype` and
:func:`fusermount` read mountinfo and call ``fusermount3``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from deidfs.errors import DeidfsError
from deidfs.mount.binding import fuse_class, load_mfusepy
from deidfs.mount.ops import DeidOperations

log = logging.getLogger(__name__)

#: Kernel read-ahead for the mount's bdi; libfuse3 then gets 512 KiB-1 MiB read requests.
READ_AHEAD_KB = 1024
ATTR_TIMEOUT = 3600.0
#: Short, so a name looked up before its file settled shows up within about a second.
NEGATIVE_TIMEOUT = 1.0


def mount_options(allow_other: bool) -> dict[str, object]:
    """The ``-o`` options of the mount (notes/fuse-perf.md, sections 2 and 6)."""
    opts: dict[str, object] = {
        "ro": True,
        "default_permissions": True,
        "fsname": "deidfs",
        "subtype": "deidfs",
        # Sources may be replaced: auto_cache drops cached pages when size or mtime change;
        # explicit invalidations (DeidOperations.invalidate) cover the attribute cache.
        "auto_cache": True,
        # auto_cache compares size and mtime at open only when libfuse's own copy of the
        # attributes is older than ac_attr_timeout (default: attr_timeout, an hour). Zero
        # makes every open ask getattr (a dictionary lookup here), so an open that comes
        # between a new version being published and the kernel invalidation still drops
        # the previous version's pages instead of keeping them.
        "ac_attr_timeout": 0,
        "attr_timeout": ATTR_TIMEOUT,
        "entry_timeout": ATTR_TIMEOUT,
        "negative_timeout": NEGATIVE_TIMEOUT,
        "no_rofd_flush": True,
        # stat and readdir report the same inode numbers (inode_of), not libfuse's node ids.
        "use_ino": True,
    }
    if allow_other:
        opts["allow_other"] = True
    return opts


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 8))


def mounted_fstype(mountpoint: Path) -> str | None:
    """The file system type mounted exactly at ``mountpoint`` (from mountinfo), if any."""
    target = os.path.abspath(mountpoint)
    found: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5:
                    continue
                if _OCTAL_ESCAPE.sub(_unescape, fields[4]) == target:
                    found = right.split()[0] if right else "unknown"
    except OSError:
        return None
    return found


def fusermount(mountpoint: Path, lazy: bool = False, timeout: float = 10.0) -> bool:
    """``fusermount3 -u [-z]``; True on success."""
    argv = ["fusermount3", "-u", "-q"] + (["-z"] if lazy else []) + [os.fspath(mountpoint)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _probe(mountpoint: Path, timeout: float) -> int | None:
    """errno of ``statvfs`` on the mount (0 if it answers, None if it hangs).

    statvfs is never answered from the kernel's attribute cache, so it reaches the daemon
    (or finds the connection dead); it runs in a thread because a hung daemon blocks it.
    """
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    t = threading.Thread(target=probe, name="deidfs-mount-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def clear_stale_mount(mountpoint: Path, timeout: float = 3.0) -> bool:
    """Unmount a dead FUSE mount left at ``mountpoint`` by a killed run.

    Returns True if one was cleared.

    Raises
    ------
    DeidfsError
        A live FUSE file system is mounted there (another daemon serves it), or the dead
        one cannot be unmounted.
    """
    fstype = mounted_fstype(mountpoint)
    if fstype is None or not fstype.startswith("fuse"):
        return False
    err = _probe(mountpoint, timeout)
    if err == 0:
        raise DeidfsError(f"{mountpoint} is already mounted ({fstype}); is deidfs running?")
    log.warning(
        "stale mount found (a previous run was killed: %s); unmounting it",
        "hung" if err is None else errno.errorcode.get(err, str(err)),
    )
    if not fusermount(mountpoint) and not fusermount(mountpoint, lazy=True):
        raise DeidfsError(f"cannot clear the stale mount at {mountpoint}")
    return True


def _set_read_ahead(mountpoint: Path) -> None:
    try:
        dev = os.stat(mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        bdi.write_text(f"{READ_AHEAD_KB}\n")
        log.debug("read-ahead of the mount set to %d KiB", READ_AHEAD_KB)
    except OSError as exc:
        # Only root may write it; without it reads still work, in 128 KiB requests.
        log.info("read-ahead of the mount left at the default: %s", exc.strerror)


class FuseMount:
    """Runs the mfusepy loop (multithreaded, foreground) in a thread.

    The main thread stays free for signals: mfusepy skips installing its own SIGINT handler
    outside the main thread, and libfuse leaves handlers alone that are not SIG_DFL.
    """

    def __init__(self, ops: DeidOperations, mountpoint: Path, *, allow_other: bool) -> None:
        self.ops = ops
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.options = mount_options(allow_other)
        self.error: BaseException | None = None
        self.libfuse_version = ""
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @property
    def alive(self) -> bool:
        """True while the FUSE loop runs."""
        return self._thread is not None and not self._done.is_set()

    def start(self, timeout: float = 15.0) -> None:
        """Mount and wait until the kernel has initialized the connection.

        Raises
        ------
        DeidfsError
            The mount failed or did not come up within ``timeout``.
        """
        mfusepy = load_mfusepy()
        self.libfuse_version = f"{mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}"
        self._thread = threading.Thread(
            target=self._run, args=(mfusepy,), name="fuse-loop", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.ops.initialized.wait(0.05):
            if self._done.is_set():
                raise DeidfsError(f"mount failed: {self.error or 'libfuse exited'}")
            if time.monotonic() > deadline:
                raise DeidfsError("mount did not come up in time")
        _set_read_ahead(self.mountpoint)
        log.info("mounted (libfuse %s, options %s)", self.libfuse_version, self._describe())

    def _describe(self) -> str:
        return ",".join(k if v is True else f"{k}={v}" for k, v in self.options.items())

    def _run(self, mfusepy: Any) -> None:
        try:
            fuse_class(mfusepy)(
                self.ops,
                os.fspath(self.mountpoint),
                raw_fi=True,
                foreground=True,
                nothreads=False,
                **self.options,
            )
        except RuntimeError as exc:
            # libfuse3 returns the signal number when a signal ended the loop; a clean stop.
            self.error = exc
        except BaseException as exc:
            self.error = exc
            log.error("FUSE loop failed: %s", type(exc).__name__)
        finally:
            self._done.set()

    def responsive(self, timeout: float = 5.0) -> bool:
        """True if the mount answers a ``statvfs`` within ``timeout`` (a liveness probe).

        statvfs is never answered from the kernel's caches: it goes through the kernel,
        libfuse and a worker of the loop, so a hung loop or a dead connection fails it.
        """
        return self.alive and _probe(self.mountpoint, timeout) == 0

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; True if it did."""
        return self._done.wait(timeout)

    def unmount(self, timeout: float = 5.0) -> bool:
        """Unmount (lazily if busy) and wait, bounded, for the loop to end."""
        if self._thread is None:
            return True
        if not self._done.is_set() and not fusermount(self.mountpoint, timeout=timeout):
            log.warning("mount busy; detaching it lazily")
            fusermount(self.mountpoint, lazy=True, timeout=timeout)
        ended = self._done.wait(timeout)
        if not ended:
            log.warning("FUSE loop still running after unmount; leaving it to process exit")
        return ended
