"""The C read path: libfuse's getattr, read_buf and release, answered without Python.

``_fastread.c`` (built with the package; the mount falls back to the Python path without
it) keeps a table of open handles and one of each mount's view files. :class:`FastReads`
registers each handle Python opened (its source descriptor, its view's segments and the
source state open checked), marks the handles whose path the tree changed, drains the
handles libfuse released so Python closes their descriptors, and keeps the file table in
step with the tree (under the tree's lock). The C code answers only what Python would
answer with the very same bytes; anything else (a directory or unknown path, a marked or
unknown handle, a source that changed or shrank, no memory) goes to the Python callback,
which decides, refuses, counts and logs.

Open is answered in C only for a view Python has opened before through the page cache,
of the version the tree serves now: Python then sets a *template* on the path's entry (the
source's path, the view's segments, the state they were built from), which goes with the
entry's next change. C opens the source as Python does and answers only if it is in exactly
that state; Python *adopts* such a handle (holds it as one it opened, with its version and
checks) at the first read C does not answer and when the tree changes its path. Every
other open goes to Python, which renders, checks, refuses, counts and logs.

Why C: every callback into Python costs a trip through ctypes and the GIL, and getattr,
opens, reads and releases are most of a file's callbacks (notes/fuse-perf.md); and an open
that waits for the GIL waits for whatever else the daemon does (indexing a burst of files).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deidfs.view.model import View
from deidfs.view.tree import ViewFile

log = logging.getLogger(__name__)

#: Set to 0 to serve every read through Python (diagnosis, and the tests of both paths).
ENV_SWITCH = "DEIDFS_C_READS"
#: Released handles taken from the C queue at a time.
DRAIN_BATCH = 4096
#: Seconds between two drains of the handles the C path released (their descriptors are
#: closed then; every open drains too).
DRAIN_SECONDS = 0.25

_u64 = ctypes.c_uint64
_i64 = ctypes.c_int64
_size = ctypes.c_size_t
_ptr = ctypes.c_void_p
#: The zeroed ranges of a view without any.
_NO_ZEROED = (_u64 * 1)()
#: Mount ids, unique in the process (0 is none): libfuse hands each callback its mount's.
_MOUNT_IDS = itertools.count(1)
#: Handle numbers C opens from (``C_FH`` in the C code); Python's stay below.
C_FH = 1 << 62
#: Templates (see the module doc) kept at most: the C table's size, less a margin.
MAX_TEMPLATES = 60_000


#: How a view goes to C (``dfs_register``, ``dfs_template_set``): its segments, the
#: source state they were built from, and the epoch (see :func:`_view_args`).
_VIEW_ARGTYPES: list[Any] = [
    ctypes.c_char_p, _size,  # header
    ctypes.c_char_p, _size,  # pixels in memory
    _i64, _size,  # source pixel range
    _ptr, _size,  # zeroed pairs
    ctypes.c_char_p, _size,  # trailer
    _u64, _u64, _i64, _i64, _i64,  # dev, ino, size, mtime_ns, ctime_ns
    _u64,  # epoch
]  # fmt: skip


@functools.cache
def _library() -> ctypes.PyDLL | None:
    """The built ``_fastread`` library, or None (not built: no compiler at install)."""
    spec = importlib.util.find_spec("deidfs.mount._fastread")
    if spec is None or not spec.origin:
        return None
    # PyDLL: every function Python calls takes microseconds at most and keeps the GIL.
    lib = ctypes.PyDLL(spec.origin)
    lib.dfs_set_context.argtypes = [_ptr]
    lib.dfs_set_context.restype = None
    lib.dfs_mount_new.argtypes = [_u64, _ptr, _ptr, _ptr, _ptr, ctypes.c_uint32,
                                  ctypes.c_uint32, ctypes.c_uint32, _u64]  # fmt: skip
    lib.dfs_mount_new.restype = ctypes.c_int
    lib.dfs_mount_end.argtypes = [_u64]
    lib.dfs_mount_end.restype = None
    lib.dfs_attr_set.argtypes = [_u64, ctypes.c_char_p, _size, _u64, _i64, _i64]
    lib.dfs_attr_set.restype = ctypes.c_int
    lib.dfs_attr_del.argtypes = [_u64, ctypes.c_char_p, _size]
    lib.dfs_attr_del.restype = None
    lib.dfs_attr_count.argtypes = [_u64]
    lib.dfs_attr_count.restype = _size
    lib.dfs_stat.argtypes = [_u64, ctypes.c_char_p, _ptr]
    lib.dfs_stat.restype = ctypes.c_int
    lib.dfs_register.argtypes = [_u64, ctypes.c_int, *_VIEW_ARGTYPES]  # fh, fd, the view
    lib.dfs_register.restype = ctypes.c_int
    lib.dfs_mark.argtypes = [_u64]
    lib.dfs_mark.restype = None
    lib.dfs_forget.argtypes = [_u64]
    lib.dfs_forget.restype = ctypes.c_int
    lib.dfs_bump_epoch.argtypes = []
    lib.dfs_bump_epoch.restype = _u64
    lib.dfs_epoch.argtypes = []
    lib.dfs_epoch.restype = _u64
    lib.dfs_drain.argtypes = [ctypes.POINTER(_u64), _size]
    lib.dfs_drain.restype = _size
    lib.dfs_queued.argtypes = []
    lib.dfs_queued.restype = _size
    lib.dfs_counters.argtypes = [ctypes.POINTER(_u64)]
    lib.dfs_counters.restype = None
    lib.dfs_mount_open.argtypes = [_u64, ctypes.c_int, _size]
    lib.dfs_mount_open.restype = None
    lib.dfs_template_set.argtypes = [
        _u64, ctypes.c_char_p, _size, ctypes.c_char_p,  # mount, path, source
        *_VIEW_ARGTYPES,
    ]  # fmt: skip
    lib.dfs_template_set.restype = _u64
    lib.dfs_template_drop.argtypes = [_u64, ctypes.c_char_p, _size, _u64]
    lib.dfs_template_drop.restype = None
    lib.dfs_templates_freed.argtypes = [ctypes.POINTER(_u64), _size]
    lib.dfs_templates_freed.restype = _size
    lib.dfs_template_handles.argtypes = [_u64, ctypes.POINTER(_u64), _size]
    lib.dfs_template_handles.restype = _size
    lib.dfs_c_handles.argtypes = [ctypes.POINTER(_u64), _size]
    lib.dfs_c_handles.restype = _size
    lib.dfs_freed_count.argtypes = []
    lib.dfs_freed_count.restype = _size
    lib.dfs_c_open.argtypes = []
    lib.dfs_c_open.restype = _size
    lib.dfs_adopt.argtypes = [_u64, ctypes.POINTER(_i64)]
    lib.dfs_adopt.restype = ctypes.c_int
    return lib


@functools.cache
def route_libfuse_log(libfuse: Any) -> bool:
    """Have libfuse write its log lines with write(2), not stdio (see ``dfs_fuse_log``);
    once per process. False when the C library is not built."""
    lib = _library()
    if lib is None:
        return False
    set_log = libfuse.fuse_set_log_func
    set_log.argtypes = [_ptr]
    set_log.restype = None
    set_log(ctypes.cast(lib.dfs_fuse_log, _ptr).value)
    return True


def available() -> bool:
    """Whether the C read path is built and not switched off (``DEIDFS_C_READS=0``)."""
    if os.environ.get(ENV_SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return False
    try:
        return _library() is not None
    except OSError as exc:
        log.warning("C read path not loaded: %s", exc)
        return False


@dataclass(frozen=True, slots=True)
class Counters:
    """What the C path did since the mount started."""

    reads: int = 0  #: reads it answered
    bytes: int = 0  #: bytes those reads returned
    releases: int = 0  #: releases it queued for Python
    fallbacks: int = 0  #: reads it handed to Python
    getattrs: int = 0  #: getattrs it answered
    opens: int = 0  #: opens it answered


@dataclass(slots=True)
class _Registered:
    path: str
    view: View  #: keeps the header, pixels and trailer the C table points into alive
    zeroed: Any  #: the ctypes array of zeroed ranges, kept alive likewise


@dataclass(frozen=True, slots=True)
class _Template:
    path: str
    file: ViewFile  #: the version the template opens
    view: View  #: its segments, which the C template points into
    zeroed: Any


@dataclass(frozen=True, slots=True)
class Adopted:
    """A handle C opened, now Python's: what :meth:`ViewFS.adopt` needs of it."""

    fh: int
    fd: int
    file: ViewFile
    view: View
    ctime_ns: int
    nlink: int


