"""The read-only FUSE view: an in-memory tree of view files and the mfusepy operations on it.

The core (:class:`ViewTree`, :class:`ViewFS`) knows nothing of FUSE: it looks paths up,
lists directories, opens a view (rendering its header from the source it holds open) and
reads bytes. :class:`DeidOperations` only translates between it and mfusepy (not found ->
ENOENT, failure -> EIO, any write -> EROFS), and :class:`FuseMount` runs the mfusepy loop in
a thread. mfusepy is imported lazily, after ``FUSE_LIBRARY_NAME=fuse3`` is set, because on
a machine with both libfuse2 and libfuse3 it would otherwise pick libfuse2.

Performance (see notes/fuse-perf.md): ``getattr`` and ``readdir`` are dictionary lookups,
and readdirplus hands the kernel every entry's attributes with the listing; headers are
rendered in ``open`` into a bounded cache, never in ``read``. Reads are answered by
``read_buf`` with a buffer libfuse owns, the source's pixel bytes read straight into it
(no bytes object, the GIL released); libfuse's worker threads keep their Python thread
state between callbacks.

Not done on purpose: handing libfuse the source *descriptor* for the pixel bytes (an fd
buffer, spliced). libfuse reads it after the callback has returned, so the source's state
could no longer be checked after the read, and an in-place write racing a read would be
served mixed; measured here it was no faster (slower for large files with 1 MiB requests).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import errno
import functools
import hashlib
import itertools
import logging
import os
import re
import resource
import stat
import subprocess
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Concatenate, ParamSpec, TypeVar

from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError, Exhausted, NotFound, Refused
from deidfs.ops.metrics import Metrics
from deidfs.view.render import Layout, SourceStat, View, read_view, read_view_into, render

log = logging.getLogger(__name__)

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
#: File times are keyed pseudo-times within the year 2000, so they never reveal real dates.
PSEUDO_EPOCH_NS = 946_684_800 * 1_000_000_000
PSEUDO_SPAN_NS = 365 * 86_400 * 1_000_000_000
#: Hint for readers to use large reads; each FUSE request costs a trip into Python.
BLOCK_SIZE = 256 * 1024
#: Kernel read-ahead for the mount's bdi; libfuse3 then gets 512 KiB-1 MiB read requests.
READ_AHEAD_KB = 1024
ATTR_TIMEOUT = 3600.0
#: Short, so a name looked up before its file settled shows up within about a second.
NEGATIVE_TIMEOUT = 1.0
#: Bytes a cached view holds besides its header, pixels and trailer: the View, its Report
#: and relative path, the key with its SourceStat, the LRU's links. Measured with
#: tracemalloc over 5,000 cached views (990 bytes each).
CACHE_ENTRY_OVERHEAD = 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Descriptors kept free for everything but held sources (the index, inotify, sockets, logs,
#: export pipes, libfuse and Python's own): at least this many, or an eighth of the limit.
FD_RESERVE = 64
#: Seconds between two log lines about running out of descriptors.
EXHAUSTED_LOG_SECONDS = 60.0


# -- libfuse's buffer vector (fuse_common.h of libfuse 3) -----------------------------------
# mfusepy declares ``fuse_bufvec.buf`` as a pointer; in C it is an inline array
# ``struct fuse_buf buf[1]``, so the read_buf reply is built on these declarations.

FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2


class FuseBuf(ctypes.Structure):
    """``struct fuse_buf``."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),  # enum fuse_buf_flags
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),  # off_t (64-bit: libfuse3 is built with _FILE_OFFSET_BITS=64)
    ]


class FuseBufvec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline buffer (``buf[1]``)."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", FuseBuf * 1),
    ]


@functools.cache
def _libc() -> Any:
    # PyDLL: malloc and free keep the GIL. They take well under a microsecond, and a
    # callback that released the GIL for them would wait to take it back whenever another
    # libfuse thread is in Python (a hand-off per call with several readers).
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    return libc


#: PyBUF_WRITE of Python's C API: a writable memoryview.
_PYBUF_WRITE = 0x200


@functools.cache
def _memory_view_fn() -> Any:
    fn = ctypes.pythonapi.PyMemoryView_FromMemory
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    fn.restype = ctypes.py_object
    return fn


def _memory_view(addr: int, size: int) -> memoryview:
    """A writable memoryview of ``size`` bytes at ``addr`` (no ctypes array type is made:
    ctypes keeps every array type it makes, one per distinct size, for good)."""
    view: memoryview = _memory_view_fn()(addr, size, _PYBUF_WRITE)
    return view


