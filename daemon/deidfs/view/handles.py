"""Open views: open, read and release of view files, each holding its source open.

:class:`ViewFS` is the FUSE-free core behind the mount: it opens a view (rendering its header
from the source it holds open, or taking it from the bounded :class:`HeaderCache`; headers
are rendered in ``open``, never in ``read``), reads its bytes and releases it, serving a view
only while its source is exactly the state that was indexed. It knows nothing of FUSE: the
mount only translates between it and libfuse.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import resource
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from deidfs.errors import Exhausted, NotFound, Refused
from deidfs.ops.metrics import Metrics
from deidfs.view.render import SourceStat, View, read_view, read_view_into, render
from deidfs.view.tree import FolderView, ViewFile, ViewTree

log = logging.getLogger(__name__)

#: Bytes a cached view holds besides its header, pixels and trailer: the View, its Report
#: and relative path, the key with its SourceStat, the LRU's links. Measured with
#: tracemalloc over 5,000 cached views (990 bytes each).
CACHE_ENTRY_OVERHEAD = 1024
#: How an original is opened (with ``O_NOATIME`` where allowed): read-only, never through a
#: final symlink, and without waiting: a FIFO swapped in for the source would otherwise hold
#: the FUSE thread until a writer came (``O_NONBLOCK`` changes nothing for a regular file;
#: whatever else is opened fails the state check that follows and is refused).
SOURCE_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Descriptors kept free for everything but held sources (the index, inotify, sockets, logs,
#: export pipes, libfuse and Python's own): at least this many, or an eighth of the limit.
FD_RESERVE = 64
#: Seconds between two log lines about running out of descriptors.
EXHAUSTED_LOG_SECONDS = 60.0
#: Handle numbers, unique in the process: a handle table outside Python (the mount's C
#: read path) is shared by every mount of the process and must never confuse two of them.
_FH_NUMBERS = itertools.count(1)


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
        self._stale_logged: set[tuple[str, SourceStat, str]] = set()
        self.opens = 0
        self.direct_opens = 0  #: opens that bypass the kernel's page cache
        self.stale = 0
        self.exhausted = 0  #: opens refused for want of a descriptor
        self._exhausted_logged: float | None = None
        #: Handles open outside Python (the mount's C path), counted against ``max_handles``.
        self.open_elsewhere: Callable[[], int] | None = None

    @property
    def open_handles(self) -> int:
        """Number of open file handles (with those open elsewhere: the C path's)."""
        elsewhere = self.open_elsewhere
        return len(self._handles) + (0 if elsewhere is None else elsewhere())

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

    def held_source(self, fh: int) -> tuple[int, View, int, ViewFile] | None:
        """The source descriptor, view, checked ctime and view file of an open handle (None
        for an unknown or broken one): what a read path outside Python needs to serve it."""
        h = self._handles.get(fh)
        if h is None or h.broken:
            return None
        with self._lock:
            return h.fd, h.view, h.ctime_ns, h.file

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
        elsewhere = self.open_elsewhere
        if len(self._handles) + (0 if elsewhere is None else elsewhere()) >= self.max_handles:
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
            fh = next(_FH_NUMBERS)
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

    def adopt(self, fh: int, fd: int, vf: ViewFile, view: View, ctime_ns: int, nlink: int) -> None:
        """Hold handle ``fh``, opened elsewhere (the C path) from ``view`` of ``vf``, as one
        :meth:`open` opened: source descriptor ``fd``, checked at ``ctime_ns`` with
        ``nlink`` links. It was opened through the page cache (not ``direct_io``)."""
        with self._lock:
            self._handles[fh] = _Handle(fd, view, ctime_ns, nlink, vf)
            versions = self._open_versions.setdefault(vf.mount_path, Counter())
            versions[_version(vf)] += 1

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
        return os.open(path, SOURCE_OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; reading is still allowed without it.
        return os.open(path, SOURCE_OPEN_FLAGS)
