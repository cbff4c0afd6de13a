"""An open view holds its source: deleted or renamed away under a reader, it reads on.

A view opened through the mount keeps its source's descriptor from open to release, so a
reader that started on a source's bytes finishes with exactly those bytes when the source
is unlinked, renamed away or replaced by a rename in the middle of the read. Once a newer
version of the same instance is served at the view's path, the old handle fails with EIO
(never bytes of two versions). The descriptors are the daemon's: each is closed on release
and at unmount, and a daemon out of descriptors refuses an open with ENFILE and serves on.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import dcmread

from conftest import Daemon, mounted_type, run_cli, sample_file, wait_for
from deidfs.config.model import Config, DaemonConfig, FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.mount.ops import DeidOperations
from deidfs.service.core import Service
from deidfs.view.handles import ViewFS
from deidfs.view.model import View
from deidfs.view.render import Layout, render_path
from deidfs.view.tree import FolderView, ViewFile, ViewTree

pytestmark = pytest.mark.fuse

#: Pixel bytes of the large source: well past the kernel's read-ahead (1 MiB), so the rest
#: of a read really reaches the daemon after the source is gone.
LARGE_ROWS = 1024
LARGE_COLUMNS = 2048
#: UID root of the instances made here.
UID_ROOT = "1.2.826.0.1.3680043.10.997"
#: The descriptor limit the daemon runs under in the exhaustion test.
LOW_NOFILE = 256


def _instance(dest: Path, n: int, version: int = 0, large: bool = False) -> Path:
    """CT instance ``n`` (its own view path) in ``version`` (its own bytes)."""
    ds = dcmread(sample_file("CT_small.dcm"))
    ds.SOPInstanceUID = f"{UID_ROOT}.{n + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    rng = random.Random(n * 1000 + version)  # noqa: S311 (test data, not a secret)
    if large:
        ds.Rows = LARGE_ROWS
        ds.Columns = LARGE_COLUMNS
        ds.PixelData = rng.randbytes(LARGE_ROWS * LARGE_COLUMNS * 2)
    else:
        ds.PixelData = rng.randbytes(len(ds.PixelData))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return dest


def _served(d: Daemon, src: Path) -> tuple[Path, bytes]:
    """The view of ``src`` once served, and the bytes a read of it gives before any change."""
    rel, want = d.expected(src)
    view = d.folder / rel
    wait_for(view.exists)
    wait_for(lambda: _content(view) == want)
    return view, want


def _content(view: Path) -> bytes | None:
    """The bytes of ``view``, None while it cannot be read (EIO while it is replaced)."""
    try:
        return view.read_bytes()
    except OSError:
        return None


def _read_across(view: Path, change: Callable[[], None], settled: Callable[[], object]) -> bytes:
    """Read part of ``view``, ``change`` its source, wait until ``settled``, read the rest."""
    with open(view, "rb", buffering=0) as f:
        first = f.read(64 * 1024)
        change()
        wait_for(settled, timeout=15)
        rest = bytearray()
        while chunk := f.read(128 * 1024):
            rest += chunk
    return first + bytes(rest)


def _fds(pid: int) -> list[str]:
    """What every open descriptor of process ``pid`` refers to."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue  # closed while listed
    return found


def _held_sources(pid: int, *roots: Path) -> list[str]:
    """Descriptors of ``pid`` on files under ``roots`` (a deleted one ends in "(deleted)")."""
    return [t for t in _fds(pid) if any(t.startswith(f"{r}/") for r in roots)]


def _baseline(pid: int, *roots: Path) -> list[str]:
    """The descriptors of ``pid`` once it holds no source under ``roots``.

    A view's release reaches the daemon after close(2) has returned, so the sources of
    views just read may still be held for a moment.
    """
    wait_for(lambda: not _held_sources(pid, *roots))
    return sorted(_fds(pid))


def _wait_fds(pid: int, baseline: list[str], timeout: float = 20.0) -> None:
    """Wait until ``pid`` has exactly the descriptors of ``baseline`` open again."""
    deadline = time.monotonic() + timeout
    while (now := sorted(_fds(pid))) != baseline:
        if time.monotonic() > deadline:
            more = sorted((Counter(now) - Counter(baseline)).elements())
            fewer = sorted((Counter(baseline) - Counter(now)).elements())
            pytest.fail(f"descriptors opened: {more}; closed: {fewer}")
        time.sleep(0.05)