def default_max_handles() -> int:
    """How many views may be open at once: the descriptor limit less a reserve.

    Each open view holds its source's descriptor until released, so without a bound a
    reader opening many views would take the descriptors the index, the watchers and the
    control socket need.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - max(FD_RESERVE, soft // 8))


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
    ino: int = dataclasses.field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not self.ino:
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

    def set_folder(self, fv: FolderView) -> None:
        """Add a folder, or replace its settings (reload) keeping its files."""
        with self._lock:
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
            self._files[path] = vf
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
                self._files[path] = nxt
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
        self._files[path] = vf
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


class HeaderCache:
    """A bounded LRU of rendered views (headers and trailers), by bytes held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, SourceStat, str], View] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _weight(view: View) -> int:
        return len(view.header) + len(view.pixels) + len(view.trailer) + CACHE_ENTRY_OVERHEAD

    def get(self, key: tuple[str, SourceStat, str]) -> View | None:
        """The cached view for (source, state, digest), marking it recently used."""
        with self._lock:
            view = self._items.get(key)
            if view is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return view

    def peek(self, key: tuple[str, SourceStat, str]) -> View | None:
        """The cached view, if any, without counting a lookup or refreshing its age.

        For readers other than the mount (exports), so they neither skew the hit ratio
        nor push the mount's working set out.
        """
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple[str, SourceStat, str], view: View) -> None:
        """Cache a view, evicting the least recently used beyond the bound."""
        weight = self._weight(view)
        if weight > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._weight(old)
            self._items[key] = view
            self._bytes += weight
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= self._weight(dropped)

    @property
    def size_bytes(self) -> int:
        """Bytes held (headers, trailers and a per-entry overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Handle:
    """An open view and the source descriptor it holds from open to release."""

    fd: int
    view: View
    ctime_ns: int  #: the source's ctime the bytes read so far were checked against
    nlink: int  #: the source's link count at that ctime
    file: ViewFile
    broken: bool = False
    users: int = 0  #: reads in progress on ``fd``
    closed: bool = False  #: released: ``fd`` is closed by the last read in progress


@dataclass(frozen=True, slots=True)
class Opened:
    """An open view: its handle, and whether the kernel must bypass its page cache for it."""

    fh: int
    direct_io: bool


def _version(vf: ViewFile) -> tuple[str, SourceStat, str]:
    return (vf.source, vf.state, vf.digest)


class ViewFS:
    """open/read/release of view files over a :class:`ViewTree`.

    A view is served only while its source is exactly the state that was indexed: open
    checks the source's (dev, ino, size, mtime_ns) against the index and the rebuilt view's
    size against the indexed size; read checks the held source after each source read, and
    that the handle's version is still the one the tree serves. Any mismatch reports the
    source through ``on_stale`` (to be indexed again) and fails that file only.

    The kernel's page cache is per path, shared by every open of it. So that a handle still
    open on an older version never reads pages a newer version filled (mixed bytes), a view
    opened while such a handle exists is opened ``direct_io``: it bypasses the cache, and
    the cache only ever holds bytes of one version (the tree invalidates it on each change).
    The kernel also caches a path's size and clamps cached reads to it: a view opened
    between a change and the kernel's invalidation of it (:meth:`ViewTree.settled`) is
    opened ``direct_io`` too, or its reads would stop at the previous version's size.

    A header is rendered only from a source state that can no longer change unseen (see
    :func:`unsettled_ns`), and is used only if the source kept that state while it was read.

    A handle holds its source's descriptor from open to release, so a reader finishes with
    the bytes it started with when the source is deleted or renamed away meanwhile: the
    unlinked inode stays readable through the descriptor, and the view stays consistent as
    long as nothing writes to it (checked as before). Once a *newer version* is served at the
    handle's path, though, it fails: the kernel's size and pages of the path follow the new
    version, and reads of the old one through them could be cut short or mixed. At most
    ``max_handles`` views are open at once (default: :func:`default_max_handles`); beyond
    that, or when the descriptor limit is reached anyway, open raises :class:`Exhausted`.
    """

    def __init__(
        self,
        tree: ViewTree,
        cache_bytes: int,
        on_stale: Callable[[str, str], None] | None = None,
        metrics: Metrics | None = None,
        max_handles: int | None = None,
    ) -> None:
        self.tree = tree
        self.max_handles = default_max_handles() if max_handles is None else max_handles
        self.cache = HeaderCache(cache_bytes)
        self.on_stale = on_stale
        self.metrics = metrics
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.Lock()
        #: mount path -> versions open on it, with their handle counts
        self._open_versions: dict[str, Counter[tuple[str, SourceStat, str]]] = {}
        self._next_fh = itertools.count(1)
        self._stale_logged: set[tuple[str, SourceStat, str]] = set()
        self.opens = 0
        self.direct_opens = 0  #: opens that bypass the kernel's page cache
        self.stale = 0
        self.exhausted = 0  #: opens refused for want of a descriptor
        self._exhausted_logged: float | None = None

    @property
    def open_handles(self) -> int:
        """Number of open file handles."""
        return len(self._handles)

    def _stale(self, vf: ViewFile, why: str) -> Refused:
        self.stale += 1
        version = _version(vf)
        if version not in self._stale_logged:
            # Once per version: a viewer retrying a changed file must not flood the log.
            if len(self._stale_logged) > 4096:
                self._stale_logged.clear()
            self._stale_logged.add(version)
            log.info("view withheld until indexed again: folder=%s reason=%s", vf.folder, why)
        hook = self.on_stale
        if hook is not None:
            hook(vf.folder, vf.source)
        return Refused("source_changed", why)

    def _exhausted(self) -> Exhausted:
        # Not stale: the source is fine, the daemon is short of descriptors. Indexing it
        # again would only fail the same way.
        self.exhausted += 1
        now = time.monotonic()
        last = self._exhausted_logged
        if last is None or now - last >= EXHAUSTED_LOG_SECONDS:
            self._exhausted_logged = now
            log.warning(
                "open refused: out of file descriptors (%d views open, at most %d)",
                len(self._handles),
                self.max_handles,
            )
        return Exhausted("file_descriptors")

    def held(self, fh: int) -> ViewFile | None:
        """The view file an open handle serves (None for an unknown handle)."""
        h = self._handles.get(fh)
        return None if h is None else h.file

    def open(self, path: str) -> Opened:
        """Open the view at ``path``.

        Raises
        ------
        NotFound
            No view at ``path``.
        Refused
            The source changed, vanished or no longer renders to the indexed view.
        Exhausted
            ``max_handles`` views are open, or no descriptor is left.
        """
        vf = self.tree.file(path)
        if vf is None:
            raise NotFound("no such view")
        folder = self.tree.folder(vf.folder)
        if folder is None:
            raise NotFound("folder not served")
        if len(self._handles) >= self.max_handles:
            # Unlocked: concurrent opens may overshoot by the FUSE threads, which the
            # descriptor reserve absorbs.
            raise self._exhausted()
        try:
            fd = _open_source(vf.source)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise self._exhausted() from exc
            raise self._stale(vf, "source cannot be opened") from exc
        version = _version(vf)
        try:
            st = os.fstat(fd)
            state = SourceStat.of(st)
            # Only ctime moved (chmod, chown, a link; or a rewrite whose mtime was set back):
            # served from a header rendered now, off the page cache, until indexed again.
            recheck = state != vf.state
            if recheck and dataclasses.replace(state, ctime_ns=vf.state.ctime_ns) != vf.state:
                raise self._stale(vf, "source state differs from the index")
            view, rendered = self._view(fd, vf, folder, st, state, fresh=recheck)
            if view.size != vf.size or str(view.relpath) != vf.relpath:
                raise self._stale(vf, "rebuilt view differs from the index")
        except BaseException:
            os.close(fd)
            raise
        if rendered and not recheck:
            self.cache.put(version, view)
        # After the lookup above: a version found there stays unsettled until the kernel
        # has dropped the previous version's size.
        unsettled = not self.tree.settled(path)
        with self._lock:
            fh = next(self._next_fh)
            self._handles[fh] = _Handle(fd, view, st.st_ctime_ns, st.st_nlink, vf)
            versions = self._open_versions.setdefault(path, Counter())
            direct = recheck or unsettled or any(v != version for v in versions)
            versions[version] += 1
        self.opens += 1
        if direct:
            self.direct_opens += 1
        return Opened(fh, direct)

    def _view(
        self,
        fd: int,
        vf: ViewFile,
        folder: FolderView,
        st: os.stat_result,
        state: SourceStat,
        *,
        fresh: bool = False,
    ) -> tuple[View, bool]:
        """The view of ``vf`` from the cache (unless ``fresh``), or rendered from ``fd``
        (whose fstat is ``st``, state ``state``); True when rendered (to be cached once
        checked against the index)."""
        view = None if fresh else self.cache.get(_version(vf))
        if view is not None:
            return view, False
        if folder.digest != vf.digest:
            raise self._stale(vf, "profile changed since indexing")
        wait = unsettled_ns(st, time.time_ns())
        if wait:
            # Changed within a timestamp tick: read once it is over, so that every write
            # after the reads below moves ctime (checked after them).
            time.sleep(wait / 1e9)
        rel = PurePosixPath(os.path.relpath(vf.source, folder.root))
        started = time.perf_counter()
        try:
            with open(fd, "rb", closefd=False) as f:
                view = render(
                    f,
                    state,
                    folder.plan,
                    folder.pseudonymizer,
                    folder.layout,
                    rel,
                    max_header_bytes=folder.max_header_bytes,
                )
        except Refused as exc:
            raise self._stale(vf, "source no longer renders") from exc
        finally:
            if self.metrics is not None:
                self.metrics.observe_render(vf.folder, time.perf_counter() - started)
        after = os.fstat(fd)
        if SourceStat.of(after) != state:
            # Written to while it was parsed: the header may mix two contents.
            raise self._stale(vf, "source changed while rendered")
        return view, True

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of an open view.

        Raises
        ------
        NotFound
            Unknown handle.
        Refused
            The source changed under the open handle, or a newer version replaced it.
        """
        h = self._use(fh)
        try:
            self._check_current(h)
            try:
                data = read_view(h.view, h.fd, offset, size)
            except (Refused, OSError) as exc:
                h.broken = True
                raise self._stale(h.file, "source shrank while open") from exc
            self._check_after(h, offset, size)
            return data
        finally:
            self._unuse(h)

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        """:meth:`read` into ``out`` (``len(out)`` bytes at ``offset``, fewer at the end of
        the view); returns how many were written. The same checks as :meth:`read`: bytes
        written into ``out`` are served only when this returns.

        Raises
        ------
        NotFound
            Unknown handle.
        Refused
            The source changed under the open handle, or a newer version replaced it.
        """
        h = self._use(fh)
        try:
            self._check_current(h)
            try:
                n = read_view_into(h.view, h.fd, offset, out)
            except (Refused, OSError) as exc:
                h.broken = True
                raise self._stale(h.file, "source shrank while open") from exc
            self._check_after(h, offset, len(out))
            return n
        finally:
            self._unuse(h)

    def _use(self, fh: int) -> _Handle:
        with self._lock:
            h = self._handles.get(fh)
            if h is None:
                raise NotFound("no such handle")
            h.users += 1
        return h

    def _unuse(self, h: _Handle) -> None:
        with self._lock:
            h.users -= 1
            last = h.closed and h.users == 0
        if last:
            os.close(h.fd)

    def _check_current(self, h: _Handle) -> None:
        """Before a read: the handle is whole and its version still the one served."""
        if h.broken:
            raise Refused("source_changed", "source changed while open")
        current = self.tree.file(h.file.mount_path)
        if current is not None and _version(current) != _version(h.file):
            # A newer version is served: the kernel's size and pages of this path now
            # follow it, so this handle's bytes could be cut short or mixed with it.
            h.broken = True
            raise Refused("source_changed", "a newer version replaced this view")
        folder = self.tree.folder(h.file.folder)
        if folder is None or folder.digest != h.file.digest:
            # The folder is withdrawn, or its views changed (a reload to another profile):
            # fail closed, the old view may hold what the new profile removes.
            h.broken = True
            raise Refused("source_changed", "the folder's views changed while open")
        # No view at the path (the source was deleted or renamed away): the descriptor
        # still holds the bytes this view was built from.

    def _check_after(self, h: _Handle, offset: int, size: int) -> None:
        """After the source was read for ``[offset, offset+size)``: it still holds the
        indexed bytes. Checked after the read: a writer updates mtime before it changes
        data, so an unchanged state here means the bytes just read are the indexed ones."""
        view = h.view
        header = len(view.header) + len(view.pixels)
        read_source = offset + size > header and offset < header + view.pixel_length
        if read_source and not self._unchanged(h, os.fstat(h.fd)):
            h.broken = True
            raise self._stale(h.file, "source changed while open")

    def _unchanged(self, h: _Handle, st: os.stat_result) -> bool:
        """Whether the held source still has the content the view was built from.

        ctime moves with every write, even one whose mtime was set back; it also moves when
        the source is unlinked, renamed or linked, which leave the content alone. A ctime
        that moved while the link count changed or the source left its indexed path is
        taken for such a change of names, and becomes the state later reads are checked
        against. (A write with mtime set back in the same interval is not told apart.)
        """
        src = h.view.source
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
            src.dev,
            src.ino,
            src.size,
            src.mtime_ns,
        ):
            return False
        with self._lock:
            ctime_ns, nlink = h.ctime_ns, h.nlink
        if st.st_ctime_ns == ctime_ns:
            return True
        if st.st_nlink == nlink and _still_at(h.file.source, st):
            return False
        with self._lock:
            if (h.ctime_ns, h.nlink) == (ctime_ns, nlink):
                h.ctime_ns, h.nlink = st.st_ctime_ns, st.st_nlink
        return True

    def release(self, fh: int) -> None:
        """Close a handle and its source descriptor (unknown handles are ignored).

        A read still in progress on the handle (possible only at shutdown, when the mount
        is detached while busy) keeps the descriptor until it returns: closed under it, its
        number could be reused by another file and the read would return that file's bytes.
        """
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            path = h.file.mount_path
            versions = self._open_versions.get(path)
            if versions is not None:
                versions[_version(h.file)] -= 1
                if versions[_version(h.file)] <= 0:
                    del versions[_version(h.file)]
                if not versions:
                    del self._open_versions[path]
            h.closed = True
            close = h.users == 0
        if close:
            os.close(h.fd)

    def close_all(self) -> None:
        """Close every held source (at shutdown)."""
        for fh in list(self._handles):
            self.release(fh)


