"""Integration tests on a real FUSE mount served by a real ``deidfs run`` subprocess."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import Daemon, mounted_type, sample_file, sha256, wait_for
from deidfs.config.load import load_config
from deidfs.mount import binding, fastread
from deidfs.service.core import Service
from leak_corpus import build_leak_dataset, expectation, find, value_texts, write_source

pytestmark = pytest.mark.fuse


def _index_rows(d: Daemon) -> list[tuple[str, str, str, int]]:
    """(path, status, reason, indexed_ns) of every row of the daemon's index."""
    with sqlite3.connect(d.state / "index.sqlite3") as conn:
        rows = conn.execute("SELECT path, status, reason, indexed_ns FROM sources").fetchall()
    return sorted((os.fsdecode(a), str(b), str(c), int(n)) for a, b, c, n in rows)


def test_copied_files_appear_with_exact_sizes_and_bytes(daemon: Daemon) -> None:
    sources = [daemon.add(sample_file(n), f"in/{n}") for n in ("CT_small.dcm", "MR_small.dcm")]
    sources.append(daemon.add(sample_file("rtplan.dcm"), "rtplan.dcm"))
    views = daemon.wait_views(3)
    expected = dict(map(daemon.expected, sources))
    served = {str(v.relative_to(daemon.folder)): v for v in views}
    assert set(served) == set(expected)
    for rel, view in served.items():
        # The size is right before any byte is read: stat first, then read.
        assert view.stat().st_size == len(expected[rel])
        assert view.read_bytes() == expected[rel]
        assert stat.S_IMODE(view.stat().st_mode) == 0o444
        # dicom layout: patient/study/series/instance.dcm, four components.
        assert len(Path(rel).parts) == 4
        assert rel.endswith(".dcm")
    for directory in (p for p in daemon.folder.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o555
    # Larger kernel read-ahead on the mount: 512 KiB-1 MiB read requests (fuse-perf notes).
    dev = daemon.mnt.stat().st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert bdi.read_text().strip() == "1024"


def test_partial_reads_match_at_every_boundary(daemon: Daemon) -> None:
    src = daemon.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = daemon.wait_views(1)
    _, expected = daemon.expected(src)
    fd = os.open(view, os.O_RDONLY)
    try:
        for offset, size in [(0, 1), (100, 4096), (1500, 300), (len(expected) - 10, 100)]:
            assert os.pread(fd, size, offset) == expected[offset : offset + size]
        assert os.pread(fd, 10, len(expected) + 5) == b""
    finally:
        os.close(fd)


@pytest.mark.external
def test_dcmdump_parses_every_served_file(daemon: Daemon) -> None:
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "rtdose.dcm")
    for n in names:
        daemon.add(sample_file(n), n)
    for view in daemon.wait_views(len(names)):
        done = subprocess.run(["dcmdump", "-q", str(view)], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert (
            b"(7fe0,0010)" in done.stdout or b"RT Plan" in done.stdout or b"RTPLAN" in done.stdout
        )


def test_unsafe_sources_never_appear(daemon: Daemon) -> None:
    (daemon.incoming / "notes.txt").write_text("not DICOM at all\n")
    truncated = sample_file("CT_small.dcm").read_bytes()[:20000]
    (daemon.incoming / "cut.dcm").write_bytes(truncated)
    daemon.add(sample_file("MR_truncated.dcm"), "mr_cut.dcm")
    daemon.add(sample_file("dicomdirtests/DICOMDIR"), "DICOMDIR")
    os.symlink(sample_file("MR_small.dcm"), daemon.incoming / "link.dcm")
    # A good file last: once it shows, the others have been handled too.
    good = daemon.add(sample_file("rtplan.dcm"), "zz_good.dcm")

    def all_handled() -> bool:
        return len(_index_rows(daemon)) >= 5 and len(daemon.views()) == 1

    wait_for(all_handled)
    time.sleep(0.5)
    (view,) = daemon.views()
    assert view.read_bytes() == daemon.expected(good)[1]
    reasons = {Path(p).name: (s, r) for p, s, r, _ in _index_rows(daemon)}
    assert reasons["notes.txt"] == ("refused", "not_dicom")
    assert reasons["cut.dcm"] == ("refused", "truncated")
    assert reasons["mr_cut.dcm"] == ("refused", "truncated")
    assert reasons["DICOMDIR"] == ("refused", "dicomdir")
    assert reasons["zz_good.dcm"] == ("ok", "")
    assert "link.dcm" not in {Path(p).name for p, s, _, _ in _index_rows(daemon) if s == "ok"}
    # Withheld files are logged by keyed token only, never by name.
    log = daemon.log()
    assert "withheld" in log
    for name in ("notes.txt", "cut.dcm", "mr_cut.dcm", "DICOMDIR"):
        assert name not in log


def test_deleting_a_source_removes_its_view(daemon: Daemon) -> None:
    a = daemon.add(sample_file("CT_small.dcm"), "a.dcm")
    daemon.add(sample_file("MR_small.dcm"), "b.dcm")
    views = daemon.wait_views(2)
    rel_a, _ = daemon.expected(a)
    view_a = daemon.folder / rel_a
    assert view_a in views
    assert view_a.stat().st_size > 0
    a.unlink()
    wait_for(lambda: not view_a.exists())
    assert len(daemon.views()) == 1
    with pytest.raises(FileNotFoundError):
        view_a.open("rb")
    # Its now-empty patient directory went with it.
    assert not (daemon.folder / Path(rel_a).parts[0]).exists()


def _variant(src: Path, dest: Path, name: str, pad: int) -> None:
    """Same instance (same view path), other kept header values and pixels, other size."""
    ds = dcmread(src)
    ds.WindowCenterWidthExplanation = (name + "x" * pad)[:64]
    pixels = bytearray(ds.PixelData)
    pixels[: len(name)] = name.encode()
    ds.PixelData = bytes(pixels)
    ds.save_as(dest, enforce_file_format=True)


def _content(view: Path) -> bytes | None:
    try:
        return view.read_bytes()
    except OSError:
        return None


def test_replacing_a_source_changes_the_view_never_mixing_bytes(daemon: Daemon) -> None:
    work = daemon.root / "variants"
    work.mkdir()
    v1, v2 = work / "v1.dcm", work / "v2.dcm"
    _variant(sample_file("CT_small.dcm"), v1, "ONE", 2)
    _variant(sample_file("CT_small.dcm"), v2, "TWO", 60)
    src = daemon.add(v1, "ct.dcm")
    (view,) = daemon.wait_views(1)
    rel, old = daemon.expected(v1)
    rel2, new = daemon.expected(v2)
    assert rel == rel2
    assert len(old) != len(new)
    assert view.read_bytes() == old

    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = view.read_bytes()
            except OSError as exc:
                # EIO while the source is being rewritten; ENOENT if a rewrite was caught
                # half-way and withheld (fail closed) until it settled.
                seen.append(errno.errorcode.get(exc.errno or 0, "?"))
                continue
            seen.append("old" if data == old else "new" if data == new else "MIXED")

    held = view.open("rb")  # a handle opened on the first version
    first_part = held.read(1000)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):
            # Overwrite in place (same inode), as `cp` onto an existing file does.
            with open(src, "r+b") as f:
                f.truncate(0)
                f.write(v2.read_bytes())
            time.sleep(0.3)
            with open(src, "r+b") as f:
                f.truncate(0)
                f.write(v1.read_bytes())
            time.sleep(0.3)
        with open(src, "r+b") as f:
            f.truncate(0)
            f.write(v2.read_bytes())
        wait_for(lambda: _content(view) == new)
    finally:
        stop.set()
        thread.join(10)
    assert set(seen) <= {"old", "new", "EIO", "ENOENT"}, set(seen)
    assert "new" in seen
    # The handle opened on the first version never returns bytes of another version:
    # either the rest of the first version or EIO.
    outcome: bytes | int
    try:
        outcome = first_part + held.read()
    except OSError as exc:
        outcome = exc.errno or 0
    finally:
        held.close()
    assert outcome in (old, errno.EIO)


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(daemon: Daemon) -> None:
    """``rsync --inplace -t`` or ``touch -r``: same inode, same size, mtime set back. Only
    ctime tells the versions apart; the mount must follow, not serve the old header with the
    new pixels."""
    work = daemon.root / "variants"
    work.mkdir()
    v1, v2 = work / "v1.dcm", work / "v2.dcm"
    _variant(sample_file("CT_small.dcm"), v1, "ONE", 10)
    _variant(sample_file("CT_small.dcm"), v2, "TWO", 10)
    assert v1.stat().st_size == v2.stat().st_size
    src = daemon.add(v1, "ct.dcm")
    (view,) = daemon.wait_views(1)
    _, old = daemon.expected(v1)
    _, new = daemon.expected(v2)
    assert old != new
    assert len(old) == len(new)
    assert view.read_bytes() == old
    before = src.stat()
    with open(src, "r+b") as f:
        f.write(v2.read_bytes())
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = src.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    wait_for(lambda: _content(view) == new)


