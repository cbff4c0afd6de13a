"""What the parts of one folder's watcher share.

:class:`_FolderRoot` knows the folder's root three ways (as configured, resolved, and as the
observer sees it) and which paths below it are taken: no dot-component, no transfer suffix, no
symbolic link on the way. :class:`_Shared` carries the folder id, the clock, the one lock that
guards every field the watcher's properties read, the two queues its threads pass work through
(events and scan results to the worker, commands to the supervisor) and the stop flag.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deidfs.watch.events import IGNORED_SUFFIXES, _Cmd, _WorkItem

#: Upper bound for each join in :meth:`FolderWatcher.stop`.
_JOIN_SECONDS = 10.0


class _FolderRoot:
    """The watched root's paths, and which paths below it the watcher takes."""

    def __init__(self, root: Path) -> None:
        self.root_str = os.path.abspath(root)
        self.root_prefix = self.root_str.rstrip("/") + "/"
        self.root_real = self.root_str  # resolved when the observer starts
        # The observer watches the root's real path: with a symlink as the root itself,
        # watchdog (which never follows links) would watch the link, not the directory.
        self.observed_base = self.root_str

    def relative(self, path: str) -> str | None:
        if not path.startswith(self.root_prefix):
            return None
        return path[len(self.root_prefix) :]

    def eligible_name(self, path: str) -> bool:
        rel = self.relative(path)
        if not rel:
            return False
        parts = rel.split("/")
        if any(part.startswith(".") or not part for part in parts):
            return False
        return not parts[-1].lower().endswith(IGNORED_SUFFIXES)

    def within_root(self, path: str) -> bool:
        """The path's directories are real directories below the root (no symlink on the way).

        Observers do not descend into symlinked directories, but a directory can be replaced
        by a link between an event and its handling.
        """
        rel = self.relative(path)
        if rel is None:
            return False
        rel_dir = os.path.dirname(rel)
        expected = os.path.join(self.root_real, rel_dir) if rel_dir else self.root_real
        return os.path.realpath(os.path.dirname(path)) == expected

    def from_observer(self, path: bytes | str) -> str:
        """Map an observer path (below the root's real path) to one below the root as given."""
        text = os.fsdecode(path)
        base = self.observed_base
        if base == self.root_str:
            return text
        if text == base:
            return self.root_str
        if text.startswith(base + "/"):
            return self.root_prefix + text[len(base) + 1 :]
        return text


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every part of one folder's watcher is built with."""

    folder_id: str
    root: _FolderRoot
    clock: Callable[[], float]
    lock: threading.Lock  #: guards the fields read by the watcher's properties
    events: queue.SimpleQueue[_WorkItem]  #: to the worker thread
    commands: queue.SimpleQueue[_Cmd]  #: to the supervisor thread
    stopping: threading.Event
