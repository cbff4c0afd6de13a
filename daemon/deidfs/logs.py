"""Logging set-up: stderr, one event per line, journald priority prefixes under systemd.

No log line carries PHI: callers log folder ids and short keyed file tokens, never values
or raw source paths.
"""

from __future__ import annotations

import logging
import os
import sys

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


class ThirdPartyRedactor(logging.Filter):
    """Replace the text of third-party records, which may carry raw paths.

    watchdog logs the watched root and snapshot errors with their paths; pydicom's
    warnings quote element values. Their level and origin are kept; the message is replaced
    by its logger name and level.
    """

    PREFIXES = ("watchdog", "mfusepy", "fuse", "pydicom", "py.warnings")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.PREFIXES):
            record.msg = "%s reported a %s event (details withheld: may name paths)"
            record.args = (record.name, record.levelname.lower())
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once for the CLI or the daemon."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ThirdPartyRedactor())
    if _under_journald():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (pydicom's quote element values) go through logging and its redactor.
    logging.captureWarnings(True)
