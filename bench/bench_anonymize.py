"""Benchmark ``deidfs anonymize`` against ``cp -r`` and dicognito on synthetic CT files.

See ``bench/README.md``. Builds a tree of synthetic CT files, reads it once to warm the page
cache, then runs each tool once on it, and prints files/s, MB/s and ratios against ``cp -r``
and dicognito, all measured in this one run on the same tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ROWS = COLUMNS = 512


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ct_template(rng: random.Random) -> Dataset:
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
    ds.Rows = ROWS
    ds.Columns = COLUMNS
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


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: float
    files_out: int


def _count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _warm(root: Path) -> None:
    """Read every file once, as ``cat`` would, so every tool starts from a warm page cache."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass


def _timed(name: str, argv: list[str], out: Path, env: dict[str, str] | None = None) -> Timing:
    subprocess.run(["sync"], check=True)  # earlier runs' dirty pages must not slow this one
    start = time.monotonic()
    proc = subprocess.run(argv, check=False, capture_output=True, env=env)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    return Timing(name, seconds, _count_files(out))


def _deidfs_argv(src: Path, out: Path, key: Path, extra: list[str]) -> list[str]:
    # The console script next to this interpreter, as a user runs it.
    exe = shutil.which("deidfs", path=str(Path(sys.executable).parent)) or "deidfs"
    argv = [exe, "anonymize", str(src), "--profile", "Basic", "--to", str(out)]
    return [*argv, "--key-file", str(key), "--quiet", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000, help="number of files (1000)")
    parser.add_argument("--studies", type=int, default=4, help="studies (4)")
    parser.add_argument("--series", type=int, default=2, help="series per study (2)")
    parser.add_argument(
        "--workdir", help="where the tree and outputs go (default: $TMPDIR); same disk for all"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-dicognito", action="store_true", help="skip dicognito")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.monotonic()
        tree = build_tree(src, args.files, args.studies, args.series)
        print(
            f"built {tree.files} files, {tree.bytes / 1e6:.0f} MB in "
            f"{time.monotonic() - t0:.1f} s under {work}"
        )
        key = work / "secret.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        _warm(src)

        timings: list[Timing] = []
        out = work / "out-cp"
        timings.append(_timed("cp -r", ["cp", "-r", str(src), str(out)], out))
        out = work / "out-cp-sync"
        timings.append(_timed("cp -r; sync", ["sh", "-c", f"cp -r '{src}' '{out}' && sync"], out))
        out = work / "out-deidfs"
        timings.append(_timed("deidfs anonymize", _deidfs_argv(src, out, key, []), out))
        out = work / "out-deidfs-nofsync"
        timings.append(
            _timed(
                "deidfs anonymize --no-fsync",
                _deidfs_argv(src, out, key, ["--no-fsync"]),
                out,
            )
        )
        if not args.no_dicognito:
            if importlib.util.find_spec("dicognito") is None:
                print("dicognito is not installed (pip install -e '.[bench]'): skipped")
            else:
                out = work / "out-dicognito"
                # `python -m dicognito`: the console script of dicognito 0.19.0 fails to start.
                argv_d = [sys.executable, "-m", "dicognito", "--quiet", "--seed", "bench"]
                argv_d += ["--output-directory", str(out), str(src)]
                timings.append(_timed("dicognito", argv_d, out))
        _table(timings, tree)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _table(timings: list[Timing], tree: Tree) -> None:
    by_name = {t.name: t for t in timings}
    cp = by_name["cp -r"]
    dicognito = by_name.get("dicognito")
    print()
    header = f"{'tool':<30}{'seconds':>9}{'files':>7}{'files/s':>9}{'MB/s':>8}"
    header += f"{'x cp -r':>9}{'x dicognito':>13}"
    print(header)
    print("-" * len(header))
    for t in timings:
        vs_cp = cp.seconds / t.seconds
        vs_dicognito = f"{dicognito.seconds / t.seconds:13.2f}" if dicognito else f"{'-':>13}"
        print(
            f"{t.name:<30}{t.seconds:9.2f}{t.files_out:7d}{tree.files / t.seconds:9.0f}"
            f"{tree.bytes / 1e6 / t.seconds:8.0f}{vs_cp:9.2f}{vs_dicognito}"
        )
    print()
    print("ratios are throughput ratios (the other tool's time / this tool's time) on the same")
    print(f"tree of {tree.files} files, {tree.bytes / 1e6:.0f} MB, measured in this one run")


if __name__ == "__main__":
    raise SystemExit(main())
