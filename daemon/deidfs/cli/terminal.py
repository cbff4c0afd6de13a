"""What the one-shot commands show on a terminal: the progress bar and the summaries of a
run to a destination, shared by ``deidfs anonymize`` and ``deidfs export``."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from deidfs.export.send import SendSummary
from deidfs.export.summary import ExportListener


class Progress:
    """A one-line progress bar on a terminal; does nothing when disabled."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream
        self.enabled = enabled and total > 0
        self.clock = clock
        self.start = clock()
        self.done = 0
        self._last = -1.0
        self._shown = False

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        pct = self.done / self.total
        tail = f" {self.done}/{self.total} {pct:4.0%} {rate:6.0f} files/s"
        width = shutil.get_terminal_size((80, 24)).columns
        bar_width = max(10, min(40, width - len(tail) - 3))
        filled = int(bar_width * pct)
        line = "[" + "#" * filled + "-" * (bar_width - filled) + "]" + tail
        if self.label:
            line = f"{self.label} {line}"
        self.stream.write("\r" + line[: width - 1])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the bar (before printing a line, and at the end)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._last = -1.0


class Terminal(ExportListener):
    """Progress bar and per-file lines on stderr."""

    def __init__(self, quiet: bool, stream: TextIO) -> None:
        self.quiet = quiet
        self.stream = stream
        self.progress: Progress | None = None

    def phase(self, name: str, total: int) -> None:
        self.clear()
        label = "scanning" if name == "scan" else "exporting"
        enabled = self.stream.isatty() and not self.quiet
        self.progress = Progress(total, self.stream, enabled, label=label)

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def file(self, status: str, detail: str, token: str) -> None:
        if status == "failed" or not self.quiet:
            self.clear()
            print(f"deidfs: {status} ({detail}): file {token}", file=self.stream)

    def clear(self) -> None:
        if self.progress is not None:
            self.progress.clear()


def sent_exit_code(
    summary: SendSummary, quiet: bool, command: str = "export", title: str | None = None
) -> int:
    """Print ``summary`` (unless ``quiet``) and the destination's error; the exit code."""
    if not quiet:
        print_send_summary(summary, sys.stdout, title)
    if summary.error:
        print(f"deidfs {command}: {summary.error}", file=sys.stderr)
        print(
            f"deidfs {command}: the files stored are recorded; run the same {command} again "
            "to send the others",
            file=sys.stderr,
        )
        return os.EX_UNAVAILABLE
    return 1 if summary.failed else 0


def print_send_summary(summary: SendSummary, out: TextIO, title: str | None = None) -> None:
    """The summary of an export to a destination, for people; ``title`` names what was
    sent (by default the folder, as ``deidfs export`` says it)."""
    what = title if title is not None else f"deidfs export {summary.folder}"
    print(
        f"{what} (profile {summary.profile}) to destination "
        f"{summary.destination}: {summary.files} files stored there, in {summary.seconds:.2f} s",
        file=out,
    )
    rows = [
        (
            "stored",
            summary.stored,
            f"{summary.warnings} with a warning" if summary.warnings else "",
        ),
        ("already", summary.already, "stored by an earlier run, not sent again"),
        (
            "refused",
            summary.refused_total,
            refused_note(summary.refused),
        ),
        ("failed", summary.failed, "see the manifest; run again to retry them"),
        ("duplicate", summary.duplicates, "same view path as another file; the first is sent"),
        ("skipped", summary.skipped, "dotfiles, partial transfers, links"),
    ]
    print_rows(rows, out)
    if summary.manifest:
        print(f"manifest: {summary.manifest}", file=out)
    elif summary.files and not summary.failed:
        print(f"nothing new: all {summary.files} files were stored already", file=out)
    else:
        print("nothing to send: no file of the selection is served", file=out)


def print_rows(rows: Sequence[tuple[str, int, str]], out: TextIO) -> None:
    """The count rows of a summary, for people: name, count and, for a count above zero,
    its note (the table every one-shot command ends with)."""
    for name, n, note in rows:
        print(f"  {name:<10}{n:>8}" + (f"   {note}" if note and n else ""), file=out)


def refused_note(refused: Iterable[tuple[str, int]]) -> str:
    """``reason n, reason n`` of refused files, for a summary row."""
    return ", ".join(f"{reason} {n}" for reason, n in refused)
