"""Synthetic CT files for the benchmarks: one generator, shared by every benchmark.

- :func:`build_tree` writes a tree of realistic CT images with pydicom (about 120 header
  elements, sequences, a private block; distinct pixel bytes per file), grouped by study and
  series: the tree of ``bench_anonymize.py``, ``bench_export.py`` and ``bench_mount.py``.
- :func:`write_instances` writes many distinct instances of the same realistic header fast,
  by patching fixed-width UIDs and patient values into one encoded template (no pydicom per
  file): ``bench_index.py`` indexes 10,000 to 100,000 of them.
- :func:`write_multiframe` writes one large multi-frame CT file (``bench_mount.py --large``).
- :func:`write_minimal_ct` writes one CT file with a minimal header and random 12-bit pixels
  (``bench_pixels.py``).
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ROWS = COLUMNS = 512


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ct_template(rng: random.Random, rows: int = ROWS, columns: int = COLUMNS) -> Dataset:
    """A realistic CT header (about 100 attributes, sequences, a private block)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240312"
    ds.InstanceCreationTime = "101530"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = "20240312"
    ds.SeriesDate = "20240312"
    ds.AcquisitionDate = "20240312"
    ds.ContentDate = "20240312"
    ds.StudyTime = "100512"
    ds.SeriesTime = "101002"
    ds.AcquisitionTime = "101011.250000"
    ds.ContentTime = "101011.250000"
    ds.AccessionNumber = "ACC20240312001"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME MEDICAL SYSTEMS"
    ds.InstitutionName = "Saint Example General Hospital"
    ds.InstitutionAddress = "1 Example Street, Springfield"
    ds.ReferringPhysicianName = "Referrer^Rita^^Dr"
    ds.StationName = "CTSCAN01"
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS WITH CONTRAST"
    ds.ProcedureCodeSequence = Sequence([_code("CTCAP", "L", "CT chest abdomen pelvis")])
    ds.SeriesDescription = "AXIAL 1.25mm SOFT TISSUE"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PerformingPhysicianName = "Performer^Paul"
    ds.OperatorsName = "Tech^Tina"
    ds.ManufacturerModelName = "ScanMaster 128"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedPerformedProcedureStepSequence = Sequence([ref])
    ds.PatientName = "Doe^John^Q"
    ds.PatientID = "PID000001"
    ds.IssuerOfPatientID = "SEGH"
    ds.PatientBirthDate = "19580423"
    ds.PatientSex = "M"
    ds.OtherPatientIDs = "MRN-77-1234"
    ds.PatientAge = "065Y"
    ds.PatientSize = "1.78"
    ds.PatientWeight = "82.5"
    ds.PatientAddress = "22 Acacia Avenue, Springfield"
    ds.PatientComments = "No known allergies"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SN-CT-000451"
    ds.SoftwareVersions = "CT_SW_4.2.1"
    ds.ProtocolName = "CHEST ABD PELVIS ROUTINE"
    ds.ReconstructionDiameter = "380"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "541"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "152"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "250"
    ds.Exposure = "125"
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = "30"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.TableSpeed = 78.75
    ds.TableFeedPerRotation = 39.375
    ds.SpiralPitchFactor = 0.984
    ds.CTDIvol = 12.4
    ds.CTDIPhantomTypeCodeSequence = Sequence(
        [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
    )
    ds.StudyID = "S1001"
    ds.AcquisitionNumber = "1"
    ds.ImagePositionPatient = ["-190.000", "-190.000", "0.000"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = "SN"
    ds.SliceLocation = "0.000"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = ["0.742188", "0.742188"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    ds.RequestingPhysician = "Requester^Rob"
    ds.RequestedProcedureDescription = "CT CAP"
    ds.PerformedProcedureStepStartDate = "20240312"
    ds.PerformedProcedureStepStartTime = "100500"
    ds.PerformedProcedureStepID = "PPS0001"
    ds.PerformedProcedureStepDescription = "CT CHEST ABDOMEN PELVIS"
    attrs = Dataset()
    attrs.RequestedProcedureID = "RP0001"
    attrs.ScheduledProcedureStepID = "SPS0001"
    attrs.ScheduledProcedureStepDescription = "CT CAP with contrast"
    attrs.AccessionNumber = "ACC20240312001"
    ds.RequestAttributesSequence = Sequence([attrs])
    ds.ContrastBolusAgent = "IOHEXOL"
    ds.ContrastBolusRoute = "IV"
    block = ds.private_block(0x0009, "ACME CT PRIVATE 1.0", create=True)
    block.add_new(0x01, "LO", "Scanner room 3")
    block.add_new(0x02, "DS", "1.5")
    block.add_new(0x03, "SH", "PROTOCOL-7")
    block.add_new(0x04, "LO", "Doe^John")
    block.add_new(0x10, "OB", bytes(rng.getrandbits(8) for _ in range(256)))
    return ds


@dataclass(frozen=True)
class Tree:
    """A written tree of synthetic files."""

    root: Path
    files: int
    bytes: int


def build_tree(
    root: Path, n_files: int = 1000, studies: int = 4, series_per_study: int = 2, seed: int = 1
) -> Tree:
    """Write ``n_files`` synthetic 512x512 16-bit CT files under ``root/<study>/<series>/``."""
    rng = random.Random(seed)  # noqa: S311 - synthetic test data, not a secret
    template = ct_template(rng)
    np_rng = np.random.default_rng(seed)
    groups = studies * series_per_study
    total = 0
    pixels_base = np_rng.integers(-1024, 2000, size=(ROWS, COLUMNS), dtype=np.int16)
    for i in range(n_files):
        g = i % groups
        study_no, series_no = divmod(g, series_per_study)
        ds = template.copy()
        ds.PatientID = f"PID{study_no:06d}"
        ds.PatientName = f"Doe^Patient{study_no}"
        ds.StudyInstanceUID = _uid(seed, "study", study_no)
        ds.SeriesInstanceUID = _uid(seed, "series", g)
        ds.FrameOfReferenceUID = _uid(seed, "for", study_no)
        ds.SeriesNumber = series_no + 1
        ds.InstanceNumber = i // groups + 1
        sop = generate_uid(entropy_srcs=[str(seed), "sop", str(i)])
        ds.SOPInstanceUID = sop
        ds.SliceLocation = f"{(i // groups) * 1.25:.3f}"
        # Distinct pixel bytes per file: a rolled base image, so no two files are equal.
        ds.PixelData = np.roll(pixels_base, i, axis=1).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out = root / f"study{study_no:02d}" / f"series{g:02d}" / f"IM{i:05d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        total += out.stat().st_size
    return Tree(root, n_files, total)


def _uid(seed: int, kind: str, n: int) -> str:
    return generate_uid(entropy_srcs=[str(seed), kind, str(n)])


# -- many instances, fast ---------------------------------------------------------------------

#: pydicom's UID root; the rest of each UID is ``<seed>.<kind>.<1e9 + n>`` (fixed width).
_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_KINDS = {"study": 1, "series": 2, "sop": 3, "for": 4}
_MAX_INSTANCES = 8_999_999_999


def _fixed_uid(seed: int, kind: str, n: int) -> str:
    # 1e9 + n: every number has the same width and no leading zero (not allowed in UIDs).
    return f"{_UID_ROOT}{seed}.{_KINDS[kind]}.{1_000_000_000 + n}"


def write_instances(
    root: Path,
    n_files: int,
    *,
    rows: int = ROWS,
    columns: int = COLUMNS,
    per_series: int = 250,
    series_per_study: int = 4,
    seed: int = 1,
) -> Tree:
    """Write ``n_files`` distinct CT instances under ``root/pNNNNNN/sNNNNNN/IMnnnnnnnn.dcm``.

    Every file has the realistic header of :func:`ct_template` with its own SOP Instance
    UID; ``per_series`` files share a series and ``series_per_study`` series a study and
    patient (PatientID, PatientName, Study and Frame of Reference UIDs). One header is
    encoded with pydicom; each file is that header with the fixed-width UIDs and patient
    values replaced, followed by the same ``rows`` x ``columns`` 16-bit pixel data, so
    100,000 small files take seconds to write.
    """
    if not 0 < n_files <= _MAX_INSTANCES:
        raise ValueError(f"n_files must be 1..{_MAX_INSTANCES}")
    rng = random.Random(seed)  # noqa: S311 - synthetic test data, not a secret
    ds = ct_template(rng, rows, columns)
    # Placeholders: the values of instance 0, series 0, study 0 (distinct, fixed width).
    holders = {
        "sop": _fixed_uid(seed, "sop", 0),
        "series": _fixed_uid(seed, "series", 0),
        "study": _fixed_uid(seed, "study", 0),
        "for": _fixed_uid(seed, "for", 0),
        "pid": "PID000000",
        "name": "Doe^Patient000000",
    }
    ds.SOPInstanceUID = holders["sop"]
    ds.SeriesInstanceUID = holders["series"]
    ds.StudyInstanceUID = holders["study"]
    ds.FrameOfReferenceUID = holders["for"]
    ds.PatientID = holders["pid"]
    ds.PatientName = holders["name"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    np_rng = np.random.default_rng(seed)
    pixels = np_rng.integers(-1024, 2000, size=(rows, columns), dtype=np.int16).tobytes()
    ds.PixelData = b""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = holders["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    encoded = buf.getvalue()
    # The empty Pixel Data element ends the file: (7FE0,0010) OW, reserved, length 0.
    empty_pixels = b"\xe0\x7f\x10\x00OW\x00\x00\x00\x00\x00\x00"
    if not encoded.endswith(empty_pixels):
        raise RuntimeError("unexpected template encoding")
    header = encoded[: -len(empty_pixels)]
    pixel_element = b"\xe0\x7f\x10\x00OW\x00\x00" + len(pixels).to_bytes(4, "little") + pixels
    for value in holders.values():
        if header.count(value.encode()) == 0:
            raise RuntimeError("placeholder missing from the template")
    total = 0
    made: set[Path] = set()
    for i in range(n_files):
        series = i // per_series
        study = series // series_per_study
        values = {
            "sop": _fixed_uid(seed, "sop", i),
            "series": _fixed_uid(seed, "series", series),
            "study": _fixed_uid(seed, "study", study),
            "for": _fixed_uid(seed, "for", study),
            "pid": f"PID{study:06d}",
            "name": f"Doe^Patient{study:06d}",
        }
        data = header
        for key, value in values.items():
            data = data.replace(holders[key].encode(), value.encode())
        directory = root / f"p{study:06d}" / f"s{series:06d}"
        if directory not in made:
            directory.mkdir(parents=True, exist_ok=True)
            made.add(directory)
        path = directory / f"IM{i:08d}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            view = memoryview(pixel_element)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        total += len(data) + len(pixel_element)
    return Tree(root, n_files, total)


def write_multiframe(
    path: Path, frames: int, *, rows: int = ROWS, columns: int = COLUMNS, seed: int = 1
) -> int:
    """Write one multi-frame CT file of ``frames`` 16-bit frames (the realistic header of
    :func:`ct_template`); the pixel data is streamed, never held whole. Returns its size."""
    rng = random.Random(seed)  # noqa: S311 - synthetic test data, not a secret
    ds = ct_template(rng, rows, columns)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = _uid(seed, "multiframe", frames)
    ds.StudyInstanceUID = _uid(seed, "multiframe-study", 0)
    ds.SeriesInstanceUID = _uid(seed, "multiframe-series", 0)
    ds.FrameOfReferenceUID = _uid(seed, "multiframe-for", 0)
    ds.NumberOfFrames = frames
    ds.PixelData = b""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    encoded = buf.getvalue()
    empty_pixels = b"\xe0\x7f\x10\x00OW\x00\x00\x00\x00\x00\x00"
    if not encoded.endswith(empty_pixels):
        raise RuntimeError("unexpected template encoding")
    frame_bytes = rows * columns * 2
    base = np.random.default_rng(seed).integers(-1024, 2000, size=(rows, columns), dtype=np.int16)
    with open(path, "wb") as f:
        f.write(encoded[: -len(empty_pixels)])
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * frame_bytes).to_bytes(4, "little"))
        for i in range(frames):
            f.write(np.roll(base, i, axis=0).tobytes())  # distinct frames
        return f.tell()


# -- a minimal CT file --------------------------------------------------------------------------


def write_minimal_ct(path: Path, rng: np.random.Generator, n: int) -> None:
    """One 512x512 CT file with a minimal header and random 12-bit pixels, new UIDs."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = f"Bench^Patient{n % 7}"
    ds.PatientID = f"PID{n % 7:04d}"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20240312"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.InstanceNumber = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
