"""Logging set-up: stderr, one event per line, journald priority prefixes under systemd.

No log line carries PHI: callers log folder ids and short keyed file tokens, never values
or raw source paths.

pydicom's warnings quote element values and file paths, so their text is never written.
Instead :class:`LibraryWarnings` sorts each into a bounded category derived from the
message's template (:func:`warning_category`), counts it, and logs the first of each
category with the keyed token of the file being read (set by :func:`source_token`);
the daemon shows the counts in ``deidfs status`` and ``deidfs_pydicom_warnings_total``,
a command prints them when it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping

_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _under_journald() -> bool:
    """True when stderr is the journal stream systemd handed us (daemon(7) JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JournalFormatter(logging.Formatter):
    """``<N>`` priority prefix; journald adds the time and host itself."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


#: pydicom message templates -> category (first match wins). The patterns look at the fixed
#: words of each template only; what pydicom fills in (values, tags, paths) never leaves.
_CATEGORIES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), category)
    for pattern, category in (
        (r"^Invalid value for VR", "invalid_value"),
        (r"is not valid for elements with a VR of", "invalid_value"),
        (r"^Values for elements with a VR of 'DS' must be", "invalid_value"),
        (r"doesn't allow a value of '60'", "invalid_value"),
        (r"^The value length \(\d+\) exceeds the maximum length", "value_too_long"),
        (r"exceeds the size of 64 kByte", "value_too_long"),
        (r"^Expected (explicit|implicit) VR, but found", "vr_encoding_mismatch"),
        (r"^Unknown VR", "unknown_vr"),
        (r"^VR lookup failed", "unknown_vr"),
        (r"^Unknown DICOM tag", "unknown_tag"),
        (r"Setting VR to 'UN'", "wrong_length"),
        (r"^Expected length", "wrong_length"),
        (r"^Expected 0x00000000 after delimiter", "bad_delimiter"),
        (r"^Expected (sequence item|Item) with tag", "bad_item"),
        (r"(?i)end of file|unexpected end|premature end", "premature_end"),
        (r"^(Unknown encoding|Incorrect value for Specific Character Set)", "character_set"),
        (r"Specific Character Set does not allow code extensions", "character_set"),
        (r"cannot be used as code extension", "character_set"),
        (r"^Found unknown escape sequence", "character_set"),
        (r"^Failed to (decode|encode)", "character_set"),
        (r"overlay data", "overlay_length"),
        (r"encapsulated pixel data", "encapsulated_pixel_data"),
        (r"will be removed in v\d|is deprecated", "deprecated"),
        (r"^Deferred read warning", "file_changed"),
    )
)
#: The category of a message that matches no template.
OTHER_CATEGORY = "other"
#: Every category :func:`warning_category` can return (bounded metric label values).
WARNING_CATEGORIES = tuple(sorted({c for _, c in _CATEGORIES} | {OTHER_CATEGORY}))

_source: contextvars.ContextVar[str] = contextvars.ContextVar("deidfs_source_token", default="-")
#: Per thread: the text of the last pydicom record counted, to drop its ``warnings`` twin.
_last_counted = threading.local()


def warning_category(message: str) -> str:
    """The bounded category of a pydicom warning message, from its template.

    Parameters
    ----------
    message : str
        The message as pydicom wrote it (it may quote values and paths: it is only matched).

    Returns
    -------
    str
        One of :data:`WARNING_CATEGORIES`.
    """
    for pattern, category in _CATEGORIES:
        if pattern.search(message):
            return category
    return OTHER_CATEGORY


@contextlib.contextmanager
def source_token(token: str) -> Iterator[None]:
    """Name the file read meanwhile (on this thread) by its keyed token in warning lines."""
    reset = _source.set(token)
    try:
        yield
    finally:
        _source.reset(reset)


class LibraryWarnings(logging.Handler):
    """Counts pydicom's warnings by category; logs the first of each with a file token.

    Installed on the ``pydicom`` logger (which then no longer propagates) by
    :meth:`install`. pydicom sends each warning both to its logger and to
    :mod:`warnings`; the logger's record is the one counted, and :class:`ThirdPartyRedactor`
    drops the twin that :func:`logging.captureWarnings` would print.
    """

    def __init__(self, *, log_first: bool = True) -> None:
        super().__init__(logging.WARNING)
        self._counts: dict[str, int] = {}
        self._count_lock = threading.Lock()
        #: False in a worker process: its parent takes the counts and logs them.
        self._log_first = log_first

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: still counted
            message = ""
        _last_counted.message = message
        category = warning_category(message)
        with self._count_lock:
            seen = self._counts.get(category, 0)
            self._counts[category] = seen + 1
        if not seen and self._log_first:
            self._log_category(category, record.levelname.lower(), _source.get())

    @staticmethod
    def _log_category(category: str, level: str, token: str) -> None:
        _log.warning(
            "pydicom warning: category=%s level=%s file=%s; further ones of this "
            "category are counted, not logged (their text may quote values or paths)",
            category,
            level,
            token,
        )

    def counts(self) -> dict[str, int]:
        """Warnings counted so far, by category."""
        with self._count_lock:
            return dict(self._counts)

    def take(self) -> dict[str, int]:
        """The counts so far, by category, and start again from none (a worker process
        hands them to its parent after each file)."""
        with self._count_lock:
            counts, self._counts = self._counts, {}
        return counts

    def add(self, counts: Mapping[str, int], token: str) -> None:
        """Count warnings another process counted (:meth:`take`) while reading the file
        ``token`` names; the first of each category is logged as :meth:`emit` logs it."""
        for name, n in counts.items():
            if n <= 0:
                continue
            # Bounded, whatever the other process sent.
            category = name if name in WARNING_CATEGORIES else OTHER_CATEGORY
            with self._count_lock:
                seen = self._counts.get(category, 0)
                self._counts[category] = seen + n
            if not seen and self._log_first:
                self._log_category(category, "warning", token)

    def summary(self) -> str:
        """``invalid_value 3, vr_encoding_mismatch 1``; "" when there were none."""
        return ", ".join(f"{c} {n}" for c, n in sorted(self.counts().items()))

    def log_summary(self) -> None:
        """Log the counts once, if any (a command's last line)."""
        text = self.summary()
        if not text:
            return
        # Called at exit, when a handler's stream may be closed already (a test harness's
        # capture): then the line is dropped rather than reported as a logging error.
        saved = logging.raiseExceptions
        logging.raiseExceptions = False
        try:
            _log.warning("pydicom warnings in all: %s", text)
        finally:
            logging.raiseExceptions = saved

    def install(self) -> None:
        """Take over the ``pydicom`` logger: its records are counted here, not written."""
        lib_log = logging.getLogger("pydicom")
        for old in [h for h in lib_log.handlers if isinstance(h, LibraryWarnings)]:
            lib_log.removeHandler(old)
        lib_log.addHandler(self)
        lib_log.setLevel(logging.WARNING)
        lib_log.propagate = False

    def uninstall(self) -> None:
        """Give the ``pydicom`` logger back (its records propagate again)."""
        lib_log = logging.getLogger("pydicom")
        lib_log.removeHandler(self)
        lib_log.propagate = True


_log = logging.getLogger(__name__)


class ThirdPartyRedactor(logging.Filter):
    """Replace the text of third-party records, which may carry raw paths.

    watchdog logs the watched root and snapshot errors with their paths; pydicom's
    warnings quote element values; dask.distributed's errors may quote a task's data.
    Their level and origin are kept; the message is replaced by its logger name and level.
    """

    PREFIXES = ("watchdog", "mfusepy", "fuse", "pydicom", "py.warnings", "distributed")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            last = getattr(_last_counted, "message", "")
            if last and last in record.getMessage():
                _last_counted.message = ""
                return False  # the twin of a pydicom record counted by LibraryWarnings
        if record.name.startswith(self.PREFIXES):
            record.msg = "%s reported a %s event (details withheld: may name paths)"
            record.args = (record.name, record.levelname.lower())
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: int = logging.INFO, tally: LibraryWarnings | None = None) -> None:
    """Configure the root logger once for the CLI or the daemon.

    pydicom's warnings are counted by category (:class:`LibraryWarnings`) rather than
    written one by one; the counts are logged once when the process ends. A worker process
    passes its own ``tally``, whose counts it hands to its parent: no summary is logged.
    """
    for tallied in list(logging.getLogger("pydicom").handlers):
        if isinstance(tallied, LibraryWarnings):
            atexit.unregister(tallied.log_summary)
            tallied.uninstall()
    if tally is None:
        tally = LibraryWarnings()
        atexit.register(tally.log_summary)
    tally.install()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ThirdPartyRedactor())
    if _under_journald():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (pydicom's quote element values) go through logging and its redactor.
    logging.captureWarnings(True)
