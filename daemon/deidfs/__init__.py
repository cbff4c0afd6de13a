"""deidfs: DICOM folders served as a read-only, de-identified FUSE mount."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