def test_chmod_of_a_source_keeps_its_view(daemon: Daemon) -> None:
    """A chmod moves only ctime, which stat cannot tell from a rewrite that set mtime back:
    the source is indexed again, the view never disappears and never serves other bytes;
    a read in flight at that moment may get EIO (retried, it succeeds)."""
    src = daemon.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = daemon.wait_views(1)
    _, want = daemon.expected(src)
    assert view.read_bytes() == want
    src.chmod(0o600)
    outcomes: list[str] = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            outcomes.append("same" if view.read_bytes() == want else "OTHER")
        except OSError as exc:
            outcomes.append(errno.errorcode.get(exc.errno or 0, "?"))
        time.sleep(0.01)
    assert set(outcomes) <= {"same", "EIO"}, set(outcomes)
    assert outcomes.count("EIO") <= 2
    assert view.read_bytes() == want


def _open_for_writing(path: Path, mode: str) -> None:
    with open(path, mode) as f:
        f.write(b"x")


def test_writes_fail_with_erofs(daemon: Daemon) -> None:
    daemon.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = daemon.wait_views(1)
    attempts: list[Callable[[], object]] = [
        lambda: _open_for_writing(view, "r+b"),
        lambda: _open_for_writing(view, "ab"),
        lambda: os.open(view, os.O_WRONLY),
        lambda: _open_for_writing(view.parent / "new.dcm", "wb"),
        lambda: os.mkdir(view.parent / "newdir"),
        lambda: os.unlink(view),
        lambda: os.rmdir(view.parent),
        lambda: os.rename(view, view.parent / "renamed.dcm"),
        lambda: os.chmod(view, 0o644),
        lambda: os.chown(view, 1, 1),
        lambda: os.utime(view, (0, 0)),
        lambda: os.truncate(view, 0),
        lambda: os.symlink("x", view.parent / "link"),
        lambda: os.link(view, view.parent / "hard"),
        lambda: os.setxattr(view, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError, match="Read-only file system"):
            attempt()
    assert len(daemon.views()) == 1


def test_times_never_reveal_source_times(daemon: Daemon) -> None:
    sources = [daemon.add(sample_file(n), n) for n in ("CT_small.dcm", "MR_small.dcm")]
    daemon.wait_views(2)
    real: set[int] = set()
    for s in sources:
        st = s.stat()
        real |= {st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns}
    real_seconds = {t // 1_000_000_000 for t in real}
    for p in [daemon.mnt, *daemon.mnt.rglob("*")]:
        st = p.stat()
        for t in (st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns):
            assert t not in real
            assert t // 1_000_000_000 not in real_seconds
            assert time.gmtime(t // 1_000_000_000).tm_year == 2000
    # A changed source gets a new pseudo-time (so caches drop the old pages).
    (view,) = [v for v in daemon.views() if v.read_bytes() == daemon.expected(sources[0])[1]]
    before = view.stat().st_mtime_ns
    _variant(sample_file("CT_small.dcm"), daemon.root / "v.dcm", "CHANGED", 0)
    daemon.add(daemon.root / "v.dcm", "CT_small.dcm")
    wait_for(lambda: view.exists() and view.stat().st_mtime_ns != before)


def test_new_file_appears_promptly_even_after_a_failed_lookup(daemon: Daemon) -> None:
    daemon.add(sample_file("MR_small.dcm"), "warmup.dcm")
    daemon.wait_views(1)
    probe = daemon.root / "probe.dcm"
    probe.write_bytes(sample_file("CT_small.dcm").read_bytes())
    rel, _ = daemon.expected(probe)
    target = daemon.folder / rel
    assert not target.exists()  # the kernel may now cache this negative lookup
    start = time.monotonic()
    daemon.add(sample_file("CT_small.dcm"), "new.dcm")
    wait_for(target.exists, timeout=5.0, interval=0.01)
    elapsed = time.monotonic() - start
    print(f"copied file visible by stat after {elapsed:.2f} s")
    assert elapsed < 3.0


def test_killed_daemon_leaves_a_stale_mount_that_the_next_start_clears(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1)
    d.kill()
    with pytest.raises(OSError, match="Transport endpoint is not connected"):
        os.listdir(d.folder)  # not answered from the kernel's caches
    d.start()
    assert len(d.wait_views(1)) == 1
    assert "stale mount" in d.log()
    assert d.stop() == 0
    assert mounted_type(d.mnt) is None


def test_sigterm_unmounts_and_restart_reuses_the_index(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
    for n in names:
        d.add(sample_file(n), n)
    before_views = {v.relative_to(d.mnt): v.read_bytes() for v in d.wait_views(3)}
    assert d.stop() == 0
    assert mounted_type(d.mnt) is None
    rows = _index_rows(d)
    assert [s for _, s, _, _ in rows] == ["ok"] * 3
    d.start()
    # Served from the index at once: no waiting for the scan, nothing parsed again.
    assert {v.relative_to(d.mnt) for v in d.views()} == set(before_views)
    time.sleep(1.0)  # the initial scan has run meanwhile
    assert _index_rows(d) == rows
    assert "3 file(s) from the index" in d.log()
    assert {v.relative_to(d.mnt): v.read_bytes() for v in d.views()} == before_views
    # A file deleted while the daemon was stopped is gone after the restart.
    assert d.stop() == 0
    (d.incoming / "rtplan.dcm").unlink()
    d.start()
    d.wait_views(2)


def test_duplicates_serve_one_view(daemon: Daemon) -> None:
    daemon.add(sample_file("CT_small.dcm"), "a/ct.dcm")
    daemon.add(sample_file("CT_small.dcm"), "b/ct_copy.dcm")
    daemon.add(sample_file("MR_small.dcm"), "mr.dcm")
    wait_for(lambda: len(_index_rows(daemon)) == 3)
    views = daemon.wait_views(2)
    assert len(views) == 2
    # Deleting the served copy brings the other forward.
    (daemon.incoming / "a/ct.dcm").unlink()
    wait_for(lambda: len(_index_rows(daemon)) == 2)
    assert len(daemon.wait_views(2)) == 2


def test_originals_are_never_modified(daemon: Daemon) -> None:
    sources = [daemon.add(sample_file(n), f"s/{n}") for n in ("CT_small.dcm", "MR_small.dcm")]
    before = {s: (sha256(s), s.stat().st_mtime_ns, stat.S_IMODE(s.stat().st_mode)) for s in sources}
    for view in daemon.wait_views(2):
        view.read_bytes()
        with open(view, "rb") as f:
            f.seek(500)
            f.read(100)
    assert daemon.stop() == 0
    after = {s: (sha256(s), s.stat().st_mtime_ns, stat.S_IMODE(s.stat().st_mode)) for s in sources}
    assert after == before


# -- leak check -------------------------------------------------------------------------

MARKERS = {
    "PatientName": "ZQXNAME^LEAKY",
    "PatientID": "ZQXPID4711",
    "OtherPatientIDs": "ZQXOTHERID",
    "InstitutionName": "ZQXINSTITUTE",
    "InstitutionAddress": "ZQXSTREET 1",
    "ReferringPhysicianName": "ZQXREFDOC^HOUSE",
    "PerformingPhysicianName": "ZQXPERFDOC",
    "OperatorsName": "ZQXOPERATOR",
    "AccessionNumber": "ZQXACC123",
    "StudyID": "ZQXSTUDY",
    "StationName": "ZQXSTATION",
    "PatientAddress": "ZQXHOME ROAD",
    "StudyDescription": "ZQXSTUDYDESC",
}
DATE_MARKERS = {"PatientBirthDate": "19420817", "StudyDate": "19770405"}
UID_MARKER = "1.2.826.0.1.3680043.99999.4242"
PRIVATE_MARKER = "ZQXPRIVATE"
NESTED_MARKER = "ZQXNESTED"
NAME_MARKERS = ("ZQXDIRNAME", "ZQXFILENAME")


def _leaky(src: Path, dest: Path, n: int) -> None:
    ds = dcmread(src)
    for keyword, value in MARKERS.items():
        setattr(ds, keyword, value)
    for keyword, value in DATE_MARKERS.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = f"{UID_MARKER}.1"
    ds.SeriesInstanceUID = f"{UID_MARKER}.2"
    ds.SOPInstanceUID = f"{UID_MARKER}.3.{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.FrameOfReferenceUID = f"{UID_MARKER}.4"
    block = ds.private_block(0x0099, "ZQXCREATOR", create=True)
    block.add_new(0x01, "LO", PRIVATE_MARKER)
    other = Dataset()
    other.PatientID = f"{NESTED_MARKER}ID"
    other.IssuerOfPatientID = f"{NESTED_MARKER}ISSUER"
    ds.OtherPatientIDsSequence = Sequence([other])
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = f"{UID_MARKER}.5"
    ds.ReferencedImageSequence = Sequence([ref])  # kept, its UIDs replaced
    req = Dataset()
    req.RequestedProcedureID = f"{NESTED_MARKER}REQ"
    req.ScheduledProcedureStepID = f"{NESTED_MARKER}SPS"
    ds.RequestAttributesSequence = Sequence([req])
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)


def _all_markers() -> list[str]:
    return [
        *MARKERS.values(),
        *(v.split("^")[0] for v in MARKERS.values()),
        *DATE_MARKERS.values(),
        UID_MARKER,
        PRIVATE_MARKER,
        NESTED_MARKER,
        "ZQXCREATOR",
        *NAME_MARKERS,
    ]


def test_no_marker_leaks_into_any_name_or_byte(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(profile="Basic").start()
    work = d.root / "corpus"
    for n, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        _leaky(sample_file(name), work / f"{n}.dcm", n)
        original = (work / f"{n}.dcm").read_bytes()
        assert all(m.encode() in original for m in (PRIVATE_MARKER, NESTED_MARKER, UID_MARKER))
        d.add(work / f"{n}.dcm", f"{NAME_MARKERS[0]}_{n}/{NAME_MARKERS[1]}_{n}.dcm")
    views = d.wait_views(2)
    markers = _all_markers()
    for p in [d.mnt, *d.mnt.rglob("*")]:
        for m in markers:
            assert m not in str(p.relative_to(d.mnt)), (m, p)
        if p.is_file():
            data = p.read_bytes()
            for m in markers:
                assert m.encode() not in data, (m, p)
    for view in views:
        ds = dcmread(view)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.get("InstitutionName") in (None, "")
    d.stop()
    log = d.log()
    for m in markers:
        assert m not in log, m


def test_leak_corpus_markers_absent_from_the_mount(daemon_factory: Callable[..., Daemon]) -> None:
    """Every attribute of Table E.1-1, nested three deep, private blocks, file meta, name."""
    d = daemon_factory(profile="Basic").start()
    corpus = build_leak_dataset()
    write_source(d.root / "corpus", corpus.file_name, corpus.ds)
    d.add(d.root / "corpus" / corpus.file_name, f"MRK0_{corpus.file_name}")
    (view,) = d.wait_views(1)
    data = view.read_bytes()
    relpath = view.relative_to(d.mnt)
    values = value_texts(dcmread(view))
    config = d.config()
    options = config.profiles["Basic"].options
    leaked = [
        p
        for p in corpus.plants
        if expectation(p, options) == "absent" and find(p, data, values, relpath)
    ]
    assert leaked == []
    assert "MRK0" not in str(relpath)


def test_corrupt_index_is_rebuilt_at_start(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    d.state.mkdir(mode=0o700)
    (d.state / "index.sqlite3").write_bytes(b"garbage, not SQLite" * 200)
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.start()
    d.wait_views(1)
    assert any(".corrupt-" in p.name for p in d.state.iterdir())
    assert "moving it aside" in d.log()


def test_service_in_process_reports_status(tmp_path: Path) -> None:
    from deidfs.config.model import Config, DaemonConfig, FolderConfig
    from deidfs.deid.profiles import BUILTIN_PROFILES
    from deidfs.service.core import Service

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "notes.txt").write_text("no DICOM here")
    shutil.copyfile(sample_file("CT_small.dcm"), incoming / "a.dcm")
    shutil.copyfile(sample_file("CT_small.dcm"), incoming / "b.dcm")
    shutil.copyfile(sample_file("MR_small.dcm"), incoming / "c.dcm")
    config = Config(
        daemon=DaemonConfig(
            mountpoint=tmp_path / "mnt",
            state_dir=tmp_path / "state",
            export_dir=tmp_path / "export",
            control_socket=tmp_path / "state" / "control.sock",  # not a running daemon's
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
    try:
        service.start()
        assert service.status().mounted

        def settled() -> bool:
            s = service.status()
            return s.backlog == 0 and s.folders[0].visible + s.folders[0].duplicates == 3

        wait_for(settled)
        status = service.status()
        (folder,) = status.folders
        assert folder.id == "ct"
        assert folder.profile == "Basic"
        assert folder.visible == 2
        assert folder.duplicates == 1
        assert folder.refused == (("not_dicom", 1),)
        assert folder.watch in ("inotify", "poll")
        assert status.rendered == 4
        assert status.reused == 0
        assert status.libfuse.startswith("3.")
        assert len(list((tmp_path / "mnt" / "ct").rglob("*.dcm"))) == 2
        assert "2 file(s) served, 1 withheld" in service.status_line()
    finally:
        service.stop()
    assert mounted_type(tmp_path / "mnt") is None
    assert not service.status().mounted


def test_sighup_keeps_serving_and_sigint_stops_cleanly(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # systemd's ExecReload; must never kill the daemon
    wait_for(lambda: "reload requested" in d.log())
    assert d.proc.poll() is None
    assert len(d.views()) == 1
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(15) == 0
    assert mounted_type(d.mnt) is None


def test_names_that_are_not_utf8_are_served(daemon: Daemon) -> None:
    name = os.fsdecode(b"M\xfcller^Hans.dcm")  # Latin-1, as Windows shares write it
    daemon.add(sample_file("CT_small.dcm"), name)
    (view,) = daemon.wait_views(1)
    assert view.read_bytes() == daemon.expected(daemon.incoming / name)[1]
    assert "ller" not in str(view)


@pytest.mark.parametrize("layout", ["flat", "mirror"])
def test_other_layouts(daemon_factory: Callable[..., Daemon], layout: str) -> None:
    d = daemon_factory(layout=layout).start()
    src = d.add(sample_file("MR_small.dcm"), "series1/img1.dcm")
    (view,) = d.wait_views(1)
    rel, data = d.expected(src)
    if layout == "mirror":
        assert view == d.folder / "series1" / "img1.dcm"  # the admin asked for real names
    else:
        assert view.parent == d.folder
        assert view.name == rel
    assert view.read_bytes() == data


def test_a_folder_that_disappears_comes_back_without_reparsing(daemon: Daemon) -> None:
    daemon.add(sample_file("CT_small.dcm"), "ct.dcm")
    daemon.add(sample_file("MR_small.dcm"), "mr.dcm")
    before = {v.relative_to(daemon.mnt): v.read_bytes() for v in daemon.wait_views(2)}
    rows = _index_rows(daemon)
    away = daemon.root / "away"
    daemon.incoming.rename(away)  # the share went away
    daemon.wait_views(0)
    assert daemon.folder.is_dir()  # the folder's directory stays, empty
    away.rename(daemon.incoming)
    daemon.wait_views(2)
    assert {v.relative_to(daemon.mnt): v.read_bytes() for v in daemon.views()} == before
    assert _index_rows(daemon) == rows  # taken back from the index, not parsed again


def test_mount_serves_exactly_what_anonymize_writes(daemon: Daemon) -> None:
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")
    for n in names:
        daemon.add(sample_file(n), f"batch/{n}")
    served = {v.relative_to(daemon.folder): v.read_bytes() for v in daemon.wait_views(len(names))}
    out = daemon.root / "oneshot"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deidfs",
            "anonymize",
            "--config",
            str(daemon.config_path),
            "--profile",
            "Nominal",
            "--to",
            str(out),
            "-q",
            str(daemon.incoming / "batch"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    written = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    written = {k: v for k, v in written.items() if not str(k).startswith(".")}
    assert written == served


def _fuse_ops(port: int) -> dict[str, float]:
    """``deidfs_fuse_operations_total`` by op, scraped from the daemon."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "deidfs_fuse_operations_total":
                out[s.labels["op"]] = s.value
            elif s.name == "deidfs_files_visible":
                out["visible"] = s.value
    return out


def test_listings_carry_types_modes_and_inodes(daemon: Daemon) -> None:
    """readdir gives each entry's type and inode (as stat gives them), and with readdirplus
    its attributes: ``ls -lR`` of a fresh mount then needs no getattr per entry."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    daemon.stop()
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(
        text.replace('metrics_address = ""', f'metrics_address = "127.0.0.1:{port}"')
    )
    daemon.start()
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")
    for n in names:
        daemon.add(sample_file(n), f"in/{n}")
    daemon.wait_views(len(names))
    daemon.stop()
    daemon.start()  # the index persists: nothing of the mount is in the kernel's caches
    wait_for(lambda: _fuse_ops(port).get("visible") == len(names))
    before = _fuse_ops(port)
    listing = subprocess.run(
        ["ls", "-lRi", str(daemon.mnt)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    after = _fuse_ops(port)
    # "INODE MODE LINKS ..." lines (inodes right-aligned), not "total" or "DIR:" lines.
    entries = [ln for ln in listing.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()]
    assert len(entries) >= len(names) + 4  # the files and their directories
    stats = after.get("getattr", 0) - before.get("getattr", 0)
    assert stats < len(entries) // 2, (stats, len(entries))
    files = dirs = 0
    for top, subdirs, filenames in os.walk(daemon.mnt):
        with os.scandir(top) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                # inode() and is_dir() come from the readdir entry itself (d_ino, d_type).
                assert entry.inode() == st.st_ino, entry.name
                assert entry.is_dir(follow_symlinks=False) == stat.S_ISDIR(st.st_mode)
                assert entry.is_file(follow_symlinks=False) == stat.S_ISREG(st.st_mode)
                if entry.is_dir(follow_symlinks=False):
                    dirs += 1
                    assert stat.S_IMODE(st.st_mode) == 0o555
                else:
                    files += 1
                    assert stat.S_IMODE(st.st_mode) == 0o444
                    assert st.st_size > 0
        assert len(subdirs) + len(filenames) >= 1
    assert files == len(names)
    assert dirs >= 4
    # Inodes are distinct, and ls -i printed the ones stat gives.
    inos = {os.lstat(p).st_ino for p in daemon.mnt.rglob("*")}
    assert len(inos) == files + dirs
    assert {int(line.split()[0]) for line in entries} == inos


MASKED_FOLDER = """
[folders.masked]
path = "{path}"
profile = "Masked"
layout = "dicom"

[profiles.Masked]
base = "+Pixel"

[[profiles.Masked.masks]]
modality = "CT"
rows = 128
columns = 128
rects = [[10, 5, 30, 20], [0, 120, 128, 8]]

[[profiles.Masked.masks]]
modality = "MR"
rects = [[0, 0, 64, 6], [50, 40, 14, 24]]
"""
#: Native little and big endian, deflated, encapsulated, sequences; the masked folder
#: adds zeroed native ranges (CT) and re-encoded compressed pixels held in memory (RLE).
PLAIN_SOURCES = (
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "ExplVR_BigEnd.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "rtplan.dcm",
)
MASKED_SOURCES = ("CT_small.dcm", "MR_small_RLE.dcm")


@pytest.mark.parametrize("read_path", ["C", "Python"])
def test_reads_at_odd_offsets_match_the_reference_through_read_buf(
    daemon_factory: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch, read_path: str
) -> None:
    """Every served file, read through the mount at odd offsets and sizes (and whole), is
    byte for byte what ``deidfs anonymize`` writes, on the C read path and on the Python
    one; every read went through read_buf, and on the C path none entered Python."""
    monkeypatch.setenv(fastread.ENV_SWITCH, "1" if read_path == "C" else "0")
    d = daemon_factory()
    masked_in = d.root / "masked-in"
    masked_in.mkdir()
    with open(d.config_path, "a", encoding="utf-8") as f:
        f.write(MASKED_FOLDER.format(path=masked_in))
    sources = [d.add(sample_file(n), f"in/{n}") for n in PLAIN_SOURCES]
    masked = []
    for n in MASKED_SOURCES:
        shutil.copyfile(sample_file(n), masked_in / n)
        masked.append(masked_in / n)
    service = Service(load_config(d.config_path))
    try:
        service.start()
        expected = {f"samples/{rel}": data for rel, data in map(d.expected, sources)}
        expected.update(
            (f"masked/{rel}", data) for rel, data in (d.expected(s, "Masked") for s in masked)
        )
        assert len(expected) == len(PLAIN_SOURCES) + len(MASKED_SOURCES)
        wait_for(
            lambda: all((d.mnt / rel).exists() for rel in expected),
            timeout=30,
        )
        kinds = set()
        for rel in expected:
            vf = service.tree.file(f"/{rel}")
            assert vf is not None
            key = (vf.source, vf.state, vf.digest)
            view = service.fs.cache.peek(key)
            if view is not None:
                kinds |= {"zeroed"} if view.zeroed else set()
                kinds |= {"pixels"} if view.pixels else set()
        assert (service.ops.fast is not None) == (read_path == "C")
        before_buf, before_read = service.ops.read_buf_calls, service.ops.read_calls
        before_python = service.ops.python_read_buf_calls
        odd_reads = 0
        for rel, want in expected.items():
            path = d.mnt / rel
            # O_DIRECT: each pread reaches the daemon at its own offset and size (cached
            # reads would come as whole pages of read-ahead).
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                size = len(want)
                cuts = [0, 1, 127, 128, 131, 132, 1000, 4095, 4097, 65537]
                cuts += [size // 3, size // 2 + 1, size - 4099, size - 7, size - 1, size]
                for at in sorted({c for c in cuts if 0 <= c <= size}):
                    for n in (1, 3, 511, 4097, 70001):
                        assert os.pread(fd, n, at) == want[at : at + n], (rel, at, n)
                        odd_reads += at < size  # the kernel answers EOF itself
                assert os.pread(fd, 10, size + 3) == b""
            finally:
                os.close(fd)
            assert path.read_bytes() == want, rel
        assert service.ops.read_calls == before_read  # nothing through the bytes path
        assert service.ops.read_buf_calls >= before_buf + odd_reads
        if read_path == "C":
            assert service.ops.python_read_buf_calls == before_python
        assert kinds == {"zeroed", "pixels"}, kinds  # the masked cases were covered
    finally:
        service.stop()


def test_fuse_worker_threads_keep_their_python_thread_state(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Each libfuse worker thread gets one Python thread state for the life of the mount,
    not one per callback: the per-thread mark set in its first callback is still there in
    every later one (a state destroyed after each callback would take the mark with it)."""
    d = daemon_factory()
    sources = [d.add(sample_file(n), f"in/{n}") for n in ("CT_small.dcm", "MR_small.dcm")]
    service = Service(load_config(d.config_path))
    try:
        before = binding.kept_thread_states
        service.start()
        expected = dict(map(d.expected, sources))
        wait_for(lambda: all((d.folder / rel).exists() for rel in expected))
        calls = service.ops.read_buf_calls
        for _ in range(50):
            for rel, want in expected.items():
                fd = os.open(d.folder / rel, os.O_RDONLY | os.O_DIRECT)
                try:
                    assert os.pread(fd, 777, 301) == want[301:1078]
                finally:
                    os.close(fd)
        assert service.ops.read_buf_calls >= calls + 100
        kept = binding.kept_thread_states - before
        # libfuse starts at most max_threads (10) workers, and the init callback's thread.
        assert 1 <= kept <= 12, kept
    finally:
        service.stop()
