"""The mount's core without FUSE: the view tree, open/read/release, and the translation layer."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest

from conftest import sample_file
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound, Refused
from deidfs.mount.ops import DeidOperations
from deidfs.view.handles import CACHE_ENTRY_OVERHEAD, HeaderCache, ViewFS
from deidfs.view.render import (
    Layout,
    SourceStat,
    View,
    read_view,
    read_view_into,
    render_path,
    write_view,
)
from deidfs.view.tree import (
    DIR_MODE,
    FILE_MODE,
    PSEUDO_EPOCH_NS,
    FolderView,
    ViewFile,
    ViewTree,
    pseudo_mtime_ns,
)

KEY = b"view-tree-test-key-0123456789ab"
PSEUDO = Pseudonymizer(KEY)
PLAN = compile_plan(BASIC)


def _folder(root: Path, fid: str = "ct", digest: str = "dg") -> FolderView:
    return FolderView(fid, root, PLAN, PSEUDO, Layout.DICOM, digest)


def _vf(source: str, relpath: str, size: int = 10, folder: str = "ct") -> ViewFile:
    state = SourceStat(1, abs(hash(source)) % 10**6, size, 5, 5)
    return ViewFile(
        folder, source, state, "dg", relpath, size, pseudo_mtime_ns(PSEUDO, state, "dg")
    )


def test_tree_builds_and_prunes_directories() -> None:
    tree = ViewTree()
    tree.set_folder(_folder(Path("/src")))
    changed: list[str] = []
    tree.invalidator = changed.extend
    tree.put(_vf("/src/a", "P1/S1/E1/a.dcm"))
    tree.put(_vf("/src/b", "P1/S1/E2/b.dcm", size=20))
    assert tree.listdir("/") == [("ct", DIR_MODE)]
    assert tree.listdir("/ct") == [("P1", DIR_MODE)]
    assert sorted(tree.listdir("/ct/P1/S1") or []) == [("E1", DIR_MODE), ("E2", DIR_MODE)]
    assert tree.listdir("/ct/P1/S1/E1") == [("a.dcm", FILE_MODE)]
    assert tree.file("/ct/P1/S1/E1/a.dcm") is not None
    assert tree.listdir("/ct/P1/S1/E1/a.dcm") is None
    assert tree.counts("ct").visible == 2
    assert tree.counts("ct").bytes == 30
    changed.clear()
    assert tree.remove("ct", "/src/a")
    assert tree.file("/ct/P1/S1/E1/a.dcm") is None
    assert not tree.is_dir("/ct/P1/S1/E1")  # emptied directories go
    assert tree.is_dir("/ct/P1/S1")
    assert "/ct/P1/S1/E1/a.dcm" in changed
    assert "/ct/P1/S1/E1" in changed
    assert tree.remove("ct", "/src/b")
    assert tree.listdir("/ct") == []  # the folder itself stays
    assert tree.counts("ct").visible == 0
    assert not tree.remove("ct", "/src/b")


def test_duplicates_are_served_deterministically() -> None:
    for order in (("/src/z", "/src/a"), ("/src/a", "/src/z")):
        tree = ViewTree()
        tree.set_folder(_folder(Path("/src")))
        for source in order:
            tree.put(_vf(source, "P/S/E/same.dcm"))
        served = tree.file("/ct/P/S/E/same.dcm")
        assert served is not None
        assert served.source == "/src/a"
        assert tree.counts("ct").duplicates == 1
        assert tree.counts("ct").visible == 1
        tree.remove("ct", "/src/a")
        served = tree.file("/ct/P/S/E/same.dcm")
        assert served is not None
        assert served.source == "/src/z"
        assert tree.counts("ct").duplicates == 0


def test_replacing_a_view_moves_it_and_ignores_unknown_folders() -> None:
    tree = ViewTree()
    tree.set_folder(_folder(Path("/src")))
    tree.put(_vf("/src/a", "P/S/E/old.dcm"))
    tree.put(_vf("/src/a", "P/S/E/new.dcm"))
    assert tree.file("/ct/P/S/E/old.dcm") is None
    assert tree.file("/ct/P/S/E/new.dcm") is not None
    assert tree.counts("ct").visible == 1
    tree.put(_vf("/elsewhere/x", "P/x.dcm", folder="gone"))
    assert not tree.is_dir("/gone")
    tree.drop_folder("ct")
    assert tree.listdir("/") == []
    assert tree.by_source("ct", "/src/a") is None


def test_header_cache_is_bounded() -> None:
    def view(n: int) -> View:
        return View(
            b"h" * 1000, 0, 0, b"", PurePosixPath(f"{n}.dcm"), None, SourceStat(0, n, 0, 0, 0)
        )  # type: ignore[arg-type]

    bound = 3 * (1000 + CACHE_ENTRY_OVERHEAD) + 500
    cache = HeaderCache(max_bytes=bound)
    for n in range(10):
        cache.put((str(n), SourceStat(0, n, 0, 0, 0), "d"), view(n))
    assert cache.size_bytes <= bound
    assert len(cache) == 3
    assert cache.get(("9", SourceStat(0, 9, 0, 0, 0), "d")) is not None
    assert cache.get(("0", SourceStat(0, 0, 0, 0, 0), "d")) is None


def test_pseudo_times_are_keyed_and_move_with_the_source() -> None:
    st = SourceStat(1, 2, 3, 1_700_000_000_000_000_000, 1_700_000_000_000_000_000)
    t = pseudo_mtime_ns(PSEUDO, st, "dg")
    assert PSEUDO_EPOCH_NS <= t < PSEUDO_EPOCH_NS + 366 * 86400 * 10**9
    assert t != st.mtime_ns
    assert pseudo_mtime_ns(PSEUDO, SourceStat(1, 2, 3, st.mtime_ns + 1, st.ctime_ns), "dg") != t
    assert pseudo_mtime_ns(Pseudonymizer(b"another-key-0123456789abcdef"), st, "dg") != t


# -- ViewFS over real files ---------------------------------------------------------------


class _Indexed:
    """A folder with one rendered source, as the service would set it up."""

    def __init__(self, root: Path, name: str = "CT_small.dcm") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.source = root / "src.dcm"
        shutil.copyfile(sample_file(name), self.source)
        self.tree = ViewTree()
        self.folder = _folder(root)
        self.tree.set_folder(self.folder)
        self.stale: list[tuple[str, str]] = []
        self.fs = ViewFS(self.tree, 1 << 20, on_stale=lambda f, s: self.stale.append((f, s)))
        self.index()

    def index(self) -> ViewFile:
        view = render_path(self.source, PLAN, PSEUDO, Layout.DICOM)
        self.view = view
        vf = ViewFile(
            "ct",
            str(self.source),
            view.source,
            "dg",
            str(view.relpath),
            view.size,
            pseudo_mtime_ns(PSEUDO, view.source, "dg"),
        )
        self.tree.put(vf)
        self.path = vf.mount_path
        return vf

    def expected(self) -> bytes:
        fd = os.open(self.source, os.O_RDONLY)
        out = self.source.with_suffix(".out")
        try:
            with open(out, "wb") as f:
                write_view(self.view, fd, f)
        finally:
            os.close(fd)
        return out.read_bytes()

    def read_all(self, fh: int, chunk: int = 4093) -> bytes:
        parts, at = [], 0
        while True:
            data = self.fs.read(fh, at, chunk)
            if not data:
                return b"".join(parts)
            parts.append(data)
            at += len(data)


def test_open_read_release_serves_the_view_bytes(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    expected = ix.expected()
    opened = ix.fs.open(ix.path)
    assert not opened.direct_io
    assert ix.read_all(opened.fh) == expected
    assert ix.fs.read(opened.fh, len(expected) + 10, 100) == b""
    ix.fs.release(opened.fh)
    assert ix.fs.open_handles == 0
    with pytest.raises(NotFound):
        ix.fs.read(opened.fh, 0, 10)
    with pytest.raises(NotFound):
        ix.fs.open("/ct/nothing.dcm")


def test_open_refuses_a_source_changed_since_indexing(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    with open(ix.source, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(Refused):
        ix.fs.open(ix.path)
    assert ix.stale == [("ct", str(ix.source))]
    assert ix.fs.open_handles == 0


def test_read_fails_when_the_source_changes_under_an_open_handle(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    opened = ix.fs.open(ix.path)
    header = ix.fs.read(opened.fh, 0, 100)
    assert header
    with open(ix.source, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 100)
    with pytest.raises(Refused):
        ix.fs.read(opened.fh, ix.view.size - 200, 200)
    with pytest.raises(Refused):  # and it stays failed: never a mix
        ix.fs.read(opened.fh, 0, 100)
    ix.fs.release(opened.fh)


def test_an_open_handle_of_an_older_version_fails_and_new_opens_bypass_the_cache(
    tmp_path: Path,
) -> None:
    ix = _Indexed(tmp_path)
    old = ix.fs.open(ix.path)
    # Replace the source by rename: the old handle's file is intact, but no longer served.
    tmp = tmp_path / "new.tmp"
    shutil.copyfile(sample_file("CT_small.dcm"), tmp)
    with open(tmp, "ab") as f:
        f.write(b"")
    os.replace(tmp, ix.source)
    ix.index()
    with pytest.raises(Refused):
        ix.fs.read(old.fh, 0, 10)
    new = ix.fs.open(ix.path)
    assert new.direct_io  # an older version is still open on this path
    assert ix.read_all(new.fh) == ix.expected()
    ix.fs.release(old.fh)
    ix.fs.release(new.fh)
    again = ix.fs.open(ix.path)
    assert not again.direct_io
    ix.fs.release(again.fh)


def test_a_handle_survives_replacing_the_folder_settings(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    opened = ix.fs.open(ix.path)
    ix.tree.set_folder(_folder(tmp_path))  # a reload that leaves the folder's views alone
    assert ix.read_all(opened.fh) == ix.expected()
    ix.fs.release(opened.fh)


def test_open_renders_into_the_cache_only_once(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    for _ in range(3):
        ix.fs.release(ix.fs.open(ix.path).fh)
    assert ix.fs.cache.misses == 1
    assert ix.fs.cache.hits == 2


# -- the translation layer ---------------------------------------------------------------


def test_operations_translate(tmp_path: Path) -> None:
    ix = _Indexed(tmp_path)
    ops = DeidOperations(ix.fs, uid=0, gid=0)
    attrs = ops.getattr(ix.path)
    assert attrs["st_size"] == ix.view.size
    assert attrs["st_mode"] == stat.S_IFREG | 0o444
    assert attrs["st_mtime"] == attrs["st_ctime"] == attrs["st_atime"]
    assert attrs["st_mtime"] != ix.source.stat().st_mtime_ns
    assert ops.getattr("/ct")["st_mode"] == stat.S_IFDIR | 0o555
    with pytest.raises(OSError, match="no such view") as info:
        ops.getattr("/ct/none")
    assert info.value.errno == errno.ENOENT
    names = ops.readdir("/ct", 0)
    assert names[:2] == [".", ".."]
    with pytest.raises(OSError, match="/ct/missing"):
        ops.readdir("/ct/missing", 0)
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, direct_io=0)
    assert ops.open(ix.path, fi) == 0
    assert ops.read(ix.path, 132, 0, fi)[128:132] == b"DICM"
    assert ops.release(ix.path, fi) == 0
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError, match="read-only"):
            ops.open(ix.path, SimpleNamespace(flags=flags, fh=0, direct_io=0))
    for call in (
        lambda: ops.create("/ct/x", 0o644),
        lambda: ops.write(ix.path, b"x", 0, 1),
        lambda: ops.unlink(ix.path),
        lambda: ops.chmod(ix.path, 0o644),
        lambda: ops.rename(ix.path, "/ct/y"),
        lambda: ops.mkdir("/ct/d", 0o755),
        lambda: ops.truncate(ix.path, 0),
        lambda: ops.utimens(ix.path),
        lambda: ops.access(ix.path, os.W_OK),
    ):
        with pytest.raises(OSError, match="read-only") as info:
            call()
        assert info.value.errno == errno.EROFS
    fs = ops.statfs("/")
    assert fs["f_blocks"] * fs["f_frsize"] >= ix.view.size
    assert fs["f_bavail"] == 0


@pytest.mark.parametrize("kind", ["native", "zeroed", "pixels", "trailer"])
def test_read_view_into_writes_what_read_view_returns(tmp_path: Path, kind: str) -> None:
    """The read_buf path's bytes (read into a buffer) are read_view's, at every cut."""
    source = tmp_path / "src.bin"
    body = bytes(range(256)) * 40  # 10,240 bytes of "source"
    source.write_bytes(body)
    fd = os.open(source, os.O_RDONLY)
    try:
        pixel_offset, pixel_length = 1000, 6000
        zeroed = ((0, 5), (700, 1300), (5990, 6000)) if kind == "zeroed" else ()
        pixels = b"P" * 777 if kind == "pixels" else b""
        trailer = b"T" * 333 if kind in ("trailer", "zeroed") else b""
        view = View(
            b"H" * 300,
            pixel_offset,
            0 if pixels else pixel_length,
            trailer,
            PurePosixPath("x.dcm"),
            None,  # type: ignore[arg-type]
            SourceStat.of(os.fstat(fd)),
            zeroed=zeroed,
            pixels=pixels,
        )
        whole = read_view(view, fd, 0, view.size)
        assert len(whole) == view.size
        if zeroed:
            assert whole[300 + 700 : 300 + 1300] == bytes(600)
            assert whole[300 + 1300 : 300 + 1301] != b"\0"
        cuts = sorted({0, 1, 299, 300, 301, 1000, 1299, 1300, 1301, 6299, 6300, 6301, 6600})
        for at in [c for c in cuts if c <= view.size]:
            for n in (0, 1, 2, 299, 1000, 4096, 9999):
                buf = bytearray(b"\xee" * n)
                got = read_view_into(view, fd, at, memoryview(buf))
                want = read_view(view, fd, at, n)
                assert got == len(want)
                assert bytes(buf[:got]) == want, (at, n)
                assert buf[got:] == b"\xee" * (n - got)  # nothing written past the view
        os.truncate(source, pixel_offset + 10)  # the source shrank: refused, as read_view
        if view.pixel_length:
            with pytest.raises(Refused):
                read_view_into(view, fd, 0, memoryview(bytearray(view.size)))
    finally:
        os.close(fd)
