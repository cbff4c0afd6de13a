"""Permanent anonymized copies: to a directory or to DICOM nodes (C-STORE, STOW-RS).

Owns selection, the atomic writer, worker processes, claims, manifests and confinement.
May import deidfs.view, deidfs.config, deidfs.deid, deidfs.ops and deidfs.errors.
"""

from __future__ import annotations