def _daemon_pid(d: Daemon) -> int:
    assert d.proc is not None
    return d.proc.pid


# -- a reader keeps the bytes it started with -------------------------------------------------


def test_a_source_deleted_mid_read_is_read_to_the_end(daemon: Daemon) -> None:
    src = _instance(daemon.root / "work" / "big.dcm", 0, large=True)
    src = daemon.add(src, "big.dcm")
    view, want = _served(daemon, src)
    assert len(want) > 4 << 20

    data = _read_across(view, src.unlink, lambda: not view.exists())
    assert data == want
    # The view itself is gone for everyone else, and its descriptor with the reader.
    with pytest.raises(FileNotFoundError):
        view.open("rb")
    wait_for(lambda: not _held_sources(_daemon_pid(daemon), daemon.incoming))
    assert "ERROR" not in daemon.log()


def test_a_source_renamed_out_of_its_folder_mid_read_is_read_to_the_end(daemon: Daemon) -> None:
    """A rename moves the source's ctime while its link count stays: its view goes, the
    reader's bytes stay those of the file it opened."""
    work = daemon.root / "work"
    src = daemon.add(_instance(work / "big.dcm", 1, large=True), "big.dcm")
    view, want = _served(daemon, src)
    before = src.stat()

    data = _read_across(view, lambda: os.rename(src, work / "moved.dcm"), lambda: not view.exists())
    moved = (work / "moved.dcm").stat()
    assert moved.st_ino == before.st_ino
    assert moved.st_ctime_ns != before.st_ctime_ns
    assert data == want


def test_a_source_replaced_by_rename_mid_read_keeps_the_old_bytes(daemon: Daemon) -> None:
    """Another instance renamed over the source: the old inode (unlinked) is read to its end
    through the held descriptor, while the new instance is served at its own path. A newer
    version of the *same* instance (same view path) fails the old handle with EIO instead:
    the kernel's size and pages of that path follow the new version."""
    work = daemon.root / "work"
    src = daemon.add(_instance(work / "a.dcm", 2, large=True), "a.dcm")
    view, want = _served(daemon, src)
    other = _instance(work / "other.dcm", 3)
    new_rel, new_want = daemon.expected(other)
    assert daemon.folder / new_rel != view

    data = _read_across(view, lambda: daemon.add(other, "a.dcm"), lambda: not view.exists())
    assert data == want
    assert (daemon.folder / new_rel).read_bytes() == new_want

    # The same instance again, in a new version, renamed over its source.
    src = daemon.add(_instance(work / "b.dcm", 4, large=True), "b.dcm")
    view, want = _served(daemon, src)
    newer = _instance(work / "b2.dcm", 4, version=1, large=True)
    _, newer_want = daemon.expected(newer)
    with open(view, "rb", buffering=0) as f:
        first = f.read(64 * 1024)
        daemon.add(newer, "b.dcm")
        wait_for(lambda: _content(view) == newer_want, timeout=15)
        outcome: bytes | int
        try:
            outcome = first + f.read()
        except OSError as exc:
            outcome = exc.errno or 0
    assert outcome in (want, errno.EIO)
    assert view.read_bytes() == newer_want


# -- descriptors ------------------------------------------------------------------------------


def test_the_daemons_descriptors_return_to_baseline_after_many_opens(daemon: Daemon) -> None:
    work = daemon.root / "work"
    pid = _daemon_pid(daemon)
    sources = [daemon.add(_instance(work / f"{n}.dcm", n), f"{n}.dcm") for n in range(12)]
    served = [_served(daemon, s) for s in sources]
    # Once through every path the daemon takes below (a deletion, a replacement) first,
    # so that what it opens for good (index connections) is in the baseline.
    sources[-1].unlink()
    wait_for(lambda: not served[-1][0].exists())
    daemon.add(_instance(work / "10-v1.dcm", 10, version=1), "10.dcm")
    wait_for(lambda: _content(served[10][0]) not in (None, served[10][1]))
    baseline = _baseline(pid, daemon.incoming)

    for i in range(300):
        view, want = served[i % 10]
        with open(view, "rb") as f:
            assert f.read(1000) == want[:1000]
        if i == 150:
            # In the middle, with the cycles so far released.
            wait_for(lambda: not _held_sources(pid, daemon.incoming))
    # Handles held across the deletion of their sources, read to the end, then released.
    held = [(open(view, "rb"), want) for view, want in served[:8]]  # noqa: SIM115
    try:
        for f, want in held:
            assert f.read(1000) == want[:1000]
        wait_for(lambda: len(_held_sources(pid, daemon.incoming)) == 8)
        for s in sources[:8]:
            s.unlink()
        wait_for(lambda: not any(view.exists() for view, _ in served[:8]))
        assert len(_held_sources(pid, daemon.incoming)) == 8  # unlinked, still held
        for f, want in held:
            assert want[:1000] + f.read() == want
    finally:
        for f, _ in held:
            f.close()
    # Release reaches the daemon after close(2) returns: wait for it.
    wait_for(lambda: not _held_sources(pid, daemon.incoming))
    _wait_fds(pid, baseline)


