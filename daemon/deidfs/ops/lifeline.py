"""Worker processes that die with the process that coordinates them.

Used by export's pool and the daemon's render processes: a ``kill -9`` of the coordinator
must never leave a worker running, writing, or blocked on a pipe no one reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parent_pid_of(pid: int) -> int | None:
    """The parent of process ``pid`` (from /proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _set_parent_death_signal(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)``; nothing where the C library lacks prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def die_with_parent(coordinator: int) -> None:
    """Make this worker process die as soon as the process that coordinates it does.

    A pool's workers block for their next task, or on a full pipe of results, on pipes whose
    other ends their siblings hold too: a ``kill -9`` of the coordinator would leave them
    there forever. A worker forked by the coordinator has the kernel kill it with its parent
    (``PR_SET_PDEATHSIG``). A worker forked by a fork server (whose parent is the
    coordinator) cannot count on that: the fork server outlives the coordinator as long as
    its workers do, since each holds the descriptor whose closing would stop it. It watches
    the coordinator itself (a pidfd, else a look every second) from a thread, and exits
    when it is gone, whatever the worker is blocked on. A parent that died before this took
    effect is caught by looking at who the parent is afterwards.
    """
    _set_parent_death_signal(signal.SIGKILL)
    parent = os.getppid()
    if parent == coordinator:
        return
    pidfd: int | None = None
    with contextlib.suppress(OSError, AttributeError):  # ESRCH: gone; ENOSYS: before 5.3
        pidfd = os.pidfd_open(coordinator)
    # Checked after the pidfd is open: it is the coordinator's, not a later process's.
    if _parent_pid_of(parent) != coordinator:
        os._exit(1)  # orphaned already: no one will ever read what this worker would do
    threading.Thread(
        target=_exit_with, args=(coordinator, parent, pidfd), name="deidfs-lifeline", daemon=True
    ).start()


def _exit_with(coordinator: int, parent: int, pidfd: int | None) -> None:
    """Exit this process once ``coordinator`` (the parent of ``parent``) has exited."""
    if pidfd is not None:
        select.select([pidfd], [], [])  # a pidfd turns readable when its process exits
    else:
        while _parent_pid_of(parent) == coordinator:
            time.sleep(1.0)
    os._exit(1)
