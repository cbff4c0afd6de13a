"""What the daemon reports: the status of each folder and of the whole service, and the
outcome of a reload, as served by ``deidfs status``, the control socket and ``STATUS=``.

Plain data with a ``to_json`` each; nothing here reads a file or holds a lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from deidfs import __version__


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """One folder's numbers, for ``deidfs status``, the control socket and metrics."""

    id: str
    profile: str
    layout: str
    visible: int
    duplicates: int
    refused: tuple[tuple[str, int], ...]  #: (reason, count), sorted by reason
    bytes: int
    watch: str  #: "inotify" or "poll"
    watch_healthy: bool
    settling: int  #: files seen by the watcher, not yet settled
    watch_degraded: str = ""  #: why the folder is polled although inotify was wanted
    directories: int = 0
    missed: int = 0  #: files reconciliation found that no event had reported
    events: tuple[tuple[str, int], ...] = ()  #: observer events by type
    overflows: int = 0  #: inotify queue overflows (events lost, folder rescanned)
    last_overflow_age: float | None = None  #: seconds since the last one

    @property
    def refused_total(self) -> int:
        """Withheld sources, all reasons."""
        return sum(n for _, n in self.refused)


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """How a configuration load or reload ended. Messages carry no PHI."""

    ok: bool
    trigger: str  #: "start", "signal", "control" or "file"
    finished_at: float  #: Unix time
    sha256: str = ""  #: of the file that was read ("" if it could not be read)
    errors: tuple[str, ...] = ()  #: ``file:line: key: message`` per problem
    warnings: tuple[str, ...] = ()  #: settings kept at their running value, and why
    changes: tuple[str, ...] = ()  #: what was applied, one line each

    def to_json(self) -> dict[str, Any]:
        """The wire form (control socket)."""
        return {
            "ok": self.ok,
            "trigger": self.trigger,
            "finished_at": self.finished_at,
            "sha256": self.sha256,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "changes": list(self.changes),
        }


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """A snapshot of the running daemon. Carries no path but the mountpoint and config file."""

    mountpoint: str
    mounted: bool
    libfuse: str
    folders: tuple[FolderStatus, ...]
    backlog: int  #: sources queued for indexing or being indexed
    rendered: int  #: sources parsed since start
    reused: int  #: sources taken from the index without parsing
    open_files: int
    cache_bytes: int
    cache_entries: int
    stale_opens: int  #: opens or reads refused because the source had changed
    uptime_seconds: float
    ready: bool = False
    config_path: str = ""
    config_sha256: str = ""
    last_reload: ReloadOutcome | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    #: pydicom warnings by category (their text is never logged: it may quote values)
    pydicom_warnings: tuple[tuple[str, int], ...] = ()
    open_limit: int = 0  #: views that may be open at once (each holds its source open)
    refused_opens: int = 0  #: opens refused for want of a file descriptor
    #: renders running for more than a second: (folder id, file token, seconds so far)
    rendering: tuple[tuple[str, str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The wire form of ``status`` on the control socket (``deidfs status --json``)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(self.uptime_seconds, 3),
            "ready": self.ready,
            "mount": {
                "mountpoint": self.mountpoint,
                "mounted": self.mounted,
                "libfuse": self.libfuse,
            },
            "config": {"path": self.config_path, "sha256": self.config_sha256},
            "last_reload": self.last_reload.to_json() if self.last_reload else None,
            "folders": [
                {
                    "id": f.id,
                    "profile": f.profile,
                    "layout": f.layout,
                    "visible": f.visible,
                    "duplicates": f.duplicates,
                    "bytes": f.bytes,
                    "withheld": dict(f.refused),
                    "withheld_total": f.refused_total,
                    "watch": {
                        "kind": f.watch,
                        "healthy": f.watch_healthy,
                        "degraded": f.watch_degraded,
                        "settling": f.settling,
                        "directories": f.directories,
                        "overflows": f.overflows,
                        "last_overflow_seconds_ago": (
                            None if f.last_overflow_age is None else round(f.last_overflow_age, 1)
                        ),
                    },
                }
                for f in self.folders
            ],
            "index": {
                "backlog": self.backlog,
                "rendered": self.rendered,
                "reused": self.reused,
                "in_progress": [
                    {"folder": fid, "file": token, "seconds": round(seconds, 1)}
                    for fid, token, seconds in self.rendering
                ],
            },
            "fuse": {
                "open_files": self.open_files,
                "open_limit": self.open_limit,
                "refused_opens": self.refused_opens,
                "stale_opens": self.stale_opens,
            },
            "cache": {
                "bytes": self.cache_bytes,
                "entries": self.cache_entries,
                "hits": self.cache_hits,
                "misses": self.cache_misses,
            },
            "warnings": {"pydicom": dict(self.pydicom_warnings)},
        }
