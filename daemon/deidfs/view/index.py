"""The persistent index of sources: one SQLite row per watched file, in the state directory.

A row records the state of a source (device, inode, size, mtime_ns, ctime_ns), the digest
of what its view depends on (plan, layout, key), and either the view's geometry (relative
path, size, header/pixel/trailer lengths) or the reason it is withheld. A restart with
unchanged files and the same digest re-parses nothing: rows are loaded into the mount at
once and checked against a cheap ``stat``.

The index is a cache: a corrupt or unreadable file is moved aside and rebuilt, never fatal.
It holds original source paths, which is why the state directory is private (0700) and why
nothing here logs a path.

Being a cache, it is written in batches: a commit per row cost more than everything else
about indexing a file but parsing it. Rows are committed once :data:`BATCH_ROWS` have
accumulated or the oldest uncommitted one is :data:`BATCH_SECONDS` old, and by
:meth:`Index.flush` (the daemon calls it whenever its indexing queue runs empty) and
:meth:`Index.close`. The daemon's own reads see every row at once; another connection (the
``sqlite3`` CLI, tests) sees them once committed. A crash loses at most the uncommitted
rows: those sources are parsed again at the next start.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from deidfs.view.render import SourceStat

log = logging.getLogger(__name__)

FILE_NAME = "index.sqlite3"
#: Bumped whenever the table layout changes; an index of another version is rebuilt.
SCHEMA_VERSION = 2
#: Uncommitted writes that trigger a commit (see the module notes).
BATCH_ROWS = 256
#: Age of the oldest uncommitted write that triggers a commit at the next write.
BATCH_SECONDS = 1.0
#: Rows read per query by :meth:`Index.iter_entries`: a folder of 100,000 files is loaded
#: without holding all its rows (and the lock) at once.
CHUNK_ROWS = 2000
# Paths are stored as their file-system bytes (BLOB): names need not be valid UTF-8
# (a Latin-1 name from a Windows share), and str() of those cannot be stored as TEXT.

_COLUMNS = (
    "folder",
    "path",
    "dev",
    "ino",
    "size",
    "mtime_ns",
    "ctime_ns",
    "digest",
    "status",
    "reason",
    "relpath",
    "view_size",
    "header_length",
    "pixel_offset",
    "pixel_length",
    "trailer_length",
    "indexed_ns",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    folder TEXT NOT NULL,
    path BLOB NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    digest TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'refused')),
    reason TEXT NOT NULL DEFAULT '',
    relpath BLOB NOT NULL DEFAULT x'',
    view_size INTEGER NOT NULL DEFAULT 0,
    header_length INTEGER NOT NULL DEFAULT 0,
    pixel_offset INTEGER NOT NULL DEFAULT 0,
    pixel_length INTEGER NOT NULL DEFAULT 0,
    trailer_length INTEGER NOT NULL DEFAULT 0,
    indexed_ns INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (folder, path)
) WITHOUT ROWID;
"""


