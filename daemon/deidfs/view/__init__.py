"""What bytes a served file has: the renderer (fast path and reference path), the index,
the view tree and open views (tree, handles), all without FUSE.

Owns rendering a source into a view (header, pixel ranges, trailer) and reading it back.
May import deidfs.deid, deidfs.ops (metrics, logs) and deidfs.errors; never an edge above.
"""

from __future__ import annotations
