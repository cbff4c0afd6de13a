"""The FUSE mount: translation between libfuse (through mfusepy) and the view.

Owns the view tree, open handles and the mfusepy operations; it renders nothing itself.
May import deidfs.view, deidfs.deid, deidfs.ops and deidfs.errors; not export, watch or cli.
"""

from __future__ import annotations
