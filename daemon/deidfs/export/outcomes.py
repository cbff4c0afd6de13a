"""How each view an export wrote ended.

An :class:`Outcome` says what became of one view on disk (written, replaced, unchanged, or
pending in its temporary file while another source may claim its target); a :class:`Result`
is that outcome for the view submitted under a key, with its size, path, temporary file,
error and digest.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from deidfs.export.errors import ExportError


class Outcome(Enum):
    """How one view ended on disk."""

    WRITTEN = "written"  #: a new file
    REPLACED = "replaced"  #: an existing file with other bytes was replaced
    UNCHANGED = "unchanged"  #: an identical file was already there
    PENDING = "pending"  #: written to ``Result.temp``; the target exists (``replace=False``)


@dataclass(frozen=True, slots=True)
class Result:
    """What became of the view submitted under ``key``; ``error`` set when it failed."""

    key: Hashable
    outcome: Outcome | None
    size: int
    relpath: PurePosixPath
    temp: Path | None = None  #: the temporary file of a ``PENDING`` view
    error: ExportError | None = None
    sha256: str = ""  #: of the bytes written (``digest=True``; not for ``UNCHANGED``)