def test_an_open_past_the_descriptor_limit_fails_and_the_daemon_serves_on(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(command_prefix=("prlimit", f"--nofile={LOW_NOFILE}:{LOW_NOFILE}"))
    d.start()
    pid = _daemon_pid(d)
    work = d.root / "work"
    view, want = _served(d, d.add(_instance(work / "a.dcm", 0), "a.dcm"))
    baseline = _baseline(pid, d.incoming)

    held = []
    refused: OSError | None = None
    try:
        for _ in range(LOW_NOFILE + 8):
            try:
                held.append(open(view, "rb"))  # noqa: SIM115 (closed below)
            except OSError as exc:
                refused = exc
                break
        assert refused is not None, "every open succeeded past the descriptor limit"
        assert refused.errno == errno.ENFILE
        assert 0 < len(held) <= LOW_NOFILE - 64  # the reserve is kept free
        # The daemon is short of nothing else: it answers, indexes a new file and serves
        # the handles it has.
        os.statvfs(d.mnt)
        other = d.add(_instance(work / "b.dcm", 1), "b.dcm")
        other_rel, other_want = d.expected(other)
        wait_for((d.folder / other_rel).exists)
        assert held[0].read() == want
        assert held[-1].read() == want
        done = run_cli(["status", "--json", "--config", str(d.config_path)], d.root, "status")
        assert done.returncode == 0, done.stderr
        fuse = json.loads(done.stdout)["fuse"]
        assert fuse["open_files"] == len(held)
        assert fuse["open_limit"] == LOW_NOFILE - 64
        assert fuse["refused_opens"] >= 1
        done = run_cli(["status", "--config", str(d.config_path)], d.root, "status-text")
        assert "open(s) refused: out of file descriptors" in done.stdout
    finally:
        for f in held:
            f.close()
    wait_for(lambda: not _held_sources(pid, d.incoming))
    assert view.read_bytes() == want
    assert (d.folder / other_rel).read_bytes() == other_want
    _wait_fds(pid, baseline)
    assert d.proc is not None
    assert d.proc.poll() is None
    log = d.log()
    assert "out of file descriptors" in log
    assert "ERROR" not in log
    assert "Traceback" not in log


def _one_view(tmp_path: Path) -> tuple[Path, View, ViewFile, ViewTree]:
    """One CT source indexed under Basic in a tree of its own (no mount): the source, its
    view, the tree's entry for it and the tree."""
    source = _instance(tmp_path / "src" / "a.dcm", 0)
    pseudo = Pseudonymizer(b"held-source-test-key-0123456789x")
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    tree = ViewTree()
    tree.set_folder(FolderView("ct", source.parent, plan, pseudo, Layout.DICOM, "dg"))
    view = render_path(source, plan, pseudo)
    vf = ViewFile("ct", str(source), view.source, "dg", str(view.relpath), view.size, 1)
    tree.put(vf)
    return source, view, vf, tree


def test_an_open_that_meets_emfile_fails_without_withholding_the_source(tmp_path: Path) -> None:
    """The real limit, met below the handle bound: ENFILE to the reader, and the source is
    not reported stale (indexing it again would only fail the same way)."""
    _source, _view, vf, tree = _one_view(tmp_path)
    stale: list[tuple[str, str]] = []
    # The handle bound is taken from the limit now, before it is lowered below.
    fs = ViewFS(tree, 1 << 20, on_stale=lambda f, s: stale.append((f, s)))
    ops = DeidOperations(fs)
    handles = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    refused: OSError | None = None
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    try:
        for _ in range(highest + 64):
            fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, direct_io=0)
            try:
                ops.open(vf.mount_path, fi)
            except OSError as exc:
                refused = exc
                break
            handles.append(fi)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert refused is not None
    assert refused.errno == errno.ENFILE
    assert handles
    assert stale == []
    assert fs.exhausted == 1
    for fi in handles:
        ops.release(vf.mount_path, fi)
    assert fs.open_handles == 0
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, direct_io=0)
    ops.open(vf.mount_path, fi)
    assert ops.read(vf.mount_path, 132, 0, fi)[128:132] == b"DICM"
    ops.release(vf.mount_path, fi)


