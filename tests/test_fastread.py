"""The C read path (deidfs/mount/_fastread.c): the same bytes as the Python path, or none.

The C table is driven here directly through libfuse's callback signature (a real
``fuse_file_info`` and buffer vector, no mount) so every segment boundary can be checked
against :func:`deidfs.view.render.read_view`; then through real mounts, in process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, sample_file, wait_for
from deidfs.config.load import load_config
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.mount import binding, fastread
from deidfs.mount.ops import DeidOperations
from deidfs.service.core import Service
from deidfs.view.handles import SOURCE_OPEN_FLAGS
from deidfs.view.model import View
from deidfs.view.render import SourceStat, read_view, render_path
from deidfs.view.tree import FolderView, ViewFile, ViewTree


def test_the_c_read_path_is_built() -> None:
    """scripts/setup installs gcc and libfuse3's headers, so the package builds it; the
    daemon would serve every read through Python without it."""
    assert fastread.available(), "deidfs.mount._fastread is not built (gcc, libfuse3-dev)"


# -- the C table, driven directly ----------------------------------------------------------


class _Table:
    """The C library with a mount of recording Python fallbacks, called as libfuse calls
    it (the mount found through a libfuse context of our own)."""

    def __init__(self) -> None:
        self.mfusepy = binding.load_mfusepy()
        self.fast = fastread.FastReads()
        lib = fastread._library()
        assert lib is not None
        self.lib = lib
        self.fallbacks: list[tuple[int, int, int]] = []
        self.getattr_fallbacks: list[bytes] = []
        self.open_fallbacks: list[bytes] = []
        self.mount_id = next(fastread._MOUNT_IDS)
        self._context = self.mfusepy.fuse_context()
        self._context.private_data = self.mount_id
        self._context_fn = ctypes.CFUNCTYPE(ctypes.c_void_p)(
            lambda: ctypes.addressof(self._context)
        )
        lib.dfs_set_context(ctypes.cast(self._context_fn, ctypes.c_void_p))
        proto_read = ctypes.CFUNCTYPE(
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int64,
            ctypes.c_void_p,
        )
        proto_release = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        proto_getattr = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p
        )

        def fallback(path: bytes | None, bufp: int, size: int, off: int, fi: int) -> int:
            fh = self.mfusepy.fuse_file_info.from_address(fi).fh
            self.fallbacks.append((fh, off, size))
            return -errno.EIO

        def getattr_fallback(path: bytes, st: int, fi: int) -> int:
            self.getattr_fallbacks.append(path)
            return -errno.ENOENT

        def open_fallback(path: bytes, fi: int) -> int:
            self.open_fallbacks.append(path)
            return -errno.EACCES

        self._read = proto_read(fallback)
        self._release = proto_release(lambda path, fi: 0)
        self._getattr = proto_getattr(getattr_fallback)
        self._open = proto_release(open_fallback)
        assert (
            lib.dfs_mount_new(
                self.mount_id,
                ctypes.cast(self._read, ctypes.c_void_p),
                ctypes.cast(self._release, ctypes.c_void_p),
                ctypes.cast(self._getattr, ctypes.c_void_p),
                ctypes.cast(self._open, ctypes.c_void_p),
                1234,
                5678,
                DeidOperations.file_mode,
                DeidOperations.block_size,
            )
            == 0
        )
        self.fast.mount_id = self.mount_id
        read_buf = lib.dfs_read_buf
        read_buf.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.POINTER(binding.FuseBufvec)),
            ctypes.c_size_t,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        read_buf.restype = ctypes.c_int
        self._read_buf = read_buf
        release = lib.dfs_release
        release.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        release.restype = ctypes.c_int
        self._release_fn = release
        getattr_fn = lib.dfs_getattr
        getattr_fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        getattr_fn.restype = ctypes.c_int
        self._getattr_fn = getattr_fn
        open_fn = lib.dfs_open
        open_fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        open_fn.restype = ctypes.c_int
        self._open_fn = open_fn

    def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        """The handle C opens ``path`` with, or the negative errno of the fallback."""
        fi = self.mfusepy.fuse_file_info()
        fi.flags = flags
        rc = self._open_fn(path.encode(), ctypes.addressof(fi))
        return int(fi.fh) if rc == 0 else int(rc)

    def stat(self, path: str) -> dict[str, int] | int:
        """What the C getattr answers for ``path`` (the fields the Python one sets), or the
        negative errno of the fallback."""
        st = self.mfusepy.c_stat()
        rc = self._getattr_fn(path.encode(), ctypes.addressof(st), None)
        if rc != 0:
            return int(rc)
        return {
            "st_ino": st.st_ino,
            "st_mode": st.st_mode,
            "st_nlink": st.st_nlink,
            "st_size": st.st_size,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_atime": st.st_atimespec.tv_sec * 10**9 + st.st_atimespec.tv_nsec,
            "st_mtime": st.st_mtimespec.tv_sec * 10**9 + st.st_mtimespec.tv_nsec,
            "st_ctime": st.st_ctimespec.tv_sec * 10**9 + st.st_ctimespec.tv_nsec,
            "st_blksize": st.st_blksize,
            "st_blocks": st.st_blocks,
        }

    def read(self, fh: int, off: int, size: int) -> bytes | int:
        """The bytes C answers, or the negative errno of the fallback."""
        fi = self.mfusepy.fuse_file_info()
        fi.fh = fh
        vec = ctypes.POINTER(binding.FuseBufvec)()
        rc = self._read_buf(None, ctypes.byref(vec), size, off, ctypes.addressof(fi))
        if rc != 0:
            return int(rc)
        buf = vec.contents.buf[0]
        assert vec.contents.count == 1
        assert (buf.fd, buf.flags) == (-1, 0)
        data = ctypes.string_at(buf.mem, buf.size) if buf.size else b""
        libc = binding._libc()
        libc.free(buf.mem)
        libc.free(ctypes.cast(vec, ctypes.c_void_p))
        return data

    def release(self, fh: int) -> None:
        fi = self.mfusepy.fuse_file_info()
        fi.fh = fh
        assert self._release_fn(None, ctypes.addressof(fi)) == 0

    def close(self) -> None:
        for fh in self.fast.all_opened():  # as the mount's end does
            got = self.fast.adopt(fh)
            if got is not None:
                os.close(got.fd)
        self.fast.forget_all()
        self.fast.drain()
        self.fast.end()
        context = binding._libfuse().fuse_get_context
        self.lib.dfs_set_context(ctypes.cast(context, ctypes.c_void_p))


@pytest.fixture
def table() -> Iterator[_Table]:
    t = _Table()
    try:
        yield t
    finally:
        t.close()


_FH = iter(range(1 << 40, 1 << 41))  # far above the numbers mounts of this process use


def _register(table: _Table, src: Path, view: View) -> tuple[int, int]:
    fd = os.open(src, os.O_RDONLY)
    st = os.fstat(fd)
    fh = next(_FH)
    assert table.fast.register(fh, "/x", fd, view, st.st_ctime_ns, table.fast.epoch())
    return fh, fd


@pytest.fixture(scope="module")
def ct_view(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, View]:
    src = tmp_path_factory.mktemp("fastread") / "ct.dcm"
    shutil.copyfile(sample_file("CT_small.dcm"), src)
    view = render_path(
        src, compile_plan(BUILTIN_PROFILES["Basic"]), Pseudonymizer(b"k" * 32), source_rel=None
    )
    assert view.pixel_length > 0
    assert not view.pixels
    return src, view


def _variants(view: View) -> dict[str, View]:
    """The view as rendered, with mask rectangles, and with pixels in memory (the segment
    shapes a view can have)."""
    n = view.pixel_length
    zeroed = ((0, 1), (7, 300), (301, 302), (n // 2, n // 2 + 4099), (n - 5, n))
    return {
        "plain": view,
        "zeroed": dataclasses.replace(view, zeroed=zeroed),
        "in memory": dataclasses.replace(
            view, pixels=bytes(range(256)) * 41, pixel_offset=0, pixel_length=0
        ),
        "both": dataclasses.replace(view, pixels=b"\x01\x02\x03", zeroed=zeroed),
    }


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_every_range_is_the_python_paths_bytes(
    table: _Table, ct_view: tuple[Path, View], data: st.DataObject
) -> None:
    """Any offset and size, in every segment shape: C answers exactly ``read_view``."""
    src, view = ct_view
    name = data.draw(st.sampled_from(sorted(_variants(view))))
    v = _variants(view)[name]
    size = v.size
    edges = [0, len(v.header), len(v.header) + len(v.pixels), size - len(v.trailer), size]
    off = data.draw(
        st.one_of(
            st.integers(0, size + 10),
            st.sampled_from(edges).flatmap(lambda e: st.integers(max(0, e - 3), e + 3)),
        )
    )
    n = data.draw(st.sampled_from([1, 2, 131, 4096, 65536, 1 << 20]) | st.integers(0, size))
    fh, fd = _register(table, src, v)
    try:
        want = read_view(v, fd, off, n)
        assert table.read(fh, off, n) == want, (name, off, n)
    finally:
        table.fast.forget(fh)
        os.close(fd)
    assert table.fallbacks == []


def _own_copy(ct_view: tuple[Path, View], tmp_path: Path) -> tuple[Path, View, os.stat_result]:
    """A copy of the module's source that a test may change, its view (the state it was
    built from is the copy's) and the copy's stat."""
    src0, view = ct_view
    src = tmp_path / "ct.dcm"
    shutil.copyfile(src0, src)
    st0 = os.stat(src)
    state = dataclasses.replace(
        view.source, dev=st0.st_dev, ino=st0.st_ino, mtime_ns=st0.st_mtime_ns
    )
    return src, dataclasses.replace(view, source=state), st0


def test_a_changed_source_goes_to_python_and_its_bytes_never_out(
    table: _Table, ct_view: tuple[Path, View], tmp_path: Path
) -> None:
    """A write in place (even one that keeps size and mtime) makes C hand the read to
    Python, which refuses it: no byte of the changed source is answered by C."""
    src, v, st0 = _own_copy(ct_view, tmp_path)
    fh, fd = _register(table, src, v)
    try:
        pix = len(v.header)
        assert table.read(fh, 0, 64) == read_view(v, fd, 0, 64)  # header only
        assert isinstance(table.read(fh, pix, 4096), bytes)
        with open(src, "r+b") as f:
            f.seek(v.pixel_offset + 10)
            f.write(b"\xff\xfe")
        os.utime(src, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # mtime set back
        assert table.read(fh, pix, 4096) == -errno.EIO
        assert table.fallbacks == [(fh, pix, 4096)]
        # The header comes from memory, not the source: still served by C.
        assert table.read(fh, 0, 64) == read_view(v, fd, 0, 64)
    finally:
        table.fast.forget(fh)
        os.close(fd)


def test_a_truncated_source_goes_to_python(
    table: _Table, ct_view: tuple[Path, View], tmp_path: Path
) -> None:
    src, v, _ = _own_copy(ct_view, tmp_path)
    fh, fd = _register(table, src, v)
    try:
        os.truncate(src, v.pixel_offset + 100)
        assert table.read(fh, len(v.header), 1 << 20) == -errno.EIO
        assert len(table.fallbacks) == 1
    finally:
        table.fast.forget(fh)
        os.close(fd)


def test_marks_and_epochs_send_reads_to_python(table: _Table, ct_view: tuple[Path, View]) -> None:
    src, view = ct_view
    fh, fd = _register(table, src, view)
    fh2, fd2 = _register(table, src, view)
    try:
        assert isinstance(table.read(fh, 0, 100), bytes)
        table.fast.mark(["/other"])
        assert isinstance(table.read(fh, 0, 100), bytes)
        table.fast.mark_handle(fh)
        assert table.read(fh, 0, 100) == -errno.EIO  # the fallback's answer
        assert isinstance(table.read(fh2, 0, 100), bytes)
        table.fast.folders_changed()  # a reload: every handle registered before
        assert table.read(fh2, 0, 100) == -errno.EIO
        assert [f for f, _, _ in table.fallbacks] == [fh, fh2]
        unknown = next(_FH)
        assert table.read(unknown, 0, 100) == -errno.EIO
    finally:
        table.fast.forget(fh)
        table.fast.forget(fh2)
        os.close(fd)
        os.close(fd2)


def test_a_release_is_queued_for_python_and_the_handle_is_gone(
    table: _Table, ct_view: tuple[Path, View]
) -> None:
    src, view = ct_view
    fh, fd = _register(table, src, view)
    try:
        table.release(fh)
        assert table.fast.drain() == [fh]
        assert table.fast.registered == 0
        assert table.read(fh, 0, 100) == -errno.EIO  # unknown now: Python says EBADF
        assert table.fast.counters().releases >= 1
    finally:
        os.close(fd)


def test_a_slot_taken_leaves_the_second_handle_with_python(
    table: _Table, ct_view: tuple[Path, View]
) -> None:
    src, view = ct_view
    fh, fd = _register(table, src, view)
    try:
        fd2 = os.open(src, os.O_RDONLY)
        try:
            st = os.fstat(fd2)
            # The C table has 2**16 slots: fh + 2**16 collides with fh.
            assert not table.fast.register(fh + (1 << 16), "/y", fd2, view, st.st_ctime_ns, 0)
            assert table.read(fh + (1 << 16), 0, 10) == -errno.EIO
        finally:
            os.close(fd2)
        assert isinstance(table.read(fh, 0, 10), bytes)
    finally:
        table.fast.forget(fh)
        os.close(fd)


# -- opens from templates --------------------------------------------------------------


def _own_ct(tmp_path: Path, view_of: tuple[Path, View]) -> tuple[Path, View, ViewFile]:
    """A source of our own (tests change it), its view, and the view file serving it."""
    src = tmp_path / "ct.dcm"
    shutil.copyfile(view_of[0], src)
    view = render_path(
        src, compile_plan(BUILTIN_PROFILES["Basic"]), Pseudonymizer(b"k" * 32), source_rel=None
    )
    vf = ViewFile("f", str(src), SourceStat.of(os.stat(src)), "d", "ct.dcm", view.size, 1)
    return src, view, vf


def _templated(table: _Table, vf: ViewFile, view: View, max_open: int = 8) -> int:
    table.fast.open_from_templates(SOURCE_OPEN_FLAGS, max_open, 1 << 30)
    table.fast.file_changed(vf.mount_path, vf)
    tid = table.fast.set_template(vf.mount_path, vf, view, table.fast.epoch())
    assert tid
    return tid


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_open_from_a_template_answers_the_views_bytes_and_closes_at_release(
    table: _Table, ct_view: tuple[Path, View], tmp_path: Path
) -> None:
    src, view, vf = _own_ct(tmp_path, ct_view)
    zeroed = dataclasses.replace(
        view, zeroed=((3, 500), (view.pixel_length - 9, view.pixel_length))
    )
    for v in (view, zeroed):
        _templated(table, vf, v)
        baseline, opens = _fds(), table.fast.counters().opens
        fh = table.open(vf.mount_path)
        assert fh >= fastread.C_FH
        assert table.fast.c_open() == 1
        assert table.fast.counters().opens == opens + 1
        held = os.open(src, os.O_RDONLY)
        try:
            for off, n in ((0, v.size), (1, 4095), (len(v.header) - 1, 70_000), (v.size - 3, 9)):
                assert table.read(fh, off, n) == read_view(v, held, off, n)
        finally:
            os.close(held)
        assert _fds() == baseline + 1  # the source, held by C
        table.release(fh)
        assert table.fast.c_open() == 0
        assert _fds() == baseline  # closed by C: Python never knew the handle
        assert table.fast.drain() == []
    assert table.open_fallbacks == []
    assert table.fallbacks == []


def test_an_open_goes_to_python_unless_the_template_is_current_and_the_source_in_its_state(
    table: _Table, ct_view: tuple[Path, View], tmp_path: Path
) -> None:
    src, view, vf = _own_ct(tmp_path, ct_view)
    path = vf.mount_path
    _templated(table, vf, view, max_open=1)
    baseline = _fds()
    # Not a read-only open, or one that truncates: Python refuses it.
    assert table.open(path, os.O_RDWR) == -errno.EACCES
    assert table.open(path, os.O_RDONLY | os.O_TRUNC) == -errno.EACCES
    assert table.open("/f/other.dcm") == -errno.EACCES
    # At most max_open at once.
    fh = table.open(path)
    assert fh >= fastread.C_FH
    assert table.open(path) == -errno.EACCES
    table.release(fh)
    # Only ctime moved (a chmod): Python decides (it serves off the page cache).
    os.chmod(src, 0o640)
    assert table.open(path) == -errno.EACCES
    assert _fds() == baseline
    # A new entry for the path (the tree changed it) takes the template off.
    _templated(table, dataclasses.replace(vf, state=SourceStat.of(os.stat(src))), view)
    assert table.open(path) >= fastread.C_FH
    table.release(table.fast.all_opened()[0])
    table.fast.file_changed(path, dataclasses.replace(vf, size=vf.size + 2))
    assert table.open(path) == -errno.EACCES
    # A reload since the template was set.
    _templated(table, dataclasses.replace(vf, state=SourceStat.of(os.stat(src))), view)
    table.fast.folders_changed()
    assert table.open(path) == -errno.EACCES
    # A FIFO renamed over the source: C's open must not wait for a writer.
    _templated(table, dataclasses.replace(vf, state=SourceStat.of(os.stat(src))), view)
    os.rename(src, tmp_path / "kept.dcm")
    os.mkfifo(src)
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(table.open(path)), daemon=True)
    opener.start()
    opener.join(5)
    if opener.is_alive():
        os.close(os.open(src, os.O_WRONLY | os.O_NONBLOCK))  # free the stuck open
        pytest.fail("C's open waited on a FIFO")
    assert opened == [-errno.EACCES]
    assert len(table.open_fallbacks) == 8
    assert _fds() == baseline
    os.replace(tmp_path / "kept.dcm", src)
    # A source replaced by another file at the same path.
    _templated(table, dataclasses.replace(vf, state=SourceStat.of(os.stat(src))), view)
    shutil.copyfile(src, tmp_path / "new.dcm")
    os.replace(tmp_path / "new.dcm", src)
    assert table.open(path) == -errno.EACCES
    assert len(table.open_fallbacks) == 9
    assert _fds() == baseline
    table.fast.file_changed(path, None)
    assert table.fast.templates == 0  # every one freed: Python let their views go


def test_python_adopts_a_c_handle_and_then_answers_every_read(
    table: _Table, ct_view: tuple[Path, View], tmp_path: Path
) -> None:
    _src, view, vf = _own_ct(tmp_path, ct_view)
    tid = _templated(table, vf, view)
    fh = table.open(vf.mount_path)
    assert table.read(fh, 0, 10) == view.header[:10]
    got = table.fast.adopt(fh)
    assert got is not None
    assert (got.fh, got.file, got.view) == (fh, vf, view)
    assert got.ctime_ns == vf.state.ctime_ns
    assert os.fstat(got.fd).st_ino == vf.state.ino
    assert table.fast.adopt(fh) is None  # once
    assert table.fast.c_open() == 0
    assert table.read(fh, 0, 10) == -errno.EIO  # the fallback: Python answers it now
    assert table.fallbacks == [(fh, 0, 10)]
    table.release(fh)
    assert table.fast.drain() == [fh]  # released like a handle Python opened
    os.close(got.fd)
    # The tree changes the path: the template goes first, and every handle opened from
    # it is found for Python to adopt.
    fh2, fh3 = table.open(vf.mount_path), table.open(vf.mount_path)
    table.fast.file_changed(vf.mount_path, dataclasses.replace(vf, size=1))
    assert sorted(table.fast.opened_at([vf.mount_path])) == sorted([fh2, fh3])
    assert table.fast.opened_at(["/f/elsewhere.dcm"]) == []
    for h in (fh2, fh3):
        adopted = table.fast.adopt(h)
        assert adopted is not None
        table.release(h)
        os.close(adopted.fd)
    assert sorted(table.fast.drain()) == sorted([fh2, fh3])
    assert table.fast.templates == 0
    assert tid not in table.fast._templates


# -- the file table ------------------------------------------------------------------------


def _file(folder: str, relpath: str, source: str, size: int) -> ViewFile:
    state = SourceStat(dev=1, ino=hash(source) & 0xFFFF, size=size, mtime_ns=5, ctime_ns=6)
    return ViewFile(folder, source, state, "d", relpath, size, 946_684_800_123_456_789)


def test_getattr_answers_what_python_answers_and_asks_python_for_the_rest(
    table: _Table,
) -> None:
    vf = _file("f", "a/b.dcm", "/src/b.dcm", 123_457)
    ops = DeidOperations.__new__(DeidOperations)  # only its attribute rules
    ops.uid, ops.gid = 1234, 5678
    table.fast.file_changed(vf.mount_path, vf)
    assert table.stat(vf.mount_path) == ops._file_attrs(vf)
    assert table.fast.files == 1
    assert table.stat("/f/a") == -errno.ENOENT  # a directory: Python's answer
    assert table.stat("/f/a/b.dcmx") == -errno.ENOENT
    assert table.getattr_fallbacks == [b"/f/a", b"/f/a/b.dcmx"]
    bigger = dataclasses.replace(vf, size=9_999_999, mtime_ns=946_684_800_000_000_001)
    table.fast.file_changed(vf.mount_path, bigger)
    assert table.stat(vf.mount_path) == ops._file_attrs(bigger)
    table.fast.file_changed(vf.mount_path, None)
    assert table.stat(vf.mount_path) == -errno.ENOENT
    assert table.fast.files == 0
    # Names that are not UTF-8 are kept as the bytes libfuse gives.
    odd = _file("f", "caf\udce9.dcm", "/src/odd", 10)
    table.fast.file_changed(odd.mount_path, odd)
    st = table.mfusepy.c_stat()
    raw = odd.mount_path.encode("utf-8", "surrogateescape")
    assert table.lib.dfs_stat(table.mount_id, raw, ctypes.addressof(st)) == 0
    assert st.st_size == 10


def test_a_table_of_many_files_grows_and_answers_each(table: _Table) -> None:
    files = [_file("f", f"d{i % 7}/{i}.dcm", f"/s/{i}", i + 1) for i in range(20_000)]
    for vf in files:
        table.fast.file_changed(vf.mount_path, vf)
    assert table.fast.files == len(files)
    for vf in files[::997]:
        got = table.stat(vf.mount_path)
        assert isinstance(got, dict)
        assert (got["st_size"], got["st_ino"]) == (vf.size, vf.ino)
    for vf in files[::2]:
        table.fast.file_changed(vf.mount_path, None)
    assert table.fast.files == len(files) // 2
    assert table.stat(files[0].mount_path) == -errno.ENOENT
    assert isinstance(table.stat(files[1].mount_path), dict)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "replace_folder", "drop_folder"]),
            st.sampled_from(["f", "g"]),
            st.sampled_from(["/s/1", "/s/2", "/s/3", "/s/4"]),
            st.sampled_from(["x.dcm", "y/x.dcm", "z.dcm"]),
            st.integers(1, 3),
        ),
        max_size=40,
    )
)
def test_the_tree_listener_always_holds_what_the_tree_serves(
    ops: list[tuple[str, str, str, str, int]],
) -> None:
    """Whatever the order of adds, replacements, duplicates, removals and folder changes,
    the copy a listener keeps is exactly the tree's files, at every step."""
    tree = ViewTree()
    seen: dict[str, ViewFile] = {}

    def listener(path: str, vf: ViewFile | None) -> None:
        if vf is None:
            del seen[path]
        else:
            seen[path] = vf

    def folder(fid: str) -> FolderView:
        return FolderView(fid, Path("/r"), None, None, None, "d")  # type: ignore[arg-type]

    tree.set_folder(folder("f"))
    tree.put(_file("f", "x.dcm", "/s/0", 9))
    tree.watch_files(listener)
    for op, fid, source, rel, size in ops:
        if op == "put":
            if tree.folder(fid) is None:
                tree.set_folder(folder(fid))
            tree.put(_file(fid, rel, source, size))
        elif op == "remove":
            tree.remove(fid, source)
        elif op == "replace_folder":
            tree.replace_folder(folder(fid))
        else:
            tree.drop_folder(fid)
        want = {p: tree.file(p) for p in seen.keys() | _paths(tree)}
        assert seen == {p: vf for p, vf in want.items() if vf is not None}
    tree.watch_files(None)


