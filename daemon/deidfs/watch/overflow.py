"""Overflows of a folder's inotify queue: counted as watchdog reports them, logged sparingly.

When more events wait than ``/proc/sys/fs/inotify/max_queued_events`` allows, the kernel drops
them for the whole tree (``IN_Q_OVERFLOW``). :class:`_Overflows` counts each loss on watchdog's
dispatch thread and asks the supervisor for a rescan at once; the supervisor logs the losses at
most once a minute (every one is counted), with the queue limit to raise.
"""

from __future__ import annotations

import logging
import math

from deidfs.watch.context import _Shared
from deidfs.watch.events import _Cmd
from deidfs.watch.limits import _QUEUE_LIMIT_FILE, _read_int

logger = logging.getLogger(__name__)

#: Queue overflows of one folder are logged at most this often (all are counted).
_OVERFLOW_LOG_SECONDS = 60.0


class _Overflows:
    """The overflow count of one folder (``count`` and ``last`` are read under the lock)."""

    def __init__(self, shared: _Shared) -> None:
        self._folder_id = shared.folder_id
        self._clock = shared.clock
        self._lock = shared.lock
        self._commands = shared.commands
        self.count = 0
        self.last: float | None = None  #: clock() of the last one
        self._logged_at = -math.inf
        self._logged = 0

    def on_events_lost(self) -> None:
        """watchdog's dispatch thread: the inotify queue overflowed; only count and ask."""
        with self._lock:
            self.count += 1
            self.last = self._clock()
        self._commands.put(_Cmd.OVERFLOW)

    def log(self) -> None:
        """Log overflows (supervisor thread), at most once per :data:`_OVERFLOW_LOG_SECONDS`."""
        with self._lock:
            total = self.count
        new = total - self._logged
        now = self._clock()
        if new <= 0 or now - self._logged_at < _OVERFLOW_LOG_SECONDS:
            return
        self._logged_at = now
        self._logged = total
        logger.warning(
            "folder %s: inotify queue overflowed, file events were lost (%d time(s), %d in "
            "all); rescanning the folder now. If this repeats, raise "
            "fs.inotify.max_queued_events (%s now; the kernel applies it to inotify instances "
            "created later: restart the daemon)",
            self._folder_id,
            new,
            total,
            _read_int(_QUEUE_LIMIT_FILE),
        )
