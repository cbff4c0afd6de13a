"""Reliability on real mounts served by real daemons: load, crashes, and shares that vanish.

- Load (:func:`run_load`): readers read whole views through the mount while files are added,
  replaced (renamed into place, or rewritten in place) and deleted in the watched folder.
  Every complete read is compared with the one-shot output (``render_path`` + ``write_view``
  on a private copy) of each version written; a read must return exactly one version that
  was current at some moment between its open and its last byte. EIO and ENOENT (the file
  changed or went away under the reader) are counted apart; bytes of no version, or of a
  version outside the read's time window, are wrong bytes. The daemon's log must hold no
  ERROR line, and its RSS (VmRSS) is sampled throughout. ``bench/soak.py`` runs the long
  profile (16 readers, 2,000 files) with this same code.
- Caches: a view opened while the kernel still holds the previous version's size (held
  there by delaying the invalidation), a kernel invalidation that fails, and a header
  rendered at open while its source is rewritten (same size and mtime, a later ctime).
- Crash: ``kill -9`` while the daemon indexes and serves, and while an export is written;
  a damaged SQLite index (bytes overwritten in the middle, or cut short).
- Shares: a watched folder on a tmpfs that is unmounted and mounted again.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import math
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from conftest import (
    Daemon,
    Originals,
    add_folder,
    error_lines,
    mounted_type,
    rss_kib,
    sample_file,
    wait_for,
)
from deidfs.config.model import Config, DaemonConfig, FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import Refused
from deidfs.secret import load_or_create_key
from deidfs.service.core import Service
from deidfs.view import handles
from deidfs.view.handles import ViewFS
from deidfs.view.render import Layout, View, render_path, write_view
from deidfs.view.tree import FolderView, ViewFile, ViewTree

pytestmark = pytest.mark.fuse

#: UID root of the instances made here (distinct from the leak corpus root).
LOAD_UID_ROOT = "1.2.826.0.1.3680043.10.998"


# -- versions of instances, and what the mount must serve for each ------------------------------


class VersionMaker:
    """Distinct instances (one SOP Instance UID per slot) in distinct versions.

    Built from pydicom's CT_small: a version changes a kept attribute (and so, every few
    versions, the header's size) and the first pixel bytes, so every version of every slot
    has its own view bytes, while all versions of a slot share one view path.
    """

    def __init__(self) -> None:
        self._ds = dcmread(sample_file("CT_small.dcm"))
        self._pixels = bytearray(self._ds.PixelData)

    def build(self, slot: int, version: int) -> bytes:
        ds = self._ds
        ds.SOPInstanceUID = f"{LOAD_UID_ROOT}.{slot + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = f"{LOAD_UID_ROOT}.1000000.{slot // 100 + 1}"
        ds.SeriesInstanceUID = f"{LOAD_UID_ROOT}.2000000.{slot // 20 + 1}"
        ds.PatientID = f"LOADPAT{slot // 200}"
        ds.WindowCenterWidthExplanation = f"V{version}" + "x" * (7 * (version % 5))
        self._pixels[:8] = struct.pack("<II", slot, version)
        ds.PixelData = bytes(self._pixels)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


class Oracle:
    """The one-shot output of a source: ``render_path`` + ``write_view``, as an export writes.

    Uses the daemon's own key (created here first if the daemon has not run yet).
    """

    def __init__(self, d: Daemon, profile: str | None = None) -> None:
        cfg = d.config()
        self.plan = compile_plan(cfg.profiles[profile or d.profile])
        self.pseudo = Pseudonymizer(load_or_create_key(d.state))
        self.layout = Layout(d.layout)
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (reused for every call)

    def view_bytes(self, private: Path) -> tuple[str, bytes]:
        """(view path under the folder, view bytes) of the file ``private``."""
        view = render_path(private, self.plan, self.pseudo, self.layout)
        fd = os.open(private, os.O_RDONLY)
        try:
            self._out.seek(0)
            self._out.truncate()
            write_view(view, fd, self._out)
            self._out.flush()
            self._out.seek(0)
            return str(view.relpath), self._out.read()
        finally:
            os.close(fd)

    def close(self) -> None:
        self._out.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Version:
    """One state of a slot's source: when it was current and the view it must give."""

    number: int
    view_sha: str
    source_sha: str
    start: float  #: monotonic time before it started to replace the previous state
    end: float = math.inf  #: monotonic time after the next change of the slot had finished
    how: str = "initial"  #: how it was written: initial, added, renamed, in place


