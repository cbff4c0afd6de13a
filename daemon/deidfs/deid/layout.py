"""Names of view files: built from de-identified values only (DESIGN: names never carry PHI)."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._^-]")


class Layout(Enum):
    """How view files are named under ``<mountpoint>/<folder>``."""

    DICOM = "dicom"  #: <PatientID'>/<StudyInstanceUID'>/<SeriesInstanceUID'>/<SOPInstanceUID'>.dcm
    FLAT = "flat"  #: <SOPInstanceUID'>.dcm
    MIRROR = "mirror"  #: the source's relative path (only when an admin asks for it)


def _component(value: object, fallback: str) -> str:
    text = _SAFE_NAME.sub("_", str(value or "").strip())[:128].strip(".")
    return text or fallback


def layout_path(
    ds: Dataset, layout: Layout, source_rel: PurePosixPath | None = None
) -> PurePosixPath:
    """The view path of a de-identified dataset. Only de-identified values are used."""
    sop = ds.get("SOPInstanceUID")
    if layout is not Layout.DICOM:
        return layout_path_of(layout, sop, source_rel=source_rel)
    return layout_path_of(
        layout,
        sop,
        ds.get("PatientID"),
        ds.get("StudyInstanceUID"),
        ds.get("SeriesInstanceUID"),
        source_rel=source_rel,
    )


def layout_path_of(
    layout: Layout,
    sop_instance_uid: object,
    patient_id: object = None,
    study_instance_uid: object = None,
    series_instance_uid: object = None,
    *,
    source_rel: PurePosixPath | None = None,
) -> PurePosixPath:
    """The view path named by de-identified values (as :meth:`Dataset.get` returns them)."""
    sop = _component(sop_instance_uid, "NO_SOP_INSTANCE_UID") + ".dcm"
    if layout is Layout.FLAT:
        return PurePosixPath(sop)
    if layout is Layout.MIRROR:
        if source_rel is None:
            raise ValueError("mirror layout needs the source's relative path")
        return source_rel
    return PurePosixPath(
        _component(patient_id, "NO_PATIENT_ID"),
        _component(study_instance_uid, "NO_STUDY_UID"),
        _component(series_instance_uid, "NO_SERIES_UID"),
        sop,
    )