class Status(Enum):
    """Whether a source is served or withheld."""

    OK = "ok"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Entry:
    """One indexed source and what its view looks like (or why there is none).

    ``path`` is the absolute source path, ``relpath`` the view's path under its folder.
    ``indexed_ns`` is the wall-clock time the source was last rendered; it changes only
    when the source is parsed again.
    """

    folder: str
    path: str
    source: SourceStat
    digest: str
    status: Status
    reason: str = ""
    relpath: str = ""
    view_size: int = 0
    header_length: int = 0
    pixel_offset: int = 0
    pixel_length: int = 0
    trailer_length: int = 0
    indexed_ns: int = 0

    def _row(self) -> tuple[object, ...]:
        s = self.source
        return (
            self.folder,
            os.fsencode(self.path),
            s.dev,
            s.ino,
            s.size,
            s.mtime_ns,
            s.ctime_ns,
            self.digest,
            self.status.value,
            self.reason,
            os.fsencode(self.relpath),
            self.view_size,
            self.header_length,
            self.pixel_offset,
            self.pixel_length,
            self.trailer_length,
            self.indexed_ns or time.time_ns(),
        )

    @classmethod
    def _of(cls, row: tuple[Any, ...], shared: dict[str, str] | None = None) -> Entry:
        """The entry of a row; ``shared`` makes rows share one object per equal string
        (folder, digest, reason: a few distinct values over many rows)."""
        (folder, path, dev, ino, size, mtime_ns, ctime_ns, digest, status, reason) = row[:10]
        (relpath, view_size, header_length, pixel_offset, pixel_length, trailer_length) = row[10:16]
        ns = row[16]
        folder, digest, reason = str(folder), str(digest), str(reason)
        if shared is not None:
            folder = shared.setdefault(folder, folder)
            digest = shared.setdefault(digest, digest)
            reason = shared.setdefault(reason, reason)
        return cls(
            folder=folder,
            path=os.fsdecode(path),
            source=SourceStat(int(dev), int(ino), int(size), int(mtime_ns), int(ctime_ns)),
            digest=digest,
            status=Status(status),
            reason=reason,
            relpath=os.fsdecode(relpath),
            view_size=int(view_size),
            header_length=int(header_length),
            pixel_offset=int(pixel_offset),
            pixel_length=int(pixel_length),
            trailer_length=int(trailer_length),
            indexed_ns=int(ns),
        )