@dataclass
class Slot:
    """One source file of the load run."""

    index: int
    path: Path
    relpath: str
    versions: list[Version] = field(default_factory=list)
    live: bool = True


# -- the load run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    """Parameters of one load run (the CI profile and the soak profile differ only here)."""

    readers: int = 4
    files: int = 200
    duration: float = 15.0
    #: seconds between two changes of the watched folder
    change_interval: float = 0.05
    #: share of replacements written in place (truncate and rewrite the same inode)
    in_place: float = 0.2
    directories: int = 10
    seed: int = 1
    #: seconds the mount may take to show the final state once changes stop
    converge_timeout: float = 60.0


@dataclass
class LoadResult:
    """What a load run measured."""

    settings: LoadSettings
    index_seconds: float = 0.0  #: start of the daemon until every initial file was visible
    reads: int = 0  #: complete reads, compared
    bytes_read: int = 0
    eio: int = 0
    enoent: int = 0
    other_errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0  #: bytes of no version of the file
    stale: int = 0  #: bytes of a version that was not current during the read
    wrong_examples: list[str] = field(default_factory=list)
    changes: Counter[str] = field(default_factory=Counter)
    rss_start_kib: int = 0  #: once the initial files were indexed
    rss_max_kib: int = 0
    rss_end_kib: int = 0
    converge_seconds: float = 0.0
    final_mismatches: list[str] = field(default_factory=list)
    sources_changed: list[str] = field(default_factory=list)
    daemon_errors: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def lines(self) -> list[str]:
        s = self.settings
        rate = self.reads / s.duration if s.duration else 0.0
        return [
            f"readers {s.readers}, files {s.files}, duration {s.duration:.0f} s, "
            f"change every {s.change_interval * 1000:.0f} ms ({s.in_place:.0%} in place)",
            f"initial index: {self.index_seconds:.1f} s",
            f"changes: {dict(sorted(self.changes.items()))}",
            f"complete reads: {self.reads} ({rate:.0f}/s, "
            f"{self.bytes_read / 1e6 / max(s.duration, 1e-9):.1f} MB/s)",
            f"wrong bytes: {self.wrong}, stale versions: {self.stale}",
            f"EIO: {self.eio}, ENOENT: {self.enoent}, other errors: {dict(self.other_errors)}",
            f"daemon RSS: {self.rss_start_kib / 1024:.0f} MiB after indexing, "
            f"max {self.rss_max_kib / 1024:.0f} MiB, end {self.rss_end_kib / 1024:.0f} MiB",
            f"mount matched the folder {self.converge_seconds:.1f} s after the last change; "
            f"mismatches: {len(self.final_mismatches)}",
            f"daemon ERROR lines: {len(self.daemon_errors)}, exit code {self.exit_code}",
        ]