def _paths(tree: ViewTree) -> set[str]:
    out: set[str] = set()
    stack = ["/"]
    while stack:
        d = stack.pop()
        for name, _mode in tree.listdir(d) or []:
            child = (d.rstrip("/") + "/" + name) if d != "/" else "/" + name
            if tree.file(child) is not None:
                out.add(child)
            else:
                stack.append(child)
    return out


# -- through real mounts, in process -------------------------------------------------------


def test_two_mounts_in_one_process_never_answer_with_each_others_handles(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Handle numbers are unique in the process: two mounts reading at once, every read
    served by C, each gets its own file's bytes."""
    made = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        d = daemon_factory()
        src = d.add(sample_file(name), f"in/{name}")
        made.append((d, Service(load_config(d.config_path)), d.expected(src)))
    try:
        for _, service, _ in made:
            service.start()
        fds = []
        for d, _, (rel, _) in made:
            wait_for(lambda d=d, rel=rel: (d.folder / rel).exists())
            fds.append(os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT))
        before = [s.ops.python_read_buf_calls for _, s, _ in made]
        for at in range(0, 60_000, 4096):
            for fd, (_, _, (_, want)) in zip(fds, made, strict=True):
                assert os.pread(fd, 4096, at) == want[at : at + 4096]
        for fd in fds:
            os.close(fd)
        assert [s.ops.python_read_buf_calls for _, s, _ in made] == before
    finally:
        for _, service, _ in made:
            service.stop()


