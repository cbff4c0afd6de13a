"""What an export did, and how it is told as it goes.

An :class:`ExportSummary` counts the files of one export (written, replaced, unchanged,
refused, failed), its bytes and seconds, and names its manifest; it carries no original
identifier and no source path, and travels as JSON over the control socket. An
:class:`ExportListener` hears each file as it settles; :class:`ExportStopped` is an export
that stopped before its end, with the summary of what was done. The JSON fields of a
summary are read back by :func:`json_count`, :func:`json_refused` and :func:`json_seconds`,
here and for :class:`deidfs.export.send.SendSummary`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deidfs.export.errors import ExportError


class ExportStopped(ExportError):
    """The export stopped before its end: the output failed (full, read-only) or it was
    cancelled. Files already in place are complete; no temporary file is left.

    ``summary`` tells what was done before the stop.
    """

    def __init__(
        self,
        message: str,
        errno_: int | None = None,
        *,
        summary: ExportSummary | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message, errno_)
        self.summary = summary
        if exit_code is not None:
            self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What one export did. Carries no original identifier and no source path.

    ``files`` counts the files of the selection now in place (written, replaced or
    unchanged); ``written`` includes ``replaced``; ``bytes`` are those of files written.
    """

    folder: str
    profile: str
    plan_digest: str
    destination: str  #: ``<export_dir or --to>/<folder>``
    sources: int  #: files found in the folder
    selected: int  #: sources handed to the writer (the selection, or every source)
    files: int = 0  #: files of the selection in place after this export
    written: int = 0
    replaced: int = 0
    unchanged: int = 0
    failed: int = 0
    duplicates: int = 0
    skipped: int = 0  #: dotfiles, partial transfers, links, special files
    refused: tuple[tuple[str, int], ...] = ()  #: (reason, count), sorted by reason
    bytes: int = 0
    seconds: float = 0.0
    manifest: str = ""  #: path of the manifest written, "" when none was
    complete: bool = True  #: False when the export stopped early

    @property
    def refused_total(self) -> int:
        """Sources withheld by the profile (fail closed), all reasons."""
        return sum(n for _, n in self.refused)

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object (the control socket's ``export`` result)."""
        return {
            "folder": self.folder,
            "destination": self.destination,
            "files": self.files,
            "written": self.written,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "bytes": self.bytes,
            "replaced": self.replaced,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "refused": dict(self.refused),
            "sources": self.sources,
            "selected": self.selected,
            "profile": self.profile,
            "plan_digest": self.plan_digest,
            "seconds": round(self.seconds, 3),
            "manifest": self.manifest,
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportSummary:
        """Read :meth:`to_json`'s form back; missing or odd fields count as zero."""

        def num(key: str) -> int:
            return json_count(data, key)

        return cls(
            folder=str(data.get("folder", "")),
            profile=str(data.get("profile", "")),
            plan_digest=str(data.get("plan_digest", "")),
            destination=str(data.get("destination", "")),
            sources=num("sources"),
            selected=num("selected"),
            files=num("files"),
            written=num("written"),
            replaced=num("replaced"),
            unchanged=num("unchanged"),
            failed=num("failed"),
            duplicates=num("duplicates"),
            skipped=num("skipped"),
            refused=json_refused(data),
            bytes=num("bytes"),
            seconds=json_seconds(data),
            manifest=str(data.get("manifest", "")),
            complete=data.get("complete", True) is not False,
        )


def json_count(data: Mapping[str, Any], key: str) -> int:
    """The count ``key`` of a summary's JSON form; missing or odd: zero."""
    value = data.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def json_refused(data: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """The ``refused`` counts of a summary's JSON form, (reason, count) sorted by reason."""
    refused = data.get("refused", {})
    if not isinstance(refused, Mapping):  # (reason, count) pairs, as dataclasses.asdict
        refused = {r[0]: r[1] for r in refused if isinstance(r, list | tuple) and len(r) == 2}
    return tuple(sorted((str(k), v) for k, v in refused.items() if isinstance(v, int)))


def json_seconds(data: Mapping[str, Any]) -> float:
    """The ``seconds`` of a summary's JSON form; missing or odd: zero."""
    seconds = data.get("seconds", 0.0)
    return float(seconds) if isinstance(seconds, int | float) else 0.0


class ExportListener:
    """Hooks for progress; the default does nothing. Called in the exporting thread."""

    def phase(self, name: str, total: int) -> None:
        """A phase begins: ``scan`` (matching a selection) or ``export``, of ``total`` files."""

    def advance(self, n: int) -> None:
        """``n`` more files of the current phase are done."""

    def file(self, status: str, detail: str, token: str) -> None:
        """A file was refused or failed; ``token`` is a keyed token of its source path."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
