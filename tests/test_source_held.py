"""An open view holds its source: deleted or renamed away under a reader, it reads on.

A view opened through the mount keeps its source's descriptor from open to release, so a
reader that started on a source's bytes finishes with exactly those bytes even when the
source is unlinked (or renamed away, or replaced by a rename) in the middle of the read.
The descriptors are the daemon's: every one is closed on release and at unmount, and a
daemon out of descriptors refuses an open with an error instead of failing.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from conftest import Daemon, sample_file, wait_for

pytestmark = pytest.mark.fuse

#: Pixel bytes of the large source: well past the kernel's read-ahead (1 MiB), so the rest
#: of a read really reaches the daemon after the source is gone.
LARGE_ROWS = 1024
LARGE_COLUMNS = 2048


def _large_source(dest: Path, seed: int) -> None:
    """A CT instance with 4 MiB of pixel bytes that differ for every ``seed``."""
    ds = dcmread(sample_file("CT_small.dcm"))
    ds.Rows = LARGE_ROWS
    ds.Columns = LARGE_COLUMNS
    rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
    ds.PixelData = rng.randbytes(LARGE_ROWS * LARGE_COLUMNS * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dest.write_bytes(buf.getvalue())


def _served(d: Daemon, src: Path) -> tuple[Path, bytes]:
    """The view of ``src`` once served, and the bytes a read of it gives before any change."""
    rel, want = d.expected(src)
    view = d.folder / rel
    wait_for(view.exists)
    assert view.read_bytes() == want
    return view, want


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


def test_a_source_deleted_mid_read_is_read_to_the_end(daemon: Daemon) -> None:
    work = daemon.root / "work"
    work.mkdir()
    _large_source(work / "big.dcm", 1)
    src = daemon.add(work / "big.dcm", "big.dcm")
    view, want = _served(daemon, src)
    assert len(want) > 4 << 20

    data = _read_across(view, src.unlink, lambda: not view.exists())
    assert data == want
    # The view itself is gone for everyone else.
    with pytest.raises(FileNotFoundError):
        view.open("rb")
    assert "ERROR" not in daemon.log()
