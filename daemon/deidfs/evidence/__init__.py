"""Evidence for a privacy officer: the profile report and verify of what is served.

Owns findings (leaks, kept identifiers, repertoire failures) and the report tables.
May import deidfs.export, deidfs.view, deidfs.config, deidfs.deid, deidfs.ops, deidfs.errors.
"""

from __future__ import annotations
