"""The view tree: folders, directories and view files, looked up by mount path.

A FUSE-free model of what the mount shows: :class:`FolderView` (what serving one folder
needs), :class:`ViewFile` (one file, as the index describes it; enough for ``getattr``) and
:class:`ViewTree` (O(1) lookups and listings by mount path, duplicates, invalidations). File
times are keyed pseudo-times (:func:`pseudo_mtime_ns`) and inode numbers hashes of the
de-identified mount path (:func:`inode_of`), so neither reveals anything of the source.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.view.render import Layout, SourceStat

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
#: File times are keyed pseudo-times within the year 2000, so they never reveal real dates.
PSEUDO_EPOCH_NS = 946_684_800 * 1_000_000_000
PSEUDO_SPAN_NS = 365 * 86_400 * 1_000_000_000


def inode_of(path: str) -> int:
    """The inode number of a mount path: stable for the life of the path, the same in
    ``stat`` and ``readdir`` (the mount runs with ``use_ino``). 1 is the root's.

    A hash of the mount path, which is itself de-identified: it tells nothing the name
    does not; 63 bits, so two paths of one mount practically never share one.
    """
    if path == "/":
        return 1
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) | 2


def pseudo_mtime_ns(pseudonymizer: Pseudonymizer, state: SourceStat, digest: str) -> int:
    """A keyed pseudo-time for a view: new whenever its source state or digest changes.

    ``auto_cache`` drops a file's cached pages when its mtime changes, so the time must move
    with the source; it must not reveal the source's real time, hence keyed.
    """
    token = pseudonymizer.token(
        f"{state.dev}:{state.ino}:{state.size}:{state.mtime_ns}:{state.ctime_ns}:{digest}",
        "mtime",
    )
    return PSEUDO_EPOCH_NS + int.from_bytes(base64.b32decode(token), "big") % PSEUDO_SPAN_NS


@dataclass(frozen=True, slots=True)
class FolderView:
    """What serving one folder needs: its root, compiled profile, key and layout.

    Replaced as a whole on reload; open file handles keep the view they were opened with.
    """

    id: str
    root: Path
    plan: Plan
    pseudonymizer: Pseudonymizer
    layout: Layout
    digest: str  #: digest of everything a view depends on (plan, layout, key, renderer)
    max_header_bytes: int | None = None  #: bound of a source's header (None: the default)


@dataclass(frozen=True, slots=True)
class ViewFile:
    """One file of the mount, as the index describes it; enough for ``getattr``."""

    folder: str
    source: str  #: absolute path of the original; never logged
    state: SourceStat
    digest: str
    relpath: str  #: path under the folder's directory in the mount
    size: int
    mtime_ns: int
    header_length: int = 0
    pixel_offset: int = 0
    pixel_length: int = 0
    trailer_length: int = 0
    #: :func:`inode_of` its mount path, computed once (``getattr`` answers every open)
    ino: int = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Derived, never given: it cannot disagree with the mount path.
        object.__setattr__(self, "ino", inode_of(self.mount_path))

    @property
    def mount_path(self) -> str:
        """The file's path in the mount, ``/<folder>/<relpath>``."""
        return f"/{self.folder}/{self.relpath}"


@dataclass(frozen=True, slots=True)
class TreeCounts:
    """Per-folder numbers of the tree."""

    visible: int
    duplicates: int
    bytes: int