def _returns_within(call: Callable[[], object], fifo: Path, seconds: float = 5.0) -> object:
    """What ``call()`` returns or raises, asserting it does so within ``seconds``: an open
    that waits on ``fifo`` for a writer is freed by one after the failed assertion."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck open return
        thread.join(seconds)
        pytest.fail(f"the open waited on the FIFO for more than {seconds} s")
    return outcome[0]


def test_a_source_replaced_by_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO renamed over an indexed source, opened before the watcher has taken its view
    away: the open must not wait for a writer (the FUSE thread would be held forever); it
    is refused as a changed source, and the view serves again once the file is back."""
    source, view, vf, tree = _one_view(tmp_path)
    stale: list[tuple[str, str]] = []
    fs = ViewFS(tree, 1 << 20, on_stale=lambda f, s: stale.append((f, s)))
    ops = DeidOperations(fs)
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0, direct_io=0)
    ops.open(vf.mount_path, fi)
    want = ops.read(vf.mount_path, view.size, 0, fi)
    ops.release(vf.mount_path, fi)
    assert want[128:132] == b"DICM"
    kept = tmp_path / "kept.dcm"
    os.rename(source, kept)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.rename(fifo, source)
    outcome = _returns_within(lambda: ops.open(vf.mount_path, fi), source)
    assert isinstance(outcome, OSError)
    assert outcome.errno == errno.EIO
    assert fs.open_handles == 0
    assert [path for _, path in stale] == [str(source)]  # to be indexed again
    os.replace(kept, source)
    ops.open(vf.mount_path, fi)
    assert ops.read(vf.mount_path, view.size, 0, fi) == want
    ops.release(vf.mount_path, fi)


def test_unmount_closes_the_sources_held_by_open_views(tmp_path: Path) -> None:
    """A reader still holding a view (of a deleted source) at shutdown: the daemon closes
    the source's descriptor anyway, and the held view then fails instead of reading."""
    incoming = tmp_path / "incoming"
    source = _instance(incoming / "a.dcm", 0, large=True)
    config = Config(
        daemon=DaemonConfig(
            mountpoint=tmp_path / "mnt",
            state_dir=tmp_path / "state",
            export_dir=tmp_path / "export",
            control_socket=tmp_path / "state" / "control.sock",
            metrics_address="",
            settle_seconds=0.2,
            reconcile_seconds=0,
            poll_seconds=0.5,
            workers=2,
            cache_mib=8,
        ),
        folders={"ct": FolderConfig(id="ct", path=incoming, profile="Basic")},
        profiles=dict(BUILTIN_PROFILES),
    )
    service = Service(config)
    pid = os.getpid()
    try:
        service.start()
        folder = tmp_path / "mnt" / "ct"
        wait_for(lambda: len(list(folder.rglob("*.dcm"))) == 1)
        (view,) = folder.rglob("*.dcm")
        want = view.read_bytes()
        f = open(view, "rb", buffering=0)  # noqa: SIM115 (closed below)
        try:
            first = f.read(64 * 1024)
            source.unlink()
            wait_for(lambda: not view.exists())
            assert first + f.read(1 << 20) == want[: len(first) + (1 << 20)]
            # The view read first was released in C: its descriptor is closed by the next
            # drain (within DRAIN_SECONDS), the held one's stays.
            wait_for(lambda: len(_held_sources(pid, incoming)) <= 1)
            assert len(_held_sources(pid, incoming)) == 1
            service.stop()
            assert _held_sources(pid, incoming) == []
            # Past what the kernel read ahead, the daemon is asked, and has no handle left.
            with pytest.raises(OSError, match="Bad file descriptor"):
                f.read()
        finally:
            f.close()
    finally:
        service.stop()
    wait_for(lambda: mounted_type(tmp_path / "mnt") is None)
