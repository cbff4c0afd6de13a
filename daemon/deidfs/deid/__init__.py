"""The pure de-identification core (PS3.15 Annex E).

Nothing in this package does I/O beyond reading its own package data: no files of the
caller's, sockets, threads, clocks, logging handlers or metrics. It takes a parsed dataset
and returns a new one with a PHI-free report; the edges count and log.
May import pydicom, numpy and deidfs.errors only (tests/test_layout.py checks it).
"""

from __future__ import annotations
