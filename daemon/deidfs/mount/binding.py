"""The libfuse binding: mfusepy loaded against libfuse3, and what deidfs adds to it.

mfusepy is imported lazily (:func:`load_mfusepy`), after ``FUSE_LIBRARY_NAME=fuse3`` is
set, because on a machine with both libfuse2 and libfuse3 it would otherwise pick libfuse2.
Here too: libfuse's buffer vector as C declares it (for ``read_buf`` replies), memory views
of libfuse-owned buffers, and :func:`fuse_class`, mfusepy's ``FUSE`` with the callbacks
deidfs answers faster (getattr, readdirplus, read_buf); libfuse's worker threads keep their
Python thread state between callbacks (:func:`keep_thread_state`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from types import ModuleType
from typing import Any

from deidfs.errors import DeidfsError
from deidfs.mount.fastread import route_libfuse_log

log = logging.getLogger(__name__)


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
#: The DeidFUSE being constructed on this thread (its loop runs inside the constructor).
_mounting = threading.local()
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


def _with_c_reads(mfusepy: Any) -> None:
    """Make mfusepy's ``fuse_main_real`` put the C read path into the operations of a
    DeidFUSE whose operations have one (``operations.fast``), just before the loop starts.

    mfusepy builds libfuse's ``fuse_operations`` inside ``FUSE.__init__`` and starts the
    loop there, so this is the one moment the table can be changed. The Python callbacks
    the C path falls back to are made here, as mfusepy makes its own.
    """
    real_main = mfusepy.fuse_main_real

    def fuse_main_real(argc: Any, argv: Any, ops_p: Any, size: Any, data: Any) -> Any:
        inst = getattr(_mounting, "fuse", None)
        operations = getattr(inst, "operations", None)
        fast = getattr(operations, "fast", None)
        route_libfuse_log(_libfuse())
        if inst is not None and operations is not None and fast is not None:
            ops = ops_p.contents
            fields = {f[0]: f[1] for f in type(ops)._fields_}
            methods = {
                "read_buf": inst.read_buf,
                "release": inst.release,
                "getattr": inst.getattr_fuse_3,
                "open": inst.open,
            }
            callbacks = {
                name: fields[name](functools.partial(inst._wrapper, method))
                for name, method in methods.items()
            }
            fast.install(
                ops,
                callbacks,
                _libfuse().fuse_get_context,
                uid=operations.uid,
                gid=operations.gid,
                file_mode=operations.file_mode,
                blksize=operations.block_size,
            )
        return real_main(argc, argv, ops_p, size, data)

    mfusepy.fuse_main_real = fuse_main_real


@functools.cache
def fuse_class(mfusepy: Any) -> Any:
    """mfusepy's ``FUSE`` with the callbacks deidfs answers better than its generic ones.

    ``readdir``: mfusepy hands libfuse names and modes only, so ``ls -l`` costs a LOOKUP
    and a GETATTR per entry. When the kernel asks for readdirplus, this fills the whole
    ``stat`` of each entry (dictionary lookups) with ``FUSE_FILL_DIR_PLUS``, and libfuse
    answers the kernel with the entries and their attributes at once.
    """

    _with_c_reads(mfusepy)

    class DeidFUSE(mfusepy.FUSE):  # type: ignore[misc]
        def __init__(self, operations: Any, mountpoint: str, **kwargs: Any) -> None:
            _mounting.fuse = self
            try:
                super().__init__(operations, mountpoint, **kwargs)
            finally:
                _mounting.fuse = None

        def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            if not getattr(_worker, "kept", False):
                try:
                    keep_thread_state()
                except Exception as exc:  # never fail a request for it (ctypes would
                    _worker.kept = True  # turn an exception here into a success)
                    log.warning("thread state not kept: %s", type(exc).__name__)
            return super()._wrapper(func, *args, **kwargs)

        def init_fuse_3(self, conn: Any, config: Any) -> int | None:
            # What init answers is the context's private_data of every later callback:
            # the C read path finds its mount by it.
            super().init_fuse_3(conn, config)
            fast = getattr(self.operations, "fast", None)
            return fast.mount_id if fast is not None and fast.mount_id else None

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
