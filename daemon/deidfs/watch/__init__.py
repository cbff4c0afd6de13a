"""Watching folders: inotify (or polling) events and scans turned into index work.

Owns deciding when a source is settled and what changed; it renders nothing itself.
May import deidfs.config and deidfs.errors; the daemon wires it to the index.
"""

from __future__ import annotations
