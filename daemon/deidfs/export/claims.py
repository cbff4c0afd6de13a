"""Sources of one export that name the same target.

Several sources may render to one output name (the same SOP Instance UID in two files).
:class:`Claims` records the names claimed in a batch and settles them as the mount does: the
first source by path wins and is put in place from its pending temporary file, the others
end "duplicate" and their temporary files are discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath

from deidfs.export.errors import ExportError
from deidfs.export.outcomes import Outcome
from deidfs.export.workers import (
    FileResult,
)
from deidfs.export.writer import ExportWriter


# -- claims: sources that name one target -------------------------------------------------------
class Claims:
    """Output names claimed in a batch; settles sources that name the same target.

    Parameters
    ----------
    paths
        The source path of each item index: the first by path wins a target, as in the
        mount, so the choice is the same on every run.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths
        self.by_relpath: dict[str, list[FileResult]] = {}

    def add(self, res: FileResult) -> None:
        """Record a rendered file (any status but "refused" and "failed")."""
        self.by_relpath.setdefault(res.relpath, []).append(res)

    def settle(self, writer: ExportWriter) -> list[FileResult]:
        """Put the winner of each target in place; the final result of every claim.

        Losers end "duplicate"; a pending winner ends "written" or "replaced", or "failed"
        when it cannot be renamed.
        """
        final: list[FileResult] = []
        for relpath, claims in self.by_relpath.items():
            claims.sort(key=lambda c: self.paths[c.index])
            winner, losers = claims[0], claims[1:]
            for loser in losers:
                if loser.temp:
                    writer.discard(Path(loser.temp))
                final.append(replace(loser, status="duplicate", temp=""))
            if winner.status == Outcome.PENDING.value:
                # A loser that finished first created the target in this very run: the
                # winner then replaces only that, and the run wrote the file (the outcome
                # must not depend on which of the two finished first).
                created = any(loser.status == Outcome.WRITTEN.value for loser in losers)
                try:
                    outcome = writer.settle(Path(winner.temp), PurePosixPath(relpath))
                    if created and outcome is Outcome.REPLACED:
                        outcome = Outcome.WRITTEN
                    winner = replace(winner, status=outcome.value, temp="")
                except ExportError as exc:
                    winner = replace(
                        winner,
                        status="failed",
                        detail=str(exc),
                        reason=exc.reason,
                        temp="",
                        fatal=exc.fatal,
                    )
            final.append(winner)
        self.by_relpath.clear()
        writer.finish()
        return final

    def in_place(self) -> list[FileResult]:
        """Claims whose file is under its name already (not pending), for a stopped run."""
        return [
            claim
            for claims in self.by_relpath.values()
            for claim in claims
            if claim.status != Outcome.PENDING.value
        ]

    def discard_pending(self, writer: ExportWriter) -> None:
        """Remove the temporary files of every pending claim (the run is interrupted)."""
        for claims in self.by_relpath.values():
            for claim in claims:
                if claim.temp:
                    writer.discard(Path(claim.temp))
        self.by_relpath.clear()