def _view_args(view: View, zeroed: Any, ctime_ns: int, epoch: int) -> tuple[Any, ...]:
    """``view`` as :data:`_VIEW_ARGTYPES` (``zeroed``: its :func:`_zeroed` array)."""
    src = view.source
    return (
        view.header, len(view.header),
        view.pixels, len(view.pixels),
        view.pixel_offset, view.pixel_length,
        ctypes.addressof(zeroed), len(view.zeroed),
        view.trailer, len(view.trailer),
        src.dev, src.ino, src.size, src.mtime_ns, ctime_ns,
        epoch,
    )  # fmt: skip


def _zeroed(view: View) -> Any:
    if not view.zeroed:
        return _NO_ZEROED
    pairs = [x for rng in view.zeroed for x in rng]
    return (_u64 * len(pairs))(*pairs)


class FastReads:
    """The C table of open handles, as seen from Python (one per mount).

    Handle numbers are unique in the process (:class:`~deidfs.view.handles.ViewFS` draws
    them from one counter), and every handle of this mount is forgotten when it ends, so
    the process-wide C table never answers one mount with another's handle.
    """

    def __init__(self) -> None:
        lib = _library()
        if lib is None:
            raise OSError("the C read path is not built")
        self._lib = lib
        self._lock = threading.Lock()
        self._registered: dict[int, _Registered] = {}
        self._by_path: dict[str, set[int]] = {}
        self._callbacks: tuple[Any, ...] = ()
        #: Views a read still in progress in C copies from, though forgotten: kept for good
        #: (only when the mount was detached while busy).
        self._kept: list[_Registered] = []
        self._drain_buf = (_u64 * DRAIN_BATCH)()
        #: Templates by id, until C reports them freed (C points into their views).
        self._templates: dict[int, _Template] = {}
        self._templates_of: dict[str, set[int]] = {}
        #: Templates set on an entry, oldest first: beyond the bound the oldest is dropped.
        self._set: OrderedDict[int, int] = OrderedDict()
        self._set_bytes = 0
        self.max_template_bytes = 0  #: set by :meth:`open_from_templates`
        self._adopt_buf = (_i64 * 4)()
        self._counted = self.counters()
        self.mount_id = 0  #: the mount's id in the C code, from :meth:`install` on

    # -- installing into libfuse's operations ----------------------------------------------

    def install(
        self,
        ops: Any,
        callbacks: dict[str, Any],
        context: Any,
        *,
        uid: int,
        gid: int,
        file_mode: int,
        blksize: int,
    ) -> int:
        """Put the C ``getattr``, ``read_buf`` and ``release`` into mfusepy's
        ``fuse_operations`` ``ops`` for a new mount; returns its id, which the mount's init
        must answer (libfuse then gives it to every callback).

        ``callbacks`` are the ctypes callbacks of the Python path by name, which the C code
        hands every request it does not answer (kept alive here); ``context`` is libfuse's
        ``fuse_get_context``. ``uid``, ``gid``, ``file_mode`` and ``blksize`` are what the
        Python getattr answers for every view file.
        """
        fields = {f[0]: f[1] for f in type(ops)._fields_}
        self._callbacks = tuple(callbacks.values())
        lib = self._lib
        lib.dfs_set_context(ctypes.cast(context, _ptr).value)
        mount_id = next(_MOUNT_IDS)
        rc = lib.dfs_mount_new(
            mount_id,
            ctypes.cast(callbacks["read_buf"], _ptr).value,
            ctypes.cast(callbacks["release"], _ptr).value,
            ctypes.cast(callbacks["getattr"], _ptr).value,
            ctypes.cast(callbacks["open"], _ptr).value,
            uid, gid, file_mode, blksize,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("C read path: no memory for a mount")
        self.mount_id = mount_id
        ops.read_buf = ctypes.cast(lib.dfs_read_buf, fields["read_buf"])
        ops.release = ctypes.cast(lib.dfs_release, fields["release"])
        ops.getattr = ctypes.cast(lib.dfs_getattr, fields["getattr"])
        ops.open = ctypes.cast(lib.dfs_open, fields["open"])
        return mount_id

    def open_from_templates(self, open_flags: int, max_open: int, max_bytes: int) -> None:
        """Let C open sources (with ``open_flags``, as Python does) for at most
        ``max_open`` handles at once, from templates holding at most ``max_bytes`` of
        views; before this, every open goes to Python."""
        self.max_template_bytes = max_bytes
        self._lib.dfs_mount_open(self.mount_id, open_flags, max_open)

    def end(self) -> None:
        """The mount's loop has ended: its file table goes."""
        if self.mount_id:
            self._lib.dfs_mount_end(self.mount_id)

    # -- the file table --------------------------------------------------------------------

    def file_changed(self, path: str, vf: ViewFile | None) -> None:
        """What ``path`` serves changed (a :meth:`ViewTree.watch_files` listener): getattr
        answers ``vf``'s attributes from now on, or asks Python (``vf`` None)."""
        raw = path.encode("utf-8", "surrogateescape")
        if vf is None:
            self._lib.dfs_attr_del(self.mount_id, raw, len(raw))
        elif self._lib.dfs_attr_set(self.mount_id, raw, len(raw), vf.ino, vf.size, vf.mtime_ns):
            # No memory for it: the path must not keep an older answer.
            self._lib.dfs_attr_del(self.mount_id, raw, len(raw))

    @property
    def files(self) -> int:
        """View files in the C table of this mount."""
        return int(self._lib.dfs_attr_count(self.mount_id)) if self.mount_id else 0

    # -- handles -------------------------------------------------------------------------

    def epoch(self) -> int:
        """The current epoch, to be read *before* a handle is opened (see :meth:`register`)."""
        return int(self._lib.dfs_epoch())

    def folders_changed(self) -> None:
        """A folder's views change (reload): every handle registered so far goes to Python."""
        self._lib.dfs_bump_epoch()

    def register(self, fh: int, path: str, fd: int, view: View, ctime_ns: int, epoch: int) -> bool:
        """Serve reads of open handle ``fh`` (of view ``view`` at mount ``path``, reading
        source ``fd`` whose state was checked at ``ctime_ns``) from C.

        ``epoch`` is :meth:`epoch` read before the handle was opened: a reload in between
        leaves the handle with Python. False if the C table has no room for it (its reads
        then stay in Python).
        """
        zeroed = _zeroed(view)
        args = (fh, fd, *_view_args(view, zeroed, ctime_ns, epoch))
        with self._lock:
            ok = int(self._lib.dfs_register(*args)) == 0
            if ok:
                self._registered[fh] = _Registered(path, view, zeroed)
                self._by_path.setdefault(path, set()).add(fh)
        return ok

    # -- templates and adoption ----------------------------------------------------------

    def set_template(self, path: str, vf: ViewFile, view: View, epoch: int) -> int:
        """Let C answer opens of ``path`` from ``view`` of ``vf``; the template's id, or 0
        (none set: the C table is full, no memory, or the path not in the file table).

        The caller holds the tree's lock and has checked that the tree serves ``vf`` at
        ``path``, settled, and that ``view`` was opened from the page cache, of exactly
        ``vf.state``; ``epoch`` is :meth:`epoch` read before that open.
        """
        src, state = view.source, vf.state
        if (src.dev, src.ino, src.size, src.mtime_ns) != (
            state.dev, state.ino, state.size, state.mtime_ns,
        ):  # fmt: skip
            return 0
        raw = path.encode("utf-8", "surrogateescape")
        zeroed = _zeroed(view)
        with self._lock:
            tid = int(
                self._lib.dfs_template_set(
                    self.mount_id, raw, len(raw), os.fsencode(vf.source),
                    *_view_args(view, zeroed, state.ctime_ns, epoch),
                )
            )  # fmt: skip
            if not tid:
                return 0
            self._templates[tid] = _Template(path, vf, view, zeroed)
            self._templates_of.setdefault(path, set()).add(tid)
            weight = len(view.header) + len(view.pixels) + len(view.trailer)
            self._set[tid] = weight
            self._set_bytes += weight
            while self._set and (
                self._set_bytes > self.max_template_bytes or len(self._set) > MAX_TEMPLATES
            ):
                old, w = self._set.popitem(last=False)
                self._set_bytes -= w
                gone = self._templates.get(old)
                if gone is not None:
                    rp = gone.path.encode("utf-8", "surrogateescape")
                    self._lib.dfs_template_drop(self.mount_id, rp, len(rp), old)
        return tid

    def _take_freed(self) -> None:
        """Under the lock: let go of the templates C freed."""
        while True:
            n = int(self._lib.dfs_templates_freed(self._drain_buf, DRAIN_BATCH))
            for tid in self._drain_buf[:n]:
                t = self._templates.pop(tid, None)
                w = self._set.pop(tid, None)
                if w is not None:
                    self._set_bytes -= w
                if t is not None:
                    tids = self._templates_of.get(t.path)
                    if tids is not None:
                        tids.discard(tid)
                        if not tids:
                            del self._templates_of[t.path]
            if n < DRAIN_BATCH:
                return

    @property
    def templates(self) -> int:
        """Templates C still holds (set on an entry, or kept by an open handle)."""
        with self._lock:
            self._take_freed()
            return len(self._templates)

    def c_open(self) -> int:
        """Handles C opened that Python has not adopted (open now)."""
        return int(self._lib.dfs_c_open())

    def adopt(self, fh: int) -> Adopted | None:
        """Take handle ``fh``, which C opened, into Python (None: not one C holds)."""
        with self._lock:
            out = self._adopt_buf
            if self._lib.dfs_adopt(fh, out) != 0:
                return None
            fd, tid, ctime_ns, nlink = (int(v) for v in out)
            # Alive: the handle holds a reference to its template until it is freed.
            t = self._templates[tid]
            self._registered[fh] = _Registered(t.path, t.view, t.zeroed)
            self._by_path.setdefault(t.path, set()).add(fh)
        return Adopted(fh, fd, t.file, t.view, ctime_ns, nlink)

    def opened_at(self, paths: Iterable[str]) -> list[int]:
        """The unadopted handles C opened at ``paths`` (from any of their templates)."""
        out: list[int] = []
        with self._lock:
            tids = [t for path in paths for t in self._templates_of.get(path, ())]
            if not tids:
                return out
            # No handle is added to a template once it is off its entry (the tree's change
            # took it off first), so one buffer as large as every C handle holds them all.
            buf = (_u64 * (int(self._lib.dfs_c_open()) + 64))()
            for tid in tids:
                n = int(self._lib.dfs_template_handles(tid, buf, len(buf)))
                out.extend(buf[:n])
        return out

    def all_opened(self) -> list[int]:
        """Every unadopted handle C opened (at the mount's end)."""
        buf = (_u64 * (1 << 16))()
        n = int(self._lib.dfs_c_handles(buf, len(buf)))
        return list(buf[:n])

    def mark(self, paths: Iterable[str]) -> None:
        """The tree changed ``paths``: their handles' reads go to Python, which checks."""
        with self._lock:
            for path in paths:
                for fh in self._by_path.get(path, ()):
                    self._lib.dfs_mark(fh)

    def mark_handle(self, fh: int) -> None:
        """Send every later read of ``fh`` to Python."""
        self._lib.dfs_mark(fh)

    def _forget(self, fh: int) -> None:
        """Under the lock: out of the C table and of Python's records."""
        busy = self._lib.dfs_forget(fh)
        reg = self._registered.get(fh)
        if busy and reg is not None:
            self._kept.append(reg)
        self._unregistered(fh)

    def _unregistered(self, fh: int) -> None:
        reg = self._registered.pop(fh, None)
        if reg is not None:
            fhs = self._by_path.get(reg.path)
            if fhs is not None:
                fhs.discard(fh)
                if not fhs:
                    del self._by_path[reg.path]

    def forget(self, fh: int) -> None:
        """Python releases ``fh`` itself: out of the C table."""
        with self._lock:
            self._forget(fh)

    def drain(self) -> list[int]:
        """Handles libfuse released through the C path since the last drain (to be
        released in Python: their descriptors are still open)."""
        out: list[int] = []
        if not self._lib.dfs_queued():
            if self._lib.dfs_freed_count():
                with self._lock:
                    self._take_freed()
            return out
        with self._lock:
            self._take_freed()
            while True:
                n = int(self._lib.dfs_drain(self._drain_buf, DRAIN_BATCH))
                for fh in self._drain_buf[:n]:
                    self._unregistered(fh)
                    out.append(fh)
                if n < DRAIN_BATCH:
                    return out

    def forget_all(self) -> None:
        """The mount ends: nothing of it stays in the C table."""
        with self._lock:
            for fh in list(self._registered):
                self._forget(fh)

    @property
    def registered(self) -> int:
        """Handles in the C table."""
        return len(self._registered)

    def counters(self) -> Counters:
        """What the C path did in this process (one mount at a time in a daemon)."""
        raw = (_u64 * 6)()
        self._lib.dfs_counters(raw)
        return Counters(*(int(v) for v in raw))

    def new_counts(self) -> Counters:
        """What the C path did since the last call (to add to the metrics)."""
        now = self.counters()
        with self._lock:
            last, self._counted = self._counted, now
        return Counters(
            now.reads - last.reads,
            now.bytes - last.bytes,
            now.releases - last.releases,
            now.fallbacks - last.fallbacks,
            now.getattrs - last.getattrs,
            now.opens - last.opens,
        )
