"""The ``deidfs`` command line: the only layer that prints."""

from __future__ import annotations