def test_released_views_close_their_sources_and_leave_the_c_table(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    src = d.add(sample_file("CT_small.dcm"), "in/CT_small.dcm")
    rel, want = d.expected(src)
    service = Service(load_config(d.config_path))
    try:
        service.start()
        wait_for((d.folder / rel).exists)
        fast = service.ops.fast
        assert fast is not None
        baseline = len(os.listdir("/proc/self/fd"))
        getattrs = fast.counters().getattrs
        for _ in range(300):
            assert (d.folder / rel).read_bytes() == want
        assert fast.counters().getattrs > getattrs  # answered by C: the file is in its table
        assert fast.files == 1
        wait_for(lambda: service.status().open_files == 0 and fast.registered == 0)
        assert len(os.listdir("/proc/self/fd")) <= baseline
        assert fast.counters().releases >= 300
    finally:
        service.stop()
    assert service.ops.fast is not None
    assert service.ops.fast.registered == 0


def test_a_source_rewritten_while_open_fails_the_read_on_the_c_path(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The mount, end to end: bytes of a source changed under an open view are never
    served; the read fails (EIO) through the Python path the C path handed it to."""
    d = daemon_factory()
    src = d.add(sample_file("CT_small.dcm"), "in/CT_small.dcm")
    rel, want = d.expected(src)
    service = Service(load_config(d.config_path))
    try:
        service.start()
        wait_for((d.folder / rel).exists)
        fast = service.ops.fast
        assert fast is not None
        fd = os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 4096, 0) == want[:4096]
            st0 = os.stat(src)
            data = bytearray(src.read_bytes())
            data[-100:] = bytes(100)
            with open(src, "r+b") as f:
                f.write(data)
            os.utime(src, ns=(st0.st_atime_ns, st0.st_mtime_ns))
            fallbacks = fast.counters().fallbacks
            with pytest.raises(OSError, match="Input/output error") as err:
                os.pread(fd, 1 << 20, 0)
            assert err.value.errno == errno.EIO
            assert fast.counters().fallbacks > fallbacks
        finally:
            os.close(fd)
    finally:
        service.stop()


def _c_opened(
    daemon_factory: Callable[..., Daemon],
) -> Iterator[tuple[Daemon, Service, Path, str, bytes]]:
    d = daemon_factory()
    src = d.add(sample_file("CT_small.dcm"), "in/CT_small.dcm")
    rel, want = d.expected(src)
    service = Service(load_config(d.config_path))
    try:
        service.start()
        wait_for((d.folder / rel).exists)
        # Opened by Python once, through the page cache: later opens are C's.
        assert (d.folder / rel).read_bytes() == want
        yield d, service, src, rel, want
    finally:
        service.stop()


c_opened = pytest.fixture(_c_opened)


def test_later_opens_are_answered_in_c_with_the_same_bytes(
    c_opened: tuple[Daemon, Service, Path, str, bytes],
) -> None:
    d, service, _src, rel, want = c_opened
    fast = service.ops.fast
    assert fast is not None
    opens, python_opens = fast.counters().opens, service.fs.opens
    baseline = _fds()
    for _ in range(50):
        assert (d.folder / rel).read_bytes() == want
    fd = os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT)  # every read through the mount
    try:
        assert [os.pread(fd, 4096, at) for at in range(0, len(want), 4096)] == [
            want[at : at + 4096] for at in range(0, len(want), 4096)
        ]
        assert service.status().open_files == 1
    finally:
        os.close(fd)
    assert fast.counters().opens >= opens + 51
    assert service.fs.opens == python_opens  # no open entered Python
    wait_for(lambda: service.status().open_files == 0)
    assert _fds() <= baseline


def _read_or_none(path: Path) -> bytes | None:
    """The bytes of a view, or None while it is withheld (its source not indexed again yet)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_a_c_handle_fails_once_a_newer_version_is_served_at_its_path(
    c_opened: tuple[Daemon, Service, Path, str, bytes],
) -> None:
    """The tree's change takes the template off and Python adopts the open handle: its
    reads fail (EIO), and the new version's opens bypass the page cache while it is open."""
    d, service, src, rel, want = c_opened
    fast = service.ops.fast
    assert fast is not None
    opens = fast.counters().opens
    fd = os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT)
    try:
        assert fast.counters().opens == opens + 1
        assert os.pread(fd, 4096, 0) == want[:4096]
        data = bytearray(src.read_bytes())
        data[20_000] ^= 0xFF  # a pixel
        tmp = src.with_name("new.part")
        tmp.write_bytes(data)
        os.replace(tmp, src)
        rel2, want2 = d.expected(src)
        assert (rel2, want2 != want) == (rel, True)
        wait_for(lambda: _read_or_none(d.folder / rel) == want2, timeout=15)
        with pytest.raises(OSError, match="Input/output error") as err:
            os.pread(fd, 4096, 0)
        assert err.value.errno == errno.EIO
        assert service.fs.direct_opens >= 1
    finally:
        os.close(fd)


def test_a_c_handle_keeps_the_bytes_it_opened_when_its_source_is_deleted(
    c_opened: tuple[Daemon, Service, Path, str, bytes],
) -> None:
    d, service, src, rel, want = c_opened
    fast = service.ops.fast
    assert fast is not None
    opens = fast.counters().opens
    fd = os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT)
    try:
        assert fast.counters().opens == opens + 1
        assert os.pread(fd, 4096, 0) == want[:4096]
        src.unlink()
        wait_for(lambda: not (d.folder / rel).exists(), timeout=15)
        assert os.pread(fd, len(want) + 10, 0) == want
    finally:
        os.close(fd)


def test_stopping_closes_the_sources_of_c_handles_still_open(
    daemon_factory: Callable[..., Daemon],
) -> None:
    gen = _c_opened(daemon_factory)
    d, service, src, rel, _want = next(gen)
    fast = service.ops.fast
    assert fast is not None
    fd = os.open(d.folder / rel, os.O_RDONLY)
    assert fast.c_open() == 1

    def holding() -> bool:
        return any(
            os.readlink(f"/proc/self/fd/{n}") == str(src)
            for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")
        )

    assert holding()
    try:
        with pytest.raises(StopIteration):
            next(gen)  # stops the daemon, the reader's descriptor still open
        assert not holding()
        assert fast.c_open() == 0
    finally:
        os.close(fd)