#: How long after a change a source's state may still hide another change. File systems
#: without multigrain timestamps (Linux before 6.13, and others) stamp mtime and ctime from a
#: coarse clock: a write in the same tick (one jiffy, at most 10 ms) as a stat leaves the
#: stat unchanged. Two ticks at the slowest tick rate.
SOURCE_TICK_NS = 20_000_000


def unsettled_ns(st: os.stat_result, now_ns: int) -> int:
    """Nanoseconds until the state in ``st`` shows every later change of the file (0: now).

    A view built from bytes read once this is 0 stays valid exactly as long as the state:
    any later write moves ctime to a later tick. ctime, not mtime: utimes(2) can set mtime
    to anything, ctime is always the kernel's time of the change. A ctime ahead of
    ``now_ns`` (the clock was set back) is in a tick no later write can share.
    """
    age = now_ns - st.st_ctime_ns
    return SOURCE_TICK_NS - age if 0 <= age < SOURCE_TICK_NS else 0


def _still_at(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` (not followed if a symlink) is the file of ``st``."""
    try:
        here = os.lstat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)


def _open_source(path: str) -> int:
    """Open an original read-only without following a final symlink or touching its atime."""
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; reading is still allowed without it.
        return os.open(path, _OPEN_FLAGS)


_P = ParamSpec("_P")
_R = TypeVar("_R")
_Op = Callable[Concatenate["DeidOperations", _P], _R]


def _counted(op: str) -> Callable[[_Op[_P, _R]], _Op[_P, _R]]:
    """Count calls of a FUSE operation, and its errors by errno, in the daemon's metrics."""

    def wrap(fn: _Op[_P, _R]) -> _Op[_P, _R]:
        def counted(self: DeidOperations, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            m = self.metrics
            if m is None:
                return fn(self, *args, **kwargs)
            m.fuse_op(op)
            try:
                return fn(self, *args, **kwargs)
            except OSError as exc:
                m.fuse_error(op, exc.errno)
                raise

        functools.update_wrapper(counted, fn)
        return counted

    return wrap


class DeidOperations:
    """mfusepy operations over a :class:`ViewFS`: translation only.

    Not a subclass of ``mfusepy.Operations`` so that this module imports without mfusepy;
    mfusepy registers exactly the methods defined here.
    """

    use_ns = True

    def __init__(
        self,
        fs: ViewFS,
        uid: int | None = None,
        gid: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.fs = fs
        self.metrics = metrics
        self.tree = fs.tree
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.initialized = threading.Event()
        self._fuse_ptr: int | None = None
        self._invalidate_fn: Any = None
        self._inval_lock = threading.Lock()
        self.read_calls = 0  #: reads answered by :meth:`read` (bytes through Python)
        self.read_buf_calls = 0  #: reads answered by :meth:`read_buf`

    # -- lifecycle -----------------------------------------------------------------------

    def init(self, path: str) -> None:
        """libfuse is up: remember the session for later cache invalidations."""
        # Called on a FUSE thread with the fuse context set: keep the `struct fuse *` so
        # cache invalidations can be sent later from other threads.
        try:
            lib = _libfuse()
            ptr = lib.fuse_get_context().contents.fuse
            fn = lib.fuse_invalidate_path
            fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            fn.restype = ctypes.c_int
            with self._inval_lock:
                self._fuse_ptr = ptr
                self._invalidate_fn = fn
        except (AttributeError, OSError) as exc:
            log.warning("kernel cache invalidation unavailable: %s", exc)
        self.initialized.set()

    def destroy(self, path: str) -> None:
        """libfuse is going down: no more invalidations."""
        with self._inval_lock:
            self._fuse_ptr = None

    def invalidate(self, paths: Iterable[str]) -> bool:
        """Drop the kernel's cached attributes and pages of ``paths``.

        Returns False if the kernel may still cache one of them: no session (not mounted
        yet, or going down), or an error other than ENOENT (a path the kernel never looked
        up, so holds nothing of). Never called from a FUSE callback: the kernel may wait on
        the request being served.
        """
        ok = True
        with self._inval_lock:
            ptr, fn = self._fuse_ptr, self._invalidate_fn
            if ptr is None or fn is None:
                return False
            for path in paths:
                rc = fn(ctypes.c_void_p(ptr), path.encode("utf-8", "surrogateescape"))
                if rc not in (0, -errno.ENOENT):
                    ok = False
        if not ok:
            log.warning("kernel cache invalidation failed: affected views bypass the cache")
        return ok

    # -- metadata ------------------------------------------------------------------------

    def _file_attrs(self, vf: ViewFile) -> dict[str, int]:
        t = vf.mtime_ns
        return {
            "st_ino": vf.ino,
            "st_mode": FILE_MODE,
            "st_nlink": 1,
            "st_size": vf.size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
            "st_blksize": BLOCK_SIZE,
            "st_blocks": (vf.size + 511) // 512,
        }

    def _dir_attrs(self, path: str) -> dict[str, int]:
        return {
            "st_ino": inode_of(path),
            "st_mode": DIR_MODE,
            "st_nlink": 2,
            "st_size": 0,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": PSEUDO_EPOCH_NS,
            "st_mtime": PSEUDO_EPOCH_NS,
            "st_ctime": PSEUDO_EPOCH_NS,
            "st_blksize": BLOCK_SIZE,
        }

    @_counted("getattr")
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        """stat(2) of a mount path: a dictionary lookup, never a parse.

        ``fh`` (libfuse's fuse_file_info, raw_fi) comes with a getattr on an open file:
        the kernel asks that way when it revalidates a file's size during a read. A view
        whose source was deleted while open is answered from its handle, or the reader
        would get ENOENT in the middle of a read the handle can still serve.
        """
        vf = None if path is None else self.tree.file(path)
        if vf is not None:
            return self._file_attrs(vf)
        if fh is not None:
            held = self.fs.held(int(fh.fh))
            if held is not None and (path is None or held.mount_path == path):
                return self._file_attrs(held)
        if path is not None and self.tree.is_dir(path):
            return self._dir_attrs(path)
        raise OSError(errno.ENOENT, "no such view")

    def readdir(self, path: str, fh: int) -> list[str | tuple[str, dict[str, int], int]]:
        """Entries of a directory as ``(name, {st_mode, st_ino}, 0)`` after "." and ".."
        (mfusepy's form; the mount itself lists through :meth:`readdir_attrs`)."""
        out: list[str | tuple[str, dict[str, int], int]] = [".", ".."]
        entries = self.readdir_attrs(path, plus=False, start=2)
        out.extend((name, attrs, 0) for name, attrs in entries)
        return out

    @_counted("readdir")
    def readdir_attrs(
        self, path: str, *, plus: bool, start: int = 0, limit: int | None = None
    ) -> list[tuple[str, dict[str, int]]]:
        """Entries ``start`` to ``start + limit`` of a directory ("." and ".." first), with
        their attributes: mode and inode, or with ``plus`` everything ``getattr`` answers
        (readdirplus: the kernel then needs no lookup or getattr per entry). Dictionary
        lookups only."""
        entries = self.tree.listdir(path)
        if entries is None:
            raise OSError(errno.ENOTDIR if self.tree.file(path) else errno.ENOENT, path)
        parent = path.rpartition("/")[0] or "/"
        prefix = path if path.endswith("/") else path + "/"
        names: list[tuple[str, int]] = [(".", DIR_MODE), ("..", DIR_MODE), *entries]
        stop = len(names) if limit is None else start + limit
        out: list[tuple[str, dict[str, int]]] = []
        for name, mode in names[start:stop]:
            child = path if name == "." else parent if name == ".." else prefix + name
            if not plus or name in (".", ".."):
                out.append((name, {"st_mode": mode, "st_ino": inode_of(child)}))
                continue
            vf = self.tree.file(child) if mode == FILE_MODE else None
            if vf is not None:
                out.append((name, self._file_attrs(vf)))
            elif mode != FILE_MODE:
                out.append((name, self._dir_attrs(child)))
            else:  # withdrawn since the listing was taken: its type and inode only
                out.append((name, {"st_mode": mode, "st_ino": inode_of(child)}))
        return out

    @_counted("statfs")
    def statfs(self, path: str) -> dict[str, int]:
        """statvfs(3): the mount's size and file count; nothing is free (read-only)."""
        files, dirs, size = self.tree.totals()
        return {
            "f_bsize": BLOCK_SIZE,
            "f_frsize": 4096,
            "f_blocks": (size + 4095) // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": files + dirs,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    @_counted("access")
    def access(self, path: str, amode: int) -> int:
        """access(2): writing is never allowed."""
        if amode & os.W_OK:
            raise OSError(errno.EROFS, "read-only")
        if self.tree.file(path) is None and not self.tree.is_dir(path):
            raise OSError(errno.ENOENT, "no such view")
        return 0

    # -- data ----------------------------------------------------------------------------

    # mfusepy runs with raw_fi=True: open, read and release get libfuse's fuse_file_info,
    # so open can ask for direct_io per file.

    @_counted("open")
    def open(self, path: str, fi: Any) -> int:
        """Open for reading only; sets ``fi.fh`` (and ``fi.direct_io`` when needed)."""
        flags = int(fi.flags)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, "read-only")
        try:
            opened = self.fs.open(path)
        except NotFound as exc:
            raise OSError(errno.ENOENT, "no such view") from exc
        except Refused as exc:
            raise OSError(errno.EIO, exc.reason) from exc
        except Exhausted as exc:
            # ENFILE rather than EMFILE: the reader's own descriptors are not the ones
            # that ran out.
            raise OSError(errno.ENFILE, "too many views open") from exc
        except Exception as exc:
            log.error("open failed: %s", type(exc).__name__)
            raise OSError(errno.EIO, "open failed") from exc
        fi.fh = opened.fh
        if opened.direct_io:
            fi.direct_io = 1
        return 0

    @_counted("read")
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """Bytes of an open view; EIO if its source changed (the path without
        :meth:`read_buf`: mfusepy copies the returned bytes into libfuse's buffer)."""
        self.read_calls += 1
        try:
            data = self.fs.read(int(fi.fh), offset, size)
            if self.metrics is not None:
                self.metrics.fuse_read(len(data))
            return data
        except NotFound as exc:
            raise OSError(errno.EBADF, "no such handle") from exc
        except Refused as exc:
            raise OSError(errno.EIO, exc.reason) from exc
        except Exception as exc:
            log.error("read failed: %s", type(exc).__name__)
            raise OSError(errno.EIO, "read failed") from exc

    @_counted("read")
    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        """libfuse's ``read_buf``: the bytes of an open view in a buffer vector of our own.

        One ``malloc``'d buffer, written by :meth:`ViewFS.read_into` (pixel bytes read
        from the source straight into it, the GIL released), handed to libfuse, which
        writes it to the kernel and then frees it and the vector (``fuse_free_buf``:
        ``free(mem)`` of every buffer that is not a descriptor, then ``free(bufvec)``).
        The vector is handed over only once every check of :meth:`ViewFS.read` passed.
        """
        self.read_buf_calls += 1
        libc = _libc()
        n = max(0, min(size, int(self._view_size(fi)) - offset))
        mem: int | None = libc.malloc(n) if n else None
        if n and not mem:
            raise OSError(errno.ENOMEM, "out of memory")
        try:
            # Empty, read_into still checks the handle (EBADF).
            out = _memory_view(mem, n) if mem else memoryview(bytearray())
            try:
                got = self.fs.read_into(int(fi.fh), offset, out)
            finally:
                out.release()
            vec_addr = libc.malloc(ctypes.sizeof(FuseBufvec))
            if not vec_addr:
                raise OSError(errno.ENOMEM, "out of memory")
        except NotFound as exc:
            libc.free(mem)
            raise OSError(errno.EBADF, "no such handle") from exc
        except Refused as exc:
            libc.free(mem)
            raise OSError(errno.EIO, exc.reason) from exc
        except OSError:
            libc.free(mem)
            raise
        except Exception as exc:
            libc.free(mem)
            log.error("read failed: %s", type(exc).__name__)
            raise OSError(errno.EIO, "read failed") from exc
        vec = FuseBufvec.from_address(vec_addr)
        vec.count, vec.idx, vec.off = 1, 0, 0
        buf = vec.buf[0]
        buf.size, buf.flags, buf.mem, buf.fd, buf.pos = got, 0, mem, -1, 0
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vec_addr
        if self.metrics is not None:
            self.metrics.fuse_read(got)
        return 0

    def _view_size(self, fi: Any) -> int:
        """Size of the view open on ``fi`` (0 for an unknown handle: read_into says so)."""
        vf = self.fs.held(int(fi.fh))
        return 0 if vf is None else vf.size

    @_counted("release")
    def release(self, path: str, fi: Any) -> int:
        """Close an open view."""
        self.fs.release(int(fi.fh))
        return 0

    # -- everything that would write: the mount is read-only -----------------------------

    @_counted("modify")
    def _erofs(self, *args: object) -> int:
        """Every operation below would change the mount: EROFS, before the kernel's own."""
        raise OSError(errno.EROFS, "read-only file system")

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return self._erofs()

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self._erofs()

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        return self._erofs()

    def mkdir(self, path: str, mode: int) -> int:
        return self._erofs()

    def mknod(self, path: str, mode: int, dev: int) -> int:
        return self._erofs()

    def rmdir(self, path: str) -> int:
        return self._erofs()

    def unlink(self, path: str) -> int:
        return self._erofs()

    def symlink(self, target: str, source: str) -> int:
        return self._erofs()

    def link(self, target: str, source: str) -> int:
        return self._erofs()

    def rename(self, old: str, new: str) -> int:
        return self._erofs()

    def chmod(self, path: str, mode: int) -> int:
        return self._erofs()

    def chown(self, path: str, uid: int, gid: int) -> int:
        return self._erofs()

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return self._erofs()

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        return self._erofs()

    def removexattr(self, path: str, name: str) -> int:
        return self._erofs()

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        return self._erofs()


# -- the mfusepy binding and the mount ----------------------------------------------------


def load_mfusepy() -> ModuleType:
    """Import mfusepy bound to libfuse3 (it prefers libfuse2 when both are installed).

    Raises
    ------
    DeidfsError
        mfusepy or libfuse3 is missing, or mfusepy was already imported with libfuse2.
    """
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy  # noqa: PLC0415  (lazy: the environment above must come first)
    except (ImportError, OSError) as exc:
        raise DeidfsError(f"cannot load mfusepy with libfuse3: {exc}") from exc
    major = getattr(mfusepy, "fuse_version_major", None)
    if major != 3:
        raise DeidfsError(f"mfusepy is bound to libfuse {major}, libfuse3 is required")
    module: ModuleType = mfusepy
    return module


def _libfuse() -> ctypes.CDLL:
    mfusepy = load_mfusepy()
    lib: ctypes.CDLL = mfusepy._libfuse  # the same library mfusepy mounted with
    return lib


#: libfuse 3 readdir flags (fuse.h): the kernel asks for attributes; the filler gets them.
FUSE_READDIR_PLUS = 1 << 0
FUSE_FILL_DIR_PLUS = 1 << 1
#: Entries whose attributes are made at a time: more than one reply holds (a page).
READDIR_BATCH = 128


_worker = threading.local()
_kept_lock = threading.Lock()
#: Threads whose Python thread state :func:`keep_thread_state` keeps (in this process).
kept_thread_states = 0


def keep_thread_state() -> None:
    """Keep the calling thread's Python thread state until the thread ends.

    Called on libfuse's worker threads, from within a callback: ctypes gives each callback
    on a thread Python did not create a fresh thread state (``PyGILState_Ensure``) and
    destroys it on return, a cost paid at every FUSE request (allocations, page faults,
    GIL hand-offs). One more ``PyGILState_Ensure``, never released, keeps the state for
    the thread's life; ctypes' own calls then only take and drop the GIL. libfuse 3.12+
    never ends idle workers (``max_idle_threads`` defaults to -1) and starts at most
    ``max_threads`` (10), so at most that many states are kept, until the mount ends.
    """
    global kept_thread_states  # noqa: PLW0603  (a count for tests and diagnostics)
    ensure = ctypes.pythonapi.PyGILState_Ensure
    ensure.restype = ctypes.c_int
    ensure.argtypes = []
    ensure()
    _worker.kept = True
    with _kept_lock:
        kept_thread_states += 1


def _fill_stat(st: Any, attrs: dict[str, int]) -> None:
    """Set mfusepy's ``c_stat`` from a :meth:`DeidOperations.getattr` dictionary.

    Every field libfuse reads for a readdirplus entry is set (``st_rdev`` is never
    anything but 0), so ``st`` is reused without clearing it; ten times as fast as
    ``mfusepy.set_st_attrs`` after a ``memset``, for every entry of a listing.
    """
    get = attrs.get
    st.st_ino = attrs["st_ino"]
    st.st_mode = attrs["st_mode"]
    st.st_nlink = get("st_nlink", 0)
    st.st_size = get("st_size", 0)
    st.st_uid = get("st_uid", 0)
    st.st_gid = get("st_gid", 0)
    st.st_blksize = get("st_blksize", 0)
    st.st_blocks = get("st_blocks", 0)
    for key, ts in (
        ("st_atime", st.st_atimespec),
        ("st_mtime", st.st_mtimespec),
        ("st_ctime", st.st_ctimespec),
    ):
        ts.tv_sec, ts.tv_nsec = divmod(get(key, 0), 1_000_000_000)


@functools.cache
def fuse_class(mfusepy: Any) -> Any:
    """mfusepy's ``FUSE`` with the callbacks deidfs answers better than its generic ones.

    ``readdir``: mfusepy hands libfuse names and modes only, so ``ls -l`` costs a LOOKUP
    and a GETATTR per entry. When the kernel asks for readdirplus, this fills the whole
    ``stat`` of each entry (dictionary lookups) with ``FUSE_FILL_DIR_PLUS``, and libfuse
    answers the kernel with the entries and their attributes at once.
    """

    class DeidFUSE(mfusepy.FUSE):  # type: ignore[misc]
        def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            if not getattr(_worker, "kept", False):
                try:
                    keep_thread_state()
                except Exception as exc:  # never fail a request for it (ctypes would
                    _worker.kept = True  # turn an exception here into a success)
                    log.warning("thread state not kept: %s", type(exc).__name__)
            return super()._wrapper(func, *args, **kwargs)

        def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            # mfusepy's generic getattr clears the stat (libfuse has just zeroed it) and
            # sets it field by field through a table; every open asks (ac_attr_timeout=0).
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            attrs = self.operations.getattr(decoded, fip.contents if fip else None)
            _fill_stat(buf.contents, attrs)
            return 0

        def readdir_fuse_3(
            self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
        ) -> int:
            # Entries go with their positions as offsets: libfuse 3.14 sends readdirplus
            # attributes only then (its offset-less mode sends them with node id 0, which
            # the kernel ignores). The kernel resumes a listing from the last offset.
            ops = self.operations
            decoded = "/" if path is None else path.decode(self.encoding, self.errors)
            plus = bool(flags & FUSE_READDIR_PLUS)
            st = mfusepy.c_stat()
            while True:
                batch = ops.readdir_attrs(decoded, plus=plus, start=offset, limit=READDIR_BATCH)
                for name, attrs in batch:
                    offset += 1
                    _fill_stat(st, attrs)
                    fill = FUSE_FILL_DIR_PLUS if plus and name not in (".", "..") else 0
                    if filler(buf, name.encode(self.encoding, self.errors), st, offset, fill):
                        return 0  # the kernel's buffer is full
                if len(batch) < READDIR_BATCH:
                    return 0

        def read_buf(self, path: bytes | None, bufpp: Any, size: int, offset: int, fip: Any) -> int:
            # The path is not needed (the handle says everything): not decoded.
            result: int = self.operations.read_buf(None, bufpp, size, offset, fip.contents)
            return result

    return DeidFUSE


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
