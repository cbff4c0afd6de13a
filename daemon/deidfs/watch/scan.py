"""The full scan of a folder tree: a scandir walk that never follows a symbolic link.

:class:`_Scanner` reads the tree below the root and queues its regular files, with their
signatures, to the worker in batches of :data:`_SCAN_BATCH`, so ``READY`` flows while a big
tree is still read. It counts every directory (dot-directories too: inotify watches them) by
inode, for the watch-limit check. Only the root's own read errors are fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from deidfs.watch.context import _Shared
from deidfs.watch.events import IGNORED_SUFFIXES, _ScanBatch, _ScanStats, _Sig

#: Files per batch handed from a scan to the worker, so READY flows while a big tree is read.
_SCAN_BATCH = 256

# Test seam: the directory lister of the scans.
_scandir = os.scandir


class _Scanner:
    """Walks one folder tree for the supervisor thread."""

    def __init__(self, shared: _Shared) -> None:
        self._root = shared.root
        self._events = shared.events
        self._stopping = shared.stopping

    def walk(self, scan_id: int, *, reconcile: bool) -> _ScanStats | None:
        """Read the tree with scandir, never following symlinks.

        Raises OSError when the root itself cannot be read; subdirectories that vanish or
        cannot be read are skipped. Dot-directories are descended into only to count them
        (inotify watches them too), their files are ignored.
        """
        root_str = self._root.root_str
        stats = _ScanStats()
        root_st = os.stat(root_str)
        stats.dirs[root_st.st_ino] = root_str
        stack: list[tuple[str, bool]] = [(root_str, False)]
        batch: list[tuple[str, _Sig]] = []
        while stack:
            if self._stopping.is_set():
                return None
            directory, hidden = stack.pop()
            try:
                entries = _scandir(directory)
            except OSError:
                if directory == root_str:
                    raise
                continue
            with entries:
                for entry in self._entries(entries, directory):
                    name = entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stats.dirs[entry.inode()] = entry.path
                            stack.append((entry.path, hidden or name.startswith(".")))
                        elif (
                            not hidden
                            and not name.startswith(".")
                            and not name.lower().endswith(IGNORED_SUFFIXES)
                            and entry.is_file(follow_symlinks=False)
                        ):
                            st = entry.stat(follow_symlinks=False)
                            batch.append((entry.path, _Sig.of(st)))
                    except OSError:
                        continue  # vanished while read
            if len(batch) >= _SCAN_BATCH:
                stats.files += len(batch)
                self._events.put(_ScanBatch(scan_id, batch, reconcile))
                batch = []
        stats.files += len(batch)
        self._events.put(_ScanBatch(scan_id, batch, reconcile))
        return stats

    def _entries(
        self, entries: Iterator[os.DirEntry[str]], directory: str
    ) -> Iterator[os.DirEntry[str]]:
        """Iterate a directory, treating a read error of the root as fatal, others as its end."""
        while True:
            try:
                entry = next(entries)
            except StopIteration:
                return
            except OSError:
                if directory == self._root.root_str:
                    raise
                return
            yield entry