class _Run:
    """State shared by the readers and the changer of one load run."""

    def __init__(self, d: Daemon, settings: LoadSettings, work: Path) -> None:
        self.d = d
        self.s = settings
        self.work = work
        self.private = work / "versions"
        self.private.mkdir(parents=True, exist_ok=True)
        self.maker = VersionMaker()
        self.oracle = Oracle(d)
        self.oracle_lock = threading.Lock()  #: the oracle reuses one output file
        self.lock = threading.Lock()
        self.slots: list[Slot] = []
        self.stop = threading.Event()
        self.result = LoadResult(settings)

    # -- writing sources ---------------------------------------------------------------------

    def _version_file(self, slot: int, number: int) -> tuple[Path, bytes, str, str]:
        data = self.maker.build(slot, number)
        private = self.private / f"{slot}-{number}.dcm"
        private.write_bytes(data)
        with self.oracle_lock:
            relpath, view = self.oracle.view_bytes(private)
        return private, data, relpath, digest(view)

    def _source_path(self, index: int) -> Path:
        return self.d.incoming / f"dir{index % self.s.directories:02d}" / f"im{index:05d}.dcm"

    def add(self, initial: bool = False) -> None:
        """A new source (a new slot); ``initial`` ones exist before the daemon starts."""
        index = len(self.slots)
        private, data, relpath, view_sha = self._version_file(index, 0)
        path = self._source_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        slot = Slot(index, path, relpath)
        tmp = path.with_name(path.name + ".part")
        shutil.copyfile(private, tmp)
        with self.lock:
            start = -math.inf if initial else time.monotonic()
            slot.versions.append(
                Version(0, view_sha, digest(data), start, how="initial" if initial else "added")
            )
            self.slots.append(slot)
        os.replace(tmp, path)
        self.result.changes["initial" if initial else "added"] += 1

    def replace(self, slot: Slot, in_place: bool) -> None:
        number = slot.versions[-1].number + 1
        private, data, relpath, view_sha = self._version_file(slot.index, number)
        assert relpath == slot.relpath
        tmp = slot.path.with_name(slot.path.name + ".part")
        if not in_place:
            shutil.copyfile(private, tmp)
        with self.lock:
            previous = slot.versions[-1]
            how = "in place" if in_place else "renamed"
            slot.versions.append(Version(number, view_sha, digest(data), time.monotonic(), how=how))
        if in_place:
            # As `cp` onto an existing file: same inode, truncated, then written.
            with open(slot.path, "r+b") as f:
                f.truncate(0)
                f.write(data)
            self.result.changes["replaced in place"] += 1
        else:
            os.replace(tmp, slot.path)
            self.result.changes["replaced"] += 1
        with self.lock:
            previous.end = time.monotonic()

    def delete(self, slot: Slot) -> None:
        slot.path.unlink()
        with self.lock:
            slot.versions[-1].end = time.monotonic()
            slot.live = False
        self.result.changes["deleted"] += 1

    def changer(self) -> None:
        rng = random.Random(self.s.seed)  # noqa: S311 (test data, not a secret)
        target = self.s.files
        while not self.stop.wait(self.s.change_interval):
            live = [s for s in self.slots if s.live]
            roll = rng.random()
            if len(live) < target * 0.9 or (roll < 0.25 and len(live) < target * 1.1):
                self.add()
            elif roll < 0.5 and live:
                self.delete(rng.choice(live))
            elif live:
                self.replace(rng.choice(live), in_place=rng.random() < self.s.in_place)

    # -- reading the mount ---------------------------------------------------------------------

    def reader(self, n: int) -> None:
        rng = random.Random(self.s.seed * 1000 + n)  # noqa: S311 (test data)
        folder = self.d.folder
        sizes = (4096, 65536, 1 << 20)
        r = self.result
        while not self.stop.is_set():
            slots = self.slots
            slot = slots[rng.randrange(len(slots))]
            for _ in range(3):
                if slot.live:
                    break
                slot = slots[rng.randrange(len(slots))]
            chunk = rng.choice(sizes)
            t0 = time.monotonic()
            try:
                with open(folder / slot.relpath, "rb", buffering=0) as f:
                    parts = []
                    while True:
                        part = f.read(chunk)
                        if not part:
                            break
                        parts.append(part)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                with self.lock:
                    if exc.errno == errno.EIO:
                        r.eio += 1
                    elif exc.errno == errno.ENOENT:
                        r.enoent += 1
                    else:
                        r.other_errors[name] += 1
                continue
            t1 = time.monotonic()
            data = b"".join(parts)
            sha = digest(data)
            with self.lock:
                r.reads += 1
                r.bytes_read += len(data)
                current = [v for v in slot.versions if v.start <= t1 and v.end >= t0]
                if any(v.view_sha == sha for v in current):
                    continue
                known = [v.number for v in slot.versions if v.view_sha == sha]
                if known:
                    r.stale += 1
                else:
                    r.wrong += 1
                explain = len(r.wrong_examples) < 10
                versions = list(slot.versions)
            if explain:
                history = ", ".join(
                    f"v{v.number} {v.how} [{v.start:.3f}, {v.end:.3f}]" for v in versions
                )
                example = (
                    f"slot {slot.index}: {len(data)} bytes of version {known or 'none'} "
                    f"read in [{t0:.3f}, {t1:.3f}] ({chunk}-byte reads); versions: {history}; "
                    f"{self.page_map(slot, versions, data)}"
                )
                with self.lock:
                    r.wrong_examples.append(example)

    def page_map(self, slot: Slot, versions: list[Version], data: bytes) -> str:
        """Which versions' view bytes each 4 KiB page of ``data`` equals, as runs of pages.

        Tells a mix of two versions (pages of each), a version cut short or padded (every
        page of one version, another length) and bytes of no version apart.
        """
        views: dict[int, bytes] = {}
        for v in versions[-4:]:
            with self.oracle_lock:
                views[v.number] = self.oracle.view_bytes(
                    self.private / f"{slot.index}-{v.number}.dcm"
                )[1]
        runs: list[tuple[int, int, str]] = []
        page = 4096
        for at in range(0, len(data), page):
            part = data[at : at + page]
            match = ",".join(f"v{n}" for n, b in views.items() if b[at : at + len(part)] == part)
            if runs and runs[-1][2] == (match or "none") and runs[-1][1] == at // page - 1:
                runs[-1] = (runs[-1][0], at // page, runs[-1][2])
            else:
                runs.append((at // page, at // page, match or "none"))
        sizes = ", ".join(f"v{n} {len(b)}" for n, b in views.items())
        pages = " ".join(f"{a}-{b}:{m}" if a != b else f"{a}:{m}" for a, b, m in runs)
        return f"view sizes {sizes}; pages {pages}"

    # -- checks ---------------------------------------------------------------------------------

    def expected_tree(self) -> dict[str, str]:
        with self.lock:
            return {s.relpath: s.versions[-1].view_sha for s in self.slots if s.live}

    def served_tree(self) -> dict[str, str]:
        out: dict[str, str] = {}
        folder = self.d.folder
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                p = Path(dirpath) / name
                try:
                    out[str(p.relative_to(folder))] = digest(p.read_bytes())
                except OSError as exc:
                    out[str(p.relative_to(folder))] = f"error {exc.errno}"
        return out

    def tree_mismatches(self) -> list[str]:
        want, got = self.expected_tree(), self.served_tree()
        bad = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
        bad += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
        bad += [f"bytes differ {k}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
        return bad

    def count_views(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.d.folder))


def run_load(d: Daemon, settings: LoadSettings, work: Path) -> LoadResult:
    """Run one load profile against the (not yet started) daemon ``d``; see the module doc."""
    run = _Run(d, settings, work)
    r = run.result
    for _ in range(settings.files):
        run.add(initial=True)
    started = time.monotonic()
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    rss_samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.25):
            kib = rss_kib(pid)
            if kib is not None:
                rss_samples.append(kib)

    sampler = threading.Thread(target=sample, name="rss", daemon=True)
    sampler.start()
    try:
        deadline = started + max(60.0, settings.files / 20)
        while run.count_views() < settings.files:
            if time.monotonic() > deadline:
                pytest.fail(f"only {run.count_views()} of {settings.files} files indexed")
            time.sleep(0.2)
        r.index_seconds = time.monotonic() - started
        r.rss_start_kib = rss_kib(pid) or 0
        threads = [threading.Thread(target=run.changer, name="changer")]
        threads += [
            threading.Thread(target=run.reader, args=(n,), name=f"reader-{n}")
            for n in range(settings.readers)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(settings.duration)
        finally:
            run.stop.set()
            for t in threads:
                t.join(60)
        quiet = time.monotonic()
        while True:
            r.final_mismatches = run.tree_mismatches()
            if not r.final_mismatches or time.monotonic() - quiet > settings.converge_timeout:
                break
            time.sleep(0.5)
        r.converge_seconds = time.monotonic() - quiet
        r.rss_end_kib = rss_kib(pid) or 0
    finally:
        sampling.set()
        sampler.join(5)
        run.oracle.close()
    r.rss_max_kib = max([*rss_samples, r.rss_start_kib, r.rss_end_kib])
    r.exit_code = d.stop()
    r.daemon_errors = error_lines(d.log())
    # Nothing the daemon did changed a source: each holds the last version written.
    for slot in run.slots:
        if slot.live and digest(slot.path.read_bytes()) != slot.versions[-1].source_sha:
            r.sources_changed.append(str(slot.path))
    return r


def check_load(r: LoadResult) -> None:
    """The pass criteria of a load run (shared with bench/soak.py)."""
    assert r.wrong == 0, r.wrong_examples
    assert r.stale == 0, r.wrong_examples
    assert not r.other_errors, r.other_errors
    assert r.final_mismatches == [], r.final_mismatches[:20]
    assert r.daemon_errors == [], r.daemon_errors[:20]
    assert r.sources_changed == []
    assert r.exit_code == 0
    assert r.reads > 0


#: RSS bound of the CI profile: the daemon measured about 60-80 MiB here.
CI_RSS_LIMIT_KIB = 300 * 1024


@pytest.mark.slow
def test_load_with_changes_serves_no_wrong_bytes(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    settings = LoadSettings(readers=4, files=200, duration=15.0, change_interval=0.05, in_place=0.2)
    r = run_load(daemon_factory(), settings, tmp_path / "load")
    print("\n".join(r.lines()))
    check_load(r)
    assert r.changes["replaced"] > 20
    assert r.changes["replaced in place"] > 5
    assert r.changes["deleted"] > 10
    assert r.reads > 500
    assert r.rss_max_kib < CI_RSS_LIMIT_KIB


# -- the kernel's cached size and pages --------------------------------------------------------


def _service_config(tmp_path: Path, incoming: Path) -> Config:
    return Config(
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


@pytest.mark.parametrize("how", ["renamed", "in place"])
def test_a_view_opened_before_the_kernel_drops_the_old_size_is_read_whole(
    tmp_path: Path, how: str
) -> None:
    """The window between a new version being served and the kernel's invalidation.

    The kernel still holds the previous version's size there and clamps cached reads to
    it: a reader then got the new version cut at the old size (bytes of no version: the
    mixed reads of bench/soak.py). The invalidation is held back here until the reader is
    done; the view opened meanwhile bypasses the kernel's cache and is read whole.
    """
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    maker = VersionMaker()
    source = incoming / "a.dcm"
    source.write_bytes(maker.build(0, 0))
    service = Service(_service_config(tmp_path, incoming))
    try:
        service.start()
        folder = tmp_path / "mnt" / "ct"
        wait_for(lambda: len(list(folder.rglob("*.dcm"))) == 1)
        (view,) = folder.rglob("*.dcm")
        old = view.read_bytes()  # the kernel now holds its size and pages
        assert os.stat(view).st_size == len(old)

        real = service.tree.invalidator
        assert real is not None
        mount_path = "/" + str(view.relative_to(tmp_path / "mnt"))
        in_window, reader_done = threading.Event(), threading.Event()

        def held_back(paths: Iterable[str]) -> bool | None:
            paths = list(paths)
            if mount_path in paths and not in_window.is_set():
                in_window.set()
                reader_done.wait(30)
            return real(paths)

        service.tree.invalidator = held_back
        new_source = maker.build(0, 1)
        if how == "renamed":
            part = incoming / "a.dcm.part"
            part.write_bytes(new_source)
            os.replace(part, source)
        else:
            with open(source, "r+b") as f:
                f.truncate(0)
                f.write(new_source)
        assert in_window.wait(30), "the new version was not indexed"
        try:
            assert os.stat(view).st_size == len(old)  # the kernel's size: the old version's
            direct_before = service.fs.direct_opens
            in_window_bytes = view.read_bytes()
            assert service.fs.direct_opens == direct_before + 1
        finally:
            reader_done.set()
        wait_for(lambda: service.tree.settled(mount_path))
        after = view.read_bytes()
        assert len(after) == os.stat(view).st_size > len(old)
        assert len(in_window_bytes) == len(after)  # not cut at the old size
        assert in_window_bytes == after
    finally:
        service.stop()


def _indexed(root: Path) -> tuple[ViewTree, ViewFS, ViewFile, Path]:
    """One real source in a tree and a ViewFS, as the service sets them up."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "src.dcm"
    source.write_bytes(VersionMaker().build(0, 0))
    pseudo = Pseudonymizer(b"reliability-test-key-0123456789")
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    tree = ViewTree()
    tree.set_folder(FolderView("ct", root, plan, pseudo, Layout.DICOM, "dg"))
    view = render_path(source, plan, pseudo)
    vf = ViewFile("ct", str(source), view.source, "dg", str(view.relpath), view.size, 1)
    return tree, ViewFS(tree, 1 << 20), vf, source


def test_a_change_the_kernel_was_not_told_of_keeps_its_view_off_the_page_cache(
    tmp_path: Path,
) -> None:
    tree, fs, vf, _source = _indexed(tmp_path)
    calls: list[list[str]] = []
    answer = [False]

    def invalidator(paths: Iterable[str]) -> bool:
        calls.append(list(paths))
        return answer[0]

    tree.invalidator = invalidator
    tree.put(vf)
    assert vf.mount_path in calls[0]
    assert not tree.settled(vf.mount_path)  # the kernel may cache a former file there
    for _ in range(2):
        opened = fs.open(vf.mount_path)
        assert opened.direct_io
        fs.release(opened.fh)
    answer[0] = True
    tree.put(dataclasses.replace(vf, mtime_ns=2))  # the next change gets through
    assert len(calls) == 2
    assert not tree.settled(vf.mount_path)  # the failed one still counts: never settled
    assert fs.open_handles == 0

    unmounted, fs2, vf2, _ = _indexed(tmp_path / "other")
    unmounted.put(vf2)  # no invalidator: no kernel cache, nothing to wait for
    assert unmounted.settled(vf2.mount_path)
    opened = fs2.open(vf2.mount_path)
    assert not opened.direct_io
    fs2.release(opened.fh)


def test_a_header_rendered_at_open_is_not_served_if_the_source_changed_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite during the open's render that keeps size and mtime (``touch -r``,
    ``rsync --inplace -t``) shows only in ctime; the header read may mix two contents."""
    tree, fs, vf, source = _indexed(tmp_path)
    tree.put(vf)
    st = source.stat()
    original = handles.render
    rewritten = VersionMaker().build(0, 5)  # other header values, same size and view path
    assert len(rewritten) == st.st_size

    def render_then_rewrite(*args: Any, **kwargs: Any) -> View:
        view = original(*args, **kwargs)
        source.write_bytes(rewritten)
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        return view

    monkeypatch.setattr(handles, "render", render_then_rewrite)
    with pytest.raises(Refused, match="changed while rendered"):
        fs.open(vf.mount_path)
    assert len(fs.cache) == 0
    assert fs.open_handles == 0
    monkeypatch.setattr(handles, "render", original)
    # Size and mtime match the index, ctime does not: rendered again from the new content,
    # served off the page cache, and not cached under the indexed state it no longer has.
    opened = fs.open(vf.mount_path)
    assert opened.direct_io
    served = fs.read(opened.fh, 0, vf.size + 1)
    fs.release(opened.fh)
    assert len(fs.cache) == 0
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    fresh = render_path(source, plan, Pseudonymizer(b"reliability-test-key-0123456789"))
    assert fresh.source != vf.state
    with tempfile.TemporaryFile() as out, open(source, "rb") as src:
        write_view(fresh, src.fileno(), out)
        out.seek(0)
        assert served == out.read()


# -- crash ----------------------------------------------------------------------------------------


def _populate(d: Daemon, count: int, work: Path) -> dict[str, str]:
    """``count`` distinct sources in ``d.incoming``; returns {view relpath: view sha256}."""
    maker = VersionMaker()
    oracle = Oracle(d)
    expected: dict[str, str] = {}
    private = work / "private"
    private.mkdir(parents=True, exist_ok=True)
    try:
        for n in range(count):
            p = private / f"{n}.dcm"
            p.write_bytes(maker.build(n, 0))
            relpath, data = oracle.view_bytes(p)
            expected[relpath] = digest(data)
            dest = d.incoming / f"d{n % 7}" / f"{n}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    finally:
        oracle.close()
    return expected


def _served(d: Daemon) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(d.folder):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(d.folder))] = digest(p.read_bytes())
    return out


def _wait_served(d: Daemon, expected: dict[str, str], timeout: float = 60.0) -> None:
    def complete() -> bool:
        return sum(len(f) for _, _, f in os.walk(d.folder)) == len(expected)

    wait_for(complete, timeout=timeout, interval=0.1)
    assert _served(d) == expected


def _check_index(d: Daemon, expected_count: int) -> None:
    """The index (daemon stopped) is intact and each row matches its source on disk."""
    db = d.state / "index.sqlite3"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT path, dev, ino, size, mtime_ns, status FROM sources").fetchall()
    conn.close()
    assert len(rows) == expected_count
    for path, dev, ino, size, mtime_ns, status in rows:
        st = os.lstat(os.fsdecode(path))
        assert status == "ok"
        assert (dev, ino, size, mtime_ns) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _reader_loop(d: Daemon, stop: threading.Event, outcomes: Counter[str]) -> None:
    while not stop.is_set():
        try:
            for dirpath, _dirs, files in os.walk(d.folder, onerror=_raise):
                for name in files:
                    (Path(dirpath) / name).read_bytes()
                    outcomes["ok"] += 1
        except OSError as exc:
            outcomes[errno.errorcode.get(exc.errno or 0, "?")] += 1
            time.sleep(0.01)


def _raise(exc: OSError) -> None:
    raise exc


def test_kill_9_while_indexing_and_reading(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, originals: Originals
) -> None:
    d = daemon_factory()
    expected = _populate(d, 300, tmp_path / "work")
    originals.record(d.incoming)
    for round_ in range(2):
        d.start()
        if round_ == 0:
            # Killed while the initial scan is still indexing (rows being written).
            wait_for(lambda: sum(len(f) for _, _, f in os.walk(d.folder)) >= 20, timeout=30)
        else:
            _wait_served(d, expected)
        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        readers = [
            threading.Thread(target=_reader_loop, args=(d, stop, outcomes)) for _ in range(3)
        ]
        for t in readers:
            t.start()
        time.sleep(0.5)
        visible = sum(len(f) for _, _, f in os.walk(d.folder))
        d.kill()
        time.sleep(0.3)
        stop.set()
        for t in readers:
            t.join(10)
        assert outcomes["ok"] > 0
        # Readers saw the connection go, nothing else: ENOTCONN, ECONNABORTED for a request
        # in flight when it went, ENOENT for a name listed before a view was withdrawn.
        assert set(outcomes) <= {"ok", "ENOTCONN", "ECONNABORTED", "ENOENT"}, outcomes
        with pytest.raises(OSError, match="Transport endpoint is not connected"):
            os.listdir(d.folder)
        print(f"round {round_}: killed with {visible} of {len(expected)} views visible")
    d.start()
    _wait_served(d, expected)
    assert d.log().count("stale mount found") == 2
    assert d.stop() == 0
    _check_index(d, len(expected))
    assert error_lines(d.log()) == []


def _export_argv(d: Daemon, out: Path | None, via_daemon: bool = False) -> list[str]:
    """``deidfs export samples`` into ``out`` (its own process, or through the daemon into
    the configured export_dir)."""
    argv = [sys.executable, "-m", "deidfs", "--log-level", "debug", "export", "samples", "-q"]
    argv += ["--config", str(d.config_path)]
    if via_daemon:
        return [*argv, "--via-daemon"]
    assert out is not None
    return [*argv, "--to", str(out)]


def _visible_files(root: Path) -> dict[str, Path]:
    """Files a user sees under ``root`` (dotfiles are temporary files and manifests)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for name in files:
            if not name.startswith("."):
                p = Path(dirpath) / name
                out[str(p.relative_to(root))] = p
    return out


@pytest.mark.parametrize("killed", ["export", "daemon"])
def test_kill_9_during_an_export_leaves_nothing_partial_and_the_rerun_completes(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, originals: Originals, killed: str
) -> None:
    """``kill -9`` of ``deidfs export`` (and its workers), or of the daemon exporting for
    ``deidfs export --via-daemon``: no partial file under a final name; the re-run writes
    what is missing, leaves what is complete alone, and removes the temporary files."""
    d = daemon_factory()
    expected = _populate(d, 400, tmp_path / "work")
    originals.record(d.incoming)
    via_daemon = killed == "daemon"
    if via_daemon:
        d.start()
        _wait_served(d, expected)
    out = d.export if via_daemon else tmp_path / "out"
    argv = _export_argv(d, out, via_daemon)
    with open(tmp_path / f"export-killed-{killed}.stderr.log", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: len(_visible_files(out)) >= 40, timeout=120, interval=0.005)
    finally:
        if via_daemon:
            d.kill()
            proc.wait(60)  # the client sees the daemon go and exits
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes
            proc.wait(10)
    first = _visible_files(out)
    print(f"{killed} killed after {len(first)} of {len(expected)} files")
    assert 0 < len(first) < len(expected), "kill -9 did not land during the export"
    # Nothing partial under a final name: every visible file is a complete view.
    for rel, p in first.items():
        assert expected.get(_layout_rel(rel)) == digest(p.read_bytes()), rel
    inodes = {rel: p.stat().st_ino for rel, p in first.items()}
    if via_daemon:
        d.start()
    with open(tmp_path / f"export-rerun-{killed}.stderr.log", "wb") as err:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, timeout=300, check=False)
    assert done.returncode == 0, done.stdout
    final = _visible_files(out)
    assert {_layout_rel(rel): digest(p.read_bytes()) for rel, p in final.items()} == expected
    # Files completed before the kill were left alone (idempotent), temporaries cleaned.
    assert all(final[rel].stat().st_ino == ino for rel, ino in inodes.items())
    assert [p for p in out.rglob(".deidfs-*.tmp") if p.is_file()] == []
    if via_daemon:
        assert d.stop() == 0


def _layout_rel(rel: str) -> str:
    """An export's path relative to the folder's views (``export`` adds the folder id)."""
    parts = Path(rel).parts
    return str(Path(*parts[1:])) if parts and parts[0] == "samples" else rel


def _corrupt_middle(db: Path) -> None:
    size = db.stat().st_size
    page = 4096
    at = (size // page // 2) * page
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(random.Random(7).randbytes(page))  # noqa: S311 (test data)


def _truncate_half(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_corrupt_middle, _truncate_half], ids=["middle", "truncated"])
def test_damaged_index_is_detected_and_rebuilt(
    daemon_factory: Callable[..., Daemon],
    tmp_path: Path,
    damage: Callable[[Path], None],
    originals: Originals,
) -> None:
    d = daemon_factory()
    expected = _populate(d, 120, tmp_path / "work")
    originals.record(d.incoming)
    d.start()
    _wait_served(d, expected)
    assert d.stop() == 0
    db = d.state / "index.sqlite3"
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    assert db.stat().st_size > 8 * 4096
    damage(db)
    d.start()
    _wait_served(d, expected)
    assert any(".corrupt-" in p.name for p in d.state.iterdir()), "damage not detected"
    assert "moving it aside" in d.log()
    assert d.stop() == 0
    _check_index(d, len(expected))


# -- shares ---------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _umount(path: Path) -> None:
    if mounted_type(path) is None:
        return
    done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    """A directory with a tmpfs mounted on it; unmounted at the end whatever happens."""
    path = tmp_path / "share"
    path.mkdir()
    _mount_tmpfs(path)
    try:
        yield path
    finally:
        _umount(path)
        _umount(path)  # a second tmpfs mounted by the test
        assert mounted_type(path) is None


def _copy_in(sources: list[Path], folder: Path) -> None:
    for n, src in enumerate(sources):
        tmp = folder / f"{n}.dcm.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / f"{n}.dcm")


def test_a_share_that_goes_away_and_comes_back_does_not_wedge_other_folders(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, share: Path
) -> None:
    d = daemon_factory()  # no periodic rescan: the watcher alone notices the share
    add_folder(d, "share", share)
    maker = VersionMaker()
    work = tmp_path / "work"
    work.mkdir()
    sources = []
    for n in range(12):
        p = work / f"{n}.dcm"
        p.write_bytes(maker.build(n, 0))
        sources.append(p)
    local, shared = sources[:5], sources[5:11]
    _copy_in(local, d.incoming)
    _copy_in(shared[:5], share)
    d.start()
    share_view = d.mnt / "share"

    def count(folder: Path) -> int:
        return sum(len(f) for _, _, f in os.walk(folder))

    wait_for(lambda: count(d.folder) == 5 and count(share_view) == 5, timeout=30)
    local_bytes = {p: p.read_bytes() for p in d.views()}
    share_bytes = {p.relative_to(share_view): p.read_bytes() for p in share_view.rglob("*.dcm")}

    stop = threading.Event()
    errors: list[str] = []
    latencies: list[float] = []

    def read_local() -> None:
        while not stop.is_set():
            for p, data in local_bytes.items():
                t0 = time.monotonic()
                try:
                    ok = p.read_bytes() == data
                except OSError as exc:
                    errors.append(errno.errorcode.get(exc.errno or 0, "?"))
                    continue
                latencies.append(time.monotonic() - t0)
                if not ok:
                    errors.append("wrong bytes")

    reader = threading.Thread(target=read_local)
    reader.start()
    try:
        _umount(share)  # the share goes away
        assert mounted_type(share) is None
        wait_for(lambda: count(share_view) == 0, timeout=30, interval=0.1)
        # The other folder is served and still indexes new files during the outage.
        d.add(sources[11], "late.dcm")
        wait_for(lambda: count(d.folder) == 6, timeout=30)
        during = len(latencies)
        time.sleep(1.0)
        assert len(latencies) > during
        _mount_tmpfs(share)  # it comes back, with its files and one more
        _copy_in(shared, share)
        wait_for(lambda: count(share_view) == 6, timeout=30, interval=0.1)
    finally:
        stop.set()
        reader.join(10)
    back = {p.relative_to(share_view): p.read_bytes() for p in share_view.rglob("*.dcm")}
    assert {k: v for k, v in back.items() if k in share_bytes} == share_bytes
    assert errors == []
    assert max(latencies) < 2.0, max(latencies)
    print(f"{len(latencies)} reads of the other folder, max {max(latencies) * 1000:.0f} ms")
    assert d.stop() == 0
    assert error_lines(d.log()) == []
