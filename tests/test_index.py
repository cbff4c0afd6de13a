"""The SQLite index of sources: round trips, threads, and recovery from damage."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from deidfs.view import index as index_module
from deidfs.view.index import (
    BATCH_ROWS,
    BATCH_SECONDS,
    FILE_NAME,
    SCHEMA_VERSION,
    Entry,
    Index,
    Status,
)
from deidfs.view.render import SourceStat


def _entry(n: int, folder: str = "ct", status: Status = Status.OK) -> Entry:
    ok = status is Status.OK
    return Entry(
        folder=folder,
        path=f"/data/{folder}/file{n}.dcm",
        source=SourceStat(
            dev=64768,
            ino=1000 + n,
            size=39206 + n,
            mtime_ns=1_700_000_000 + n,
            ctime_ns=1_700_000_000 + n,
        ),
        digest="d" * 64,
        status=status,
        reason="" if ok else "not_dicom",
        relpath=f"P/S/E/{n}.dcm" if ok else "",
        view_size=34474 + n if ok else 0,
        header_length=1694 if ok else 0,
        pixel_offset=6426 if ok else 0,
        pixel_length=32780 if ok else 0,
        trailer_length=0,
        indexed_ns=1_800_000_000_000_000_000 + n,
    )


def test_round_trip_and_queries(tmp_path: Path) -> None:
    index = Index(tmp_path)
    entries = [_entry(n) for n in range(5)] + [_entry(9, "mr", Status.REFUSED)]
    for e in entries:
        index.put(e)
    assert sorted(index.entries(), key=lambda e: e.path) == sorted(entries, key=lambda e: e.path)
    assert index.entries("mr") == [entries[-1]]
    assert index.get("ct", entries[2].path) == entries[2]
    assert index.get("ct", "/nowhere") is None
    assert index.folders() == {"ct", "mr"}
    assert index.count() == 6
    assert index.count("ct") == 5
    # Replacing a source's row keeps one row per (folder, path).
    changed = Entry(**{**_asdict(entries[0]), "view_size": 1})
    index.put(changed)
    assert index.get("ct", entries[0].path) == changed
    assert index.count("ct") == 5
    index.remove("ct", entries[1].path)
    assert index.get("ct", entries[1].path) is None
    index.remove_folder("mr")
    assert index.folders() == {"ct"}
    index.close()


def _asdict(e: Entry) -> dict[str, object]:
    return {name: getattr(e, name) for name in Entry.__slots__}


def test_rows_survive_reopening_with_private_file_and_schema_version(tmp_path: Path) -> None:
    index = Index(tmp_path)
    index.put(_entry(1))
    index.close()
    path = tmp_path / FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds original paths
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Index(tmp_path)
    assert again.entries() == [_entry(1)]
    assert not again.rebuilt
    again.close()


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    Index(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_corrupt_file_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(b"this is not an SQLite database, just garbage " * 100)
    index = Index(tmp_path)
    assert index.rebuilt
    assert index.entries() == []
    index.put(_entry(1))
    assert index.entries() == [_entry(1)]
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1
    index.close()


def test_damaged_pages_are_detected(tmp_path: Path) -> None:
    index = Index(tmp_path)
    for n in range(300):
        index.put(_entry(n))
    index.close()
    path = tmp_path / FILE_NAME
    # Fold the WAL into the main file, then overwrite a page in the middle of it.
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 : 4096 + 2000] = b"\xa5" * 2000  # page 2: no valid page type, garbage cells
    path.write_bytes(bytes(data))
    index = Index(tmp_path)
    assert index.rebuilt
    assert index.count() == 0
    index.close()


def test_other_schema_version_is_rebuilt(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute("CREATE TABLE sources (whatever TEXT)")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 41}")
    index = Index(tmp_path)
    index.put(_entry(3))
    assert index.entries() == [_entry(3)]
    index.close()


def test_unwritable_state_dir_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    index = Index(blocker)  # mkdir fails: the daemon still runs, indexing in memory
    index.put(_entry(1))
    assert index.entries() == [_entry(1)]
    index.close()


def test_concurrent_writers(tmp_path: Path) -> None:
    index = Index(tmp_path)
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for n in range(base, base + 200):
                index.put(_entry(n))
                if n % 3 == 0:
                    index.remove("ct", _entry(n).path)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {_entry(n).path for k in range(4) for n in range(k * 1000, k * 1000 + 200)}
    expected -= {_entry(n).path for n in range(4000) if n % 3 == 0}
    assert {e.path for e in index.entries()} == expected
    index.close()


def test_a_row_this_version_cannot_read_is_skipped(tmp_path: Path) -> None:
    index = Index(tmp_path)
    index.put(_entry(1))
    index.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute(
            "UPDATE sources SET status = 'refused', reason = 'x', dev = 'not-a-number' "
            "WHERE path = ?",
            (os.fsencode(_entry(1).path),),
        )
    again = Index(tmp_path)
    assert again.entries() == []
    again.close()


@pytest.mark.parametrize("status", list(Status))
def test_status_values_are_stable(status: Status) -> None:
    # Stored in the database: renaming a value would orphan every existing row.
    assert status.value in ("ok", "refused")


def _rows_seen_elsewhere(state: Path) -> int:
    """Rows another connection sees: the committed ones."""
    with sqlite3.connect(state / FILE_NAME) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM sources").fetchone()
    conn.close()
    return int(count)


def test_writes_are_committed_in_batches(tmp_path: Path) -> None:
    now = [0.0]
    index = Index(tmp_path, clock=lambda: now[0])
    for n in range(5):
        index.put(_entry(n))
    assert len(index.entries()) == 5  # the daemon's own reads see every row at once
    assert _rows_seen_elsewhere(tmp_path) == 0
    index.flush()
    assert _rows_seen_elsewhere(tmp_path) == 5
    # A full batch is committed by the write that fills it.
    for n in range(100, 100 + BATCH_ROWS):
        index.put(_entry(n))
    assert _rows_seen_elsewhere(tmp_path) == 5 + BATCH_ROWS
    # So is a batch whose oldest write is BATCH_SECONDS old, at the next write.
    index.put(_entry(1000))
    now[0] += BATCH_SECONDS
    index.remove("ct", _entry(0).path)
    assert _rows_seen_elsewhere(tmp_path) == 5 + BATCH_ROWS  # one added, one removed
    assert index.get("ct", _entry(1000).path) == _entry(1000)
    index.put(_entry(1001))
    index.close()  # commits what is pending
    assert _rows_seen_elsewhere(tmp_path) == 6 + BATCH_ROWS


def test_a_write_after_close_leaves_the_index_alone(tmp_path: Path) -> None:
    index = Index(tmp_path)
    index.put(_entry(1))
    index.close()
    index.put(_entry(2))  # a worker still running at shutdown
    index.remove("ct", _entry(1).path)
    index.flush()
    assert not index.rebuilt
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name] == []
    again = Index(tmp_path)
    assert again.entries() == [_entry(1)]
    again.close()


def test_a_folder_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "CHUNK_ROWS", 3)
    index = Index(tmp_path)
    entries = [_entry(n) for n in range(10)] + [_entry(1, "mr")]
    for e in entries:
        index.put(e)
    seen = []
    for e in index.iter_entries("ct"):
        seen.append(e)
        index.remove("ct", e.path)  # writing between chunks is allowed
    assert seen == sorted(entries[:10], key=lambda e: os.fsencode(e.path))
    assert index.entries() == [_entry(1, "mr")]
    # Rows share one object per folder id and digest.
    index.put(_entry(20))
    index.put(_entry(21))
    a, b = index.iter_entries("ct")
    assert a.digest is b.digest
    assert a.folder is b.folder
    index.close()
