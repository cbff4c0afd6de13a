"""The directories of one writer's output, held open.

An :class:`OutputDirs` holds the descriptor of a writer's root (checked to stay the directory
it was) and those of the directories below it that it wrote in most recently, each reached
from the root without following a symbolic link (:mod:`deidfs.export.dirs`). It knows which
directories it created (they hold no earlier file), removes temporary files a killed writer
left in a directory the first time it works there, and collects the directories that gained
entries, to be flushed to disk at the end.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from deidfs.export.dirs import _HERE, OPEN_DIRS, DirId, _dir_id, open_dir_at, open_path_dirs
from deidfs.export.errors import ExportRefused, _oserror
from deidfs.export.files import remove_stale_temps


class OutputDirs:
    """Open descriptors of ``root`` and of directories below it (see the module's notes).

    Parameters
    ----------
    root
        The output directory (absolute).
    pid
        The owner whose temporary files are never stale.
    expect
        The root's identity, when it is known already: any other directory there is refused.
    guard
        Identities of directories never to write in, nor below.
    """

    def __init__(self, root: Path, pid: int, expect: DirId | None, guard: frozenset[DirId]) -> None:
        self.root = root
        self.guard = guard
        self._pid = pid
        self._root_id = expect
        self._root_fd: int | None = None
        #: Open descriptors of directories below the root, least recently used first.
        self._dirs: OrderedDict[PurePosixPath, int] = OrderedDict()
        self.ready: set[PurePosixPath] = set()
        #: Directories this writer found missing and created: they hold no earlier file.
        self.new: set[PurePosixPath] = set()
        self._touched: set[PurePosixPath] = set()
        self._lock = threading.Lock()

    @property
    def root_id(self) -> DirId | None:
        """The root's identity, once it was opened."""
        return self._root_id

    def root_fd(self) -> int:
        """An open descriptor of the root (held here: do not close it).

        Raises
        ------
        ExportRefused
            A symbolic link on the way, or the root is not the directory it was.
        OSError
            When it cannot be opened or created.
        """
        if self._root_fd is None:
            fd = open_path_dirs(self.root, create=True, guard=self.guard)
            ident = _dir_id(fd)
            if self._root_id is None:
                self._root_id = ident
            elif ident != self._root_id:
                os.close(fd)
                raise ExportRefused("the output directory was replaced during the export")
            self._root_fd = fd
        return self._root_fd

    def dir(self, rel_dir: PurePosixPath, created: list[PurePosixPath] | None = None) -> int:
        """The open descriptor of ``rel_dir`` below the root, created when missing (each
        one created is appended to ``created``), reached without following a link."""
        if rel_dir == _HERE:
            return self.root_fd()
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            self._dirs.move_to_end(rel_dir)
            return fd
        parent = self.dir(rel_dir.parent, created)
        fd, made = open_dir_at(parent, rel_dir.name, create=True, guard=self.guard)
        if made and created is not None:
            created.append(rel_dir)
        self._dirs[rel_dir] = fd
        while len(self._dirs) > OPEN_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def prepare(self, rel_dir: PurePosixPath) -> int:
        """:meth:`dir`, and the first time: the stale temporary files there removed, or the
        directory (and those created on the way) noted as new."""
        created: list[PurePosixPath] = []
        try:
            fd = self.dir(rel_dir, created)
        except OSError as exc:
            raise _oserror("cannot create a directory", exc) from None
        if rel_dir in self.ready:
            return fd
        if created:
            # A new directory is durable only once the directory holding it is synced.
            with self._lock:
                self._touched.update(p.parent for p in created)
            self.new.add(rel_dir)
        else:
            remove_stale_temps(fd, self._pid)
        self.ready.add(rel_dir)
        return fd

    def existing(self, rel_dir: PurePosixPath) -> int:
        """The open descriptor of the existing directory ``rel_dir`` below the root."""
        if rel_dir == _HERE:
            return self.root_fd()
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            return fd
        parent = self.existing(rel_dir.parent)
        fd, _ = open_dir_at(parent, rel_dir.name, create=False, guard=self.guard)
        self._dirs[rel_dir] = fd
        while len(self._dirs) > OPEN_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def touch(self, rel_dir: PurePosixPath) -> None:
        """Note that ``rel_dir`` gained an entry (from any thread)."""
        with self._lock:
            self._touched.add(rel_dir)

    def take_touched(self) -> set[PurePosixPath]:
        """The directories that gained entries since the last call."""
        with self._lock:
            touched, self._touched = self._touched, set()
        return touched

    def close(self) -> None:
        """Close the directory descriptors (opened again, checked, when used again)."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
