"""The daemon: composition of watch, view, mount and export; lifecycle and reload.

Owns folder set, index work queue, reloads, status and the run loop.
May import every package but deidfs.cli.
"""

from __future__ import annotations
