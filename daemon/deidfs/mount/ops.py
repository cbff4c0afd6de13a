"""The mfusepy operations: translation between libfuse and the view, nothing more.

:class:`DeidOperations` answers libfuse over a :class:`~deidfs.view.handles.ViewFS` (not
found -> ENOENT, failure -> EIO, any write -> EROFS) and counts each operation.

Performance (see notes/fuse-perf.md): ``getattr`` and ``readdir`` are dictionary lookups,
and readdirplus hands the kernel every entry's attributes with the listing. Reads are
answered by ``read_buf`` with a buffer libfuse owns, the source's pixel bytes read straight
into it (no bytes object, the GIL released).

With the C read path built (:mod:`deidfs.mount.fastread`), read_buf and release of the
handles open registers are answered in C, without entering Python; every request it does
not answer comes here.

Not done on purpose: handing libfuse the source *descriptor* for the pixel bytes (an fd
buffer, spliced). libfuse reads it after the callback has returned, so the source's state
could no longer be checked after the read, and an in-place write racing a read would be
served mixed; measured here it was no faster (slower for large files with 1 MiB requests).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Concatenate, ParamSpec, TypeVar

from deidfs.errors import Exhausted, NotFound, Refused
from deidfs.mount import fastread
from deidfs.mount.binding import FuseBufvec, _libc, _libfuse, _memory_view
from deidfs.mount.c_path import CReadPath
from deidfs.ops.metrics import Metrics
from deidfs.view.handles import ViewFS
from deidfs.view.tree import DIR_MODE, FILE_MODE, PSEUDO_EPOCH_NS, ViewFile, inode_of

log = logging.getLogger(__name__)

#: Hint for readers to use large reads; each FUSE request costs a trip into Python.
BLOCK_SIZE = 256 * 1024


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

    ``file_mode`` and ``block_size`` are what getattr answers for every view file (the C
    read path answers the same).

    Not a subclass of ``mfusepy.Operations`` so that this module imports without mfusepy;
    mfusepy registers exactly the methods defined here.
    """

    use_ns = True
    file_mode = FILE_MODE
    block_size = BLOCK_SIZE

    def __init__(
        self,
        fs: ViewFS,
        uid: int | None = None,
        gid: int | None = None,
        metrics: Metrics | None = None,
        c_reads: bool | None = None,
    ) -> None:
        """``c_reads``: serve reads and releases from the C read path (default: when it is
        built and not switched off, :func:`deidfs.mount.fastread.available`)."""
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
        self.python_read_buf_calls = 0  #: reads answered by :meth:`read_buf`
        use_c = fastread.available() if c_reads is None else c_reads
        #: The C read path of this mount, when it serves (its table, drains and counts).
        self.c_path = CReadPath(fs, metrics) if use_c else None
        self.fast = None if self.c_path is None else self.c_path.fast

    @property
    def read_buf_calls(self) -> int:
        """Reads answered through ``read_buf``, in C or in Python."""
        c = 0 if self.fast is None else self.fast.counters().reads
        return self.python_read_buf_calls + c

    def sync(self) -> None:
        """Release the handles the C path released and count what it did (every open,
        periodically and at each scrape)."""
        if self.c_path is not None:
            self.c_path.sync()

    def end_c_reads(self) -> None:
        """Take this mount out of the C path (at libfuse's destroy, and at stop)."""
        if self.c_path is not None:
            self.c_path.end()

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
        if self.c_path is not None:
            self.c_path.start()
        log.info("reads served by the %s read path", "C" if self.fast is not None else "Python")
        self.initialized.set()

    def destroy(self, path: str) -> None:
        """libfuse is going down: no more invalidations, nothing left in the C table."""
        with self._inval_lock:
            self._fuse_ptr = None
        self.end_c_reads()

    def invalidate(self, paths: Iterable[str]) -> bool:
        """Drop the kernel's cached attributes and pages of ``paths``.

        Returns False if the kernel may still cache one of them: no session (not mounted
        yet, or going down), or an error other than ENOENT (a path the kernel never looked
        up, so holds nothing of). Never called from a FUSE callback: the kernel may wait on
        the request being served.
        """
        paths = list(paths)
        if self.c_path is not None:
            # First: once the kernel has dropped its pages, none of an older version may
            # be read into them again by a handle the C path would still serve.
            self.c_path.mark(paths)
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
            "st_mode": self.file_mode,
            "st_nlink": 1,
            "st_size": vf.size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
            "st_blksize": self.block_size,
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
            self._held(int(fh.fh))
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
        c_path = self.c_path
        epoch = 0
        if c_path is not None:
            epoch = c_path.before_open()
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
        if c_path is not None:
            c_path.register(path, opened.fh, epoch, opened.direct_io)
        return 0

    @_counted("read")
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """Bytes of an open view; EIO if its source changed (the path without
        :meth:`read_buf`: mfusepy copies the returned bytes into libfuse's buffer)."""
        self.read_calls += 1
        self._held(int(fi.fh))
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
        self.python_read_buf_calls += 1
        self._held(int(fi.fh))
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
        except Exception as exc:
            libc.free(mem)
            if self.fast is not None:
                # Refused here: the C path must not serve this handle any more either.
                self.fast.mark_handle(int(fi.fh))
            if isinstance(exc, NotFound):
                raise OSError(errno.EBADF, "no such handle") from exc
            if isinstance(exc, Refused):
                raise OSError(errno.EIO, exc.reason) from exc
            if isinstance(exc, OSError):
                raise
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

    def _held(self, fh: int) -> None:
        """A request C did not answer, about a handle C opened: Python holds it from now
        on (then answers as for one it opened)."""
        c_path = self.c_path
        if c_path is not None and fh >= fastread.C_FH and self.fs.held(fh) is None:
            c_path.adopt(fh)

    def _view_size(self, fi: Any) -> int:
        """Size of the view open on ``fi`` (0 for an unknown handle: read_into says so)."""
        vf = self.fs.held(int(fi.fh))
        return 0 if vf is None else vf.size

    @_counted("release")
    def release(self, path: str, fi: Any) -> int:
        """Close an open view (one the C path does not hold, or all without it)."""
        fh = int(fi.fh)
        if self.fast is not None:
            self.fast.forget(fh)
        self.fs.release(fh)
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