class ViewTree:
    """Folders -> directories -> view files, with O(1) lookups by mount path.

    Two sources claiming one view path: the one with the smaller source path is served
    (deterministic across restarts), the other is counted as a duplicate and takes over if
    the first goes away. Mutations notify ``invalidator`` (outside the lock) of every mount
    path whose attributes changed, so the kernel drops its cached size and pages.

    Until the invalidator has returned for a changed path, the kernel may still hold the
    previous version's size: it clamps reads of the new version to it (the new bytes cut
    short, bytes of no version). Such a path is *unsettled* (:meth:`settled`) from the
    change, made under the lock, until the invalidator reports success; an invalidator that
    fails or raises leaves it unsettled for good, so the mount never relies on a kernel
    cache it could not clear.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[str, ViewFile] = {}
        self._dupes: dict[str, dict[str, ViewFile]] = {}
        self._by_source: dict[tuple[str, str], ViewFile] = {}
        self._dirs: dict[str, dict[str, int]] = {"/": {}}
        self._folders: dict[str, FolderView] = {}
        self._visible: dict[str, int] = {}
        self._dup_count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        #: mount path -> changes whose kernel invalidation has not succeeded (yet)
        self._unsettled: dict[str, int] = {}
        #: Drops the kernel's cached attributes and pages of mount paths; returns False when
        #: it could not (None counts as success).
        self.invalidator: Callable[[Iterable[str]], bool | None] | None = None
        #: Called under the lock before a folder's settings or views change (a reload):
        #: read paths that bypass the checks on every read drop their open handles.
        self.on_folders_change: Callable[[], None] | None = None
        self._file_listener: Callable[[str, ViewFile | None], None] | None = None

    # -- reads (hot path: no lock for single dict lookups, atomic under the GIL) -----------

    def file(self, path: str) -> ViewFile | None:
        """The view file served at a mount path, if any."""
        return self._files.get(path)

    def is_dir(self, path: str) -> bool:
        """Whether a mount path is a directory."""
        return path in self._dirs

    def listdir(self, path: str) -> list[tuple[str, int]] | None:
        """``(name, mode)`` of a directory's entries, or None if it is not a directory."""
        with self._lock:
            children = self._dirs.get(path)
            return None if children is None else list(children.items())

    def settled(self, path: str) -> bool:
        """Whether the kernel has been told of every change of ``path`` (see the class doc).

        Takes the lock, so a caller that found a new version in :meth:`file` also sees that
        version's change as unsettled until its invalidation has succeeded.
        """
        with self._lock:
            return path not in self._unsettled

    def if_current(self, path: str, vf: ViewFile, then: Callable[[], object]) -> bool:
        """Call ``then()`` under the lock if ``path`` serves ``vf`` itself, settled (the
        kernel was told of its last change); whether it was called. Every change of the
        path after it is published to the file listener after ``then`` returns."""
        with self._lock:
            if self._files.get(path) is not vf or path in self._unsettled:
                return False
            then()
            return True

    def folder(self, folder_id: str) -> FolderView | None:
        """The settings of a served folder."""
        return self._folders.get(folder_id)

    def by_source(self, folder_id: str, source: str) -> ViewFile | None:
        """The view file (served or duplicate) of a source path."""
        return self._by_source.get((folder_id, source))

    def sources(self, folder_id: str) -> list[ViewFile]:
        """Every view file (served or duplicate) of a folder."""
        with self._lock:
            return [vf for (f, _), vf in self._by_source.items() if f == folder_id]

    def counts(self, folder_id: str) -> TreeCounts:
        """Visible files, duplicates and bytes of one folder."""
        return TreeCounts(
            visible=self._visible.get(folder_id, 0),
            duplicates=self._dup_count.get(folder_id, 0),
            bytes=self._bytes.get(folder_id, 0),
        )

    def totals(self) -> tuple[int, int, int]:
        """Files, directories and bytes of the whole mount."""
        return len(self._files), len(self._dirs), sum(self._bytes.values())

    # -- folders -------------------------------------------------------------------------

    def watch_files(self, listener: Callable[[str, ViewFile | None], None] | None) -> None:
        """Call ``listener(path, vf)`` for every file served now, then whenever what a path
        serves changes (``vf`` None: nothing any more); None stops. Called under the lock,
        in the order of the changes, so a copy kept by the listener (the mount's C table)
        never lags behind a lookup here; it must be quick and must not call back."""
        with self._lock:
            self._file_listener = listener
            if listener is not None:
                for path, vf in self._files.items():
                    listener(path, vf)

    def _set_file(self, path: str, vf: ViewFile) -> None:
        self._files[path] = vf
        listener = self._file_listener
        if listener is not None:
            listener(path, vf)

    def _folders_change(self) -> None:
        hook = self.on_folders_change
        if hook is not None:
            hook()

    def set_folder(self, fv: FolderView) -> None:
        """Add a folder, or replace its settings (reload) keeping its files."""
        with self._lock:
            self._folders_change()
            self._folders[fv.id] = fv
            self._dirs.setdefault(f"/{fv.id}", {})
            self._dirs["/"][fv.id] = DIR_MODE

    def replace_folder(self, fv: FolderView) -> int:
        """Serve a folder under new settings: every file of the old ones goes, at once.

        Used when a reload changes what a folder's views depend on (profile, layout): the
        folder's directory stays, its files disappear together with the switch, so no view
        rendered under the old settings is served under the new ones. Returns how many
        view files were withdrawn.
        """
        changed: list[str] = []
        with self._lock:
            self._folders_change()
            old = [v for (f, _), v in self._by_source.items() if f == fv.id]
            for vf in old:
                self._unclaim(vf, changed)
                del self._by_source[(fv.id, vf.source)]
            self._folders[fv.id] = fv
            self._dirs.setdefault(f"/{fv.id}", {})
            self._dirs["/"][fv.id] = DIR_MODE
            hook = self._unsettle(changed)
        self._notify(changed, hook)
        return len(old)

    def drop_folder(self, folder_id: str) -> None:
        """Remove a folder and everything under it."""
        changed: list[str] = []
        with self._lock:
            self._folders_change()
            for vf in [v for (f, _), v in self._by_source.items() if f == folder_id]:
                self._unclaim(vf, changed)
                del self._by_source[(folder_id, vf.source)]
            self._folders.pop(folder_id, None)
            self._dirs.pop(f"/{folder_id}", None)
            self._dirs["/"].pop(folder_id, None)
            changed.append(f"/{folder_id}")
            hook = self._unsettle(changed)
        self._notify(changed, hook)

    # -- files ---------------------------------------------------------------------------

    def put(self, vf: ViewFile) -> None:
        """Add or replace the view of ``vf.source``."""
        changed: list[str] = []
        with self._lock:
            served = self._folders.get(vf.folder)
            if served is None:
                return  # the folder left the configuration while this was being indexed
            if served.digest != vf.digest:
                return  # rendered under a profile the folder no longer has (reload race)
            key = (vf.folder, vf.source)
            old = self._by_source.get(key)
            if old == vf:
                return
            if old is not None:
                self._unclaim(old, changed)
            self._by_source[key] = vf
            self._claim(vf, changed)
            hook = self._unsettle(changed)
        self._notify(changed, hook)

    def remove(self, folder_id: str, source: str) -> bool:
        """Remove the view of a source; False if it had none."""
        changed: list[str] = []
        with self._lock:
            old = self._by_source.pop((folder_id, source), None)
            if old is None:
                return False
            self._unclaim(old, changed)
            hook = self._unsettle(changed)
        self._notify(changed, hook)
        return True

    def _claim(self, vf: ViewFile, changed: list[str]) -> None:
        path = vf.mount_path
        cur = self._files.get(path)
        if cur is None:
            self._serve(vf)
            changed.append(path)
        elif vf.source < cur.source:
            self._dupes.setdefault(path, {})[cur.source] = cur
            self._bytes[vf.folder] += vf.size - cur.size
            self._set_file(path, vf)
            self._dup_count[vf.folder] = self._dup_count.get(vf.folder, 0) + 1
            changed.append(path)
        else:
            self._dupes.setdefault(path, {})[vf.source] = vf
            self._dup_count[vf.folder] = self._dup_count.get(vf.folder, 0) + 1

    def _unclaim(self, vf: ViewFile, changed: list[str]) -> None:
        path = vf.mount_path
        cur = self._files.get(path)
        waiting = self._dupes.get(path)
        if cur is not None and cur.source == vf.source:
            changed.append(path)
            if waiting:
                nxt = waiting.pop(min(waiting))
                if not waiting:
                    del self._dupes[path]
                self._set_file(path, nxt)
                self._bytes[vf.folder] += nxt.size - cur.size
                self._dup_count[vf.folder] -= 1
            else:
                self._unserve(cur, changed)
        elif waiting and waiting.pop(vf.source, None) is not None:
            self._dup_count[vf.folder] -= 1
            if not waiting:
                del self._dupes[path]

    def _serve(self, vf: ViewFile) -> None:
        path = vf.mount_path
        self._set_file(path, vf)
        self._visible[vf.folder] = self._visible.get(vf.folder, 0) + 1
        self._bytes[vf.folder] = self._bytes.get(vf.folder, 0) + vf.size
        parent, _, name = path.rpartition("/")
        mode = FILE_MODE
        while True:
            children = self._dirs.get(parent)
            if children is not None:
                children[name] = mode
                break
            self._dirs[parent] = {name: mode}
            parent, _, name = parent.rpartition("/")
            parent = parent or "/"
            mode = DIR_MODE

    def _unserve(self, vf: ViewFile, changed: list[str]) -> None:
        path = vf.mount_path
        del self._files[path]
        listener = self._file_listener
        if listener is not None:
            listener(path, None)
        self._visible[vf.folder] -= 1
        self._bytes[vf.folder] -= vf.size
        folder_root = f"/{vf.folder}"
        while path != folder_root:
            parent, _, name = path.rpartition("/")
            children = self._dirs.get(parent)
            if children is None:
                break
            children.pop(name, None)
            if children or parent == folder_root:
                break
            del self._dirs[parent]
            changed.append(parent)
            path = parent

    def _unsettle(self, paths: list[str]) -> Callable[[Iterable[str]], bool | None] | None:
        """Mark changed paths unsettled (under the lock, with the change); the hook to call.

        Without an invalidator nothing is mounted (or the mount is going away): no kernel
        cache to clear, nothing to wait for.
        """
        hook = self.invalidator
        if hook is not None:
            for path in paths:
                self._unsettled[path] = self._unsettled.get(path, 0) + 1
        return hook

    def _notify(
        self, paths: list[str], hook: Callable[[Iterable[str]], bool | None] | None
    ) -> None:
        if hook is None or not paths:
            return
        if hook(paths) is False:
            return  # the kernel may still cache them: they stay unsettled
        with self._lock:
            for path in paths:
                left = self._unsettled.get(path, 0) - 1
                if left > 0:
                    self._unsettled[path] = left
                else:
                    self._unsettled.pop(path, None)