class Index:
    """The SQLite index at ``<state_dir>/index.sqlite3``.

    One connection guarded by a lock: the writers are a few indexing threads doing one short
    statement each, so a connection per thread would buy nothing. Writes are committed in
    batches (see the module notes). WAL keeps readers of a copy (``sqlite3`` CLI, tests) from
    blocking the daemon.

    Parameters
    ----------
    state_dir
        The private state directory; created (0700) if missing.
    clock
        Monotonic clock in seconds, for the age of uncommitted writes (injectable for tests).
    """

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._clock = clock
        self._closed = False
        self._uncommitted = 0  #: writes since the last commit
        self._first_uncommitted = 0.0  #: clock() of the oldest of them
        self.rebuilt = False  #: True when a damaged index was moved aside and started over
        self._conn: sqlite3.Connection = self._open()

    # -- opening and recovery ------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return self._connect()
        except sqlite3.DatabaseError as exc:
            log.error("index unreadable (%s); moving it aside and rebuilding", exc)
            self._move_aside()
            self.rebuilt = True
        except OSError as exc:
            return self._in_memory(exc.strerror or type(exc).__name__)
        try:
            return self._connect()
        except (sqlite3.DatabaseError, OSError) as exc:
            return self._in_memory(str(exc))

    def _in_memory(self, why: str) -> sqlite3.Connection:
        # The state directory itself is unusable: serve from memory, index again next run.
        log.error("index cannot be stored (%s); running with an in-memory index", why)
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.executescript(_SCHEMA)
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        try:
            os.chmod(self.path, 0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            if version not in (0, SCHEMA_VERSION):
                log.info(
                    "index schema %d replaced by %d; sources are indexed again",
                    version,
                    SCHEMA_VERSION,
                )
                conn.execute("DROP TABLE IF EXISTS sources")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.commit()
        except (sqlite3.DatabaseError, OSError):
            conn.close()
            raise
        return conn

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{self.path}{suffix}")
            if old.exists():
                try:
                    old.rename(f"{self.path}.corrupt-{stamp}{suffix}")
                except OSError as exc:
                    log.error("cannot move the damaged index aside: %s", exc.strerror)
                    old.unlink(missing_ok=True)

    def _write(self, sql: str, args: tuple[object, ...], commit: bool = False) -> None:
        """One write, in the open batch; committed with it (at once if ``commit``).

        After :meth:`close` it is dropped: a writer still running at shutdown must not
        take the closed connection for a damaged index and start it over.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self._conn.execute(sql, args)
                self._uncommitted += 1
                now = self._clock()
                if self._uncommitted == 1:
                    self._first_uncommitted = now
                if (
                    commit
                    or self._uncommitted >= BATCH_ROWS
                    or now - self._first_uncommitted >= BATCH_SECONDS
                ):
                    self._commit()
            except sqlite3.DatabaseError as exc:
                # A cache that cannot be written must not stop the mount: start over.
                log.error("index write failed (%s); rebuilding it", exc)
                self._recover()

    def _commit(self) -> None:
        """Commit the open batch (lock held)."""
        self._conn.commit()
        self._uncommitted = 0

    def _recover(self) -> None:
        if self._closed:
            return  # closed on purpose, not damaged
        with suppress(sqlite3.Error):
            self._conn.close()
        if self.path.exists():
            self._move_aside()
        self._uncommitted = 0
        self._conn = self._open()
        self.rebuilt = True

    # -- queries -------------------------------------------------------------------------

    def entries(self, folder: str | None = None) -> list[Entry]:
        """All rows, or those of one folder."""
        if folder is not None:
            return list(self.iter_entries(folder))
        return [e for f in sorted(self.folders()) for e in self.iter_entries(f)]

    def iter_entries(self, folder: str) -> Iterator[Entry]:
        """One folder's rows by path, read :data:`CHUNK_ROWS` at a time.

        The lock is held only while a chunk is read: the caller may write to the index (and
        other threads may) between the entries it is given.
        """
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM sources WHERE folder = ? AND path > ? "
            f"ORDER BY path LIMIT {CHUNK_ROWS}"
        )
        after = b""
        shared: dict[str, str] = {}
        while True:
            with self._lock:
                try:
                    rows = self._conn.execute(sql, (folder, after)).fetchall()
                except sqlite3.DatabaseError as exc:
                    log.error("index read failed (%s); rebuilding it", exc)
                    self._recover()
                    return
            for row in rows:
                try:
                    entry = Entry._of(row, shared)
                except (ValueError, TypeError):
                    continue  # a row this version cannot interpret is simply indexed again
                yield entry
            if len(rows) < CHUNK_ROWS:
                return
            after = rows[-1][1]

    def get(self, folder: str, path: str) -> Entry | None:
        """The row of one source, if indexed."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM sources WHERE folder = ? AND path = ?"
        with self._lock:
            try:
                row = self._conn.execute(sql, (folder, os.fsencode(path))).fetchone()
            except sqlite3.DatabaseError:
                return None
        return Entry._of(row) if row is not None else None

    def folders(self) -> set[str]:
        """Folder ids that have rows."""
        with self._lock:
            try:
                rows = self._conn.execute("SELECT DISTINCT folder FROM sources").fetchall()
            except sqlite3.DatabaseError:
                return set()
        return {str(r[0]) for r in rows}

    def count(self, folder: str | None = None) -> int:
        """Number of rows, or of one folder's rows."""
        with self._lock:
            if folder is None:
                row = self._conn.execute("SELECT COUNT(*) FROM sources").fetchone()
            else:
                row = self._conn.execute(
                    "SELECT COUNT(*) FROM sources WHERE folder = ?", (folder,)
                ).fetchone()
        return int(row[0])

    # -- updates -------------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        """Insert or replace the row of ``entry``'s source."""
        marks = ", ".join("?" * len(_COLUMNS))
        sql = f"INSERT OR REPLACE INTO sources ({', '.join(_COLUMNS)}) VALUES ({marks})"
        self._write(sql, entry._row())

    def remove(self, folder: str, path: str) -> None:
        """Forget one source."""
        self._write(
            "DELETE FROM sources WHERE folder = ? AND path = ?", (folder, os.fsencode(path))
        )

    def remove_folder(self, folder: str) -> None:
        """Forget every source of a folder (the folder left the configuration)."""
        self._write("DELETE FROM sources WHERE folder = ?", (folder,), commit=True)

    def flush(self) -> None:
        """Commit the writes not committed yet (cheap when there are none)."""
        with self._lock:
            if not self._uncommitted or self._closed:
                return
            try:
                self._commit()
            except sqlite3.DatabaseError as exc:
                log.error("index write failed (%s); rebuilding it", exc)
                self._recover()

    def close(self) -> None:
        """Commit what is pending and close the connection; later writes are dropped."""
        self.flush()
        with self._lock:
            self._closed = True
            with suppress(sqlite3.Error):
                self._conn.close()
