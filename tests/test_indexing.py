"""Indexing by the daemon's workers: each source once, rows batched, the fast path helpers."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path, PurePosixPath

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import mounted_type, sample_file, wait_for
from deidfs.config.model import Config, DaemonConfig, FolderConfig
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.service.core import Service
from deidfs.service.indexing import _real_directory, _relative

FILES = 120


def _write_instances(folder: Path, count: int) -> None:
    """``count`` distinct CT instances (own SOP Instance UIDs) in two subdirectories."""
    ds = dcmread(sample_file("CT_small.dcm"))
    for n in range(count):
        uid = generate_uid(entropy_srcs=["test_indexing", str(n)])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        out = folder / f"s{n % 2}" / f"im{n:04d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)


def _config(tmp_path: Path, incoming: Path, workers: int) -> Config:
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
            workers=workers,
            cache_mib=8,
        ),
        folders={"ct": FolderConfig(id="ct", path=incoming, profile="Basic")},
        profiles=dict(BUILTIN_PROFILES),
    )


def _committed_rows(state: Path) -> int:
    """Rows another connection sees (committed ones only)."""
    with sqlite3.connect(state / "index.sqlite3") as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM sources").fetchone()
    conn.close()
    return int(count)


@pytest.mark.fuse
@pytest.mark.parametrize("workers", [1, 3])
def test_workers_index_each_source_once_and_commit_when_idle(tmp_path: Path, workers: int) -> None:
    incoming = tmp_path / "incoming"
    _write_instances(incoming, FILES)
    config = _config(tmp_path, incoming, workers)
    service = Service(config)
    try:
        service.start()

        def settled() -> bool:
            s = service.status()
            return s.backlog == 0 and s.folders[0].visible == FILES

        wait_for(settled, timeout=60)
        # One render per source, however many workers read ahead.
        assert service.status().rendered == FILES
        # The batch of index rows is committed once the queue has run empty.
        wait_for(lambda: _committed_rows(tmp_path / "state") == FILES, timeout=10)
        assert len(list((tmp_path / "mnt" / "ct").rglob("*.dcm"))) == FILES
    finally:
        service.stop()
    assert mounted_type(tmp_path / "mnt") is None

    again = Service(config)
    try:
        again.start()
        assert again.status().folders[0].visible == FILES  # from the index, at once
        wait_for(lambda: again.status().backlog == 0, timeout=30)
        status = again.status()
        assert status.rendered == 0
        assert status.reused == FILES
    finally:
        again.stop()


def test_real_directory_agrees_with_realpath(tmp_path: Path) -> None:
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cases = [
        real,
        tmp_path / "link" / "sub",  # through a symlinked directory
        tmp_path / "link",
        tmp_path / "missing" / "dir",  # no such directory: realpath's answer
        tmp_path / "real" / ".." / "real" / "sub",
    ]
    for path in cases:
        assert _real_directory(str(path)) == os.path.realpath(path), path


def test_relative_agrees_with_relpath(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ("a.dcm", "x/y/z.dcm", "x//y.dcm", "x/./y.dcm", "x/../y.dcm", "..a/b.dcm"):
        path = f"{root}/{rel}"
        expected = PurePosixPath(os.path.relpath(path, root))
        assert _relative(path, f"{root}/", root) == expected, rel
