"""The FUSE mount: translation between libfuse (through mfusepy) and the view.

Owns the mfusepy operations (ops), the libfuse binding and the mount's lifecycle; it renders
and serves nothing itself (the view tree and open views are deidfs.view's).
May import deidfs.view, deidfs.deid, deidfs.ops and deidfs.errors; not export, watch or cli.
"""

from __future__ import annotations
