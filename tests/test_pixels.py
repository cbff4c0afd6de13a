"""Pixel rules: masks, redaction of native and compressed pixel data, the burned-in policy.

Every redaction test goes through :func:`render` and the bytes a reader gets
(:func:`read_view` in odd-sized chunks and :func:`write_view`, which must agree), then decodes
them with pydicom: pixels inside each rectangle are zero, pixels outside equal the original's
decoded pixels exactly (lossy sources too: the original is decoded by the same decoder, and
the re-encoding is lossless).
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from conftest import sample_file
from deidfs.cli import common
from deidfs.cli.main import main
from deidfs.deid.pixels import (
    NativeGeometry,
    PixelDecision,
    PixelPolicy,
    clip,
    decide,
    image_info,
    merge_ranges,
    native_ranges,
)
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, PIXEL, Mask, Profile, Rect
from deidfs.deid.standard import Option
from deidfs.errors import Refused
from leak_corpus import UID_ROOT, Served, make_image, serve, write_source

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


# -- pure core ----------------------------------------------------------------------------------


def _reference_mask(geom: NativeGeometry, rects: list[Rect]) -> np.ndarray:
    covered = np.zeros((geom.rows, geom.columns), dtype=bool)
    for r in rects:
        covered[r.top : r.top + r.height, r.left : r.left + r.width] = True
    return covered


@st.composite
def _geometry_and_rects(draw: st.DrawFn) -> tuple[NativeGeometry, list[Rect]]:
    rows = draw(st.integers(1, 12))
    columns = draw(st.integers(1, 12))
    samples = draw(st.sampled_from([1, 3]))
    geom = NativeGeometry(
        rows=rows,
        columns=columns,
        samples=samples,
        sample_bytes=draw(st.sampled_from([1, 2, 4, 8])),
        planar=draw(st.sampled_from([0, 1])) if samples == 3 else 0,
        frames=draw(st.integers(1, 3)),
    )
    rects = []
    for _ in range(draw(st.integers(1, 3))):
        left = draw(st.integers(0, columns - 1))
        top = draw(st.integers(0, rows - 1))
        width = draw(st.integers(1, columns - left))
        height = draw(st.integers(1, rows - top))
        rects.append(Rect(left, top, width, height))
    return geom, rects


@settings(max_examples=150, deadline=None)
@given(_geometry_and_rects())
def test_native_ranges_cover_exactly_the_rectangles(
    case: tuple[NativeGeometry, list[Rect]],
) -> None:
    geom, rects = case
    ranges = native_ranges(geom, rects)
    assert list(ranges) == merge_ranges(ranges)  # sorted, disjoint, not adjacent
    data = bytearray(np.arange(1, geom.total_bytes + 1, dtype=np.uint64).astype(np.uint8) | 1)
    for a, b in ranges:
        data[a:b] = bytes(b - a)
    dtype = np.dtype(f"<u{geom.sample_bytes}")
    arr = np.frombuffer(bytes(data), dtype=dtype)
    if geom.planar:
        arr = arr.reshape(geom.frames, geom.samples, geom.rows, geom.columns).transpose(0, 2, 3, 1)
    else:
        arr = arr.reshape(geom.frames, geom.rows, geom.columns, geom.samples)
    covered = _reference_mask(geom, rects)
    assert (arr[:, covered, :] == 0).all()
    assert (arr[:, ~covered, :] != 0).all()  # every byte was odd: nothing else was zeroed


def test_merge_ranges_joins_overlaps_and_neighbours() -> None:
    assert merge_ranges([(5, 8), (0, 2), (2, 4), (7, 10), (12, 12)]) == [(0, 4), (5, 10)]


def test_clip_cuts_rectangles_to_the_image() -> None:
    assert clip(Rect(90, 0, 50, 10), 100, 100) == Rect(90, 0, 10, 10)
    assert clip(Rect(100, 0, 5, 5), 100, 100) is None
    assert clip(Rect(0, 99, 5, 5), 100, 100) == Rect(0, 99, 5, 1)


def _info(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Rows = 100
    ds.Columns = 200
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _decision(
    profile: Profile, ds: Dataset, sop_class: str = "1.2.840.10008.5.1.4.1.1.2"
) -> PixelDecision:
    plan = compile_plan(profile)
    return decide(profile, plan.options, image_info(ds, sop_class, EXPLICIT_LE))


def test_policy_table() -> None:
    mask = Mask(rects=(Rect(0, 0, 300, 10),), modality="us", manufacturer="Acme ")
    masked = Profile("M", apply_masks=True, masks=(mask,))
    ct, us = _info(), _info(Modality="US")
    assert _decision(BASIC, ct).policy is PixelPolicy.AS_IS
    assert _decision(BASIC, us).policy is PixelPolicy.AT_RISK
    assert _decision(PIXEL, us).policy is PixelPolicy.WITHHOLD
    assert _decision(PIXEL, ct).policy is PixelPolicy.AS_IS
    assert _decision(PIXEL, _info(BurnedInAnnotation="YES")).policy is PixelPolicy.WITHHOLD
    assert _decision(PIXEL, _info(Modality="US", BurnedInAnnotation="NO")).policy is (
        PixelPolicy.AS_IS
    )
    sc = _info(Modality="")
    assert _decision(PIXEL, sc, "1.2.840.10008.5.1.4.1.1.7").policy is PixelPolicy.WITHHOLD
    d = _decision(masked, us)  # criteria compare case- and blank-insensitively; clipped
    assert d.policy is PixelPolicy.REDACT
    assert d.rects == (Rect(0, 0, 200, 10),)
    assert d.masks == (0,)
    # Masks need apply_masks or Clean Pixel Data; a disabled or non-matching mask is none.
    unapplied = Profile("U", masks=(mask,))
    assert _decision(unapplied, us).policy is PixelPolicy.AT_RISK
    disabled = Profile("D", apply_masks=True, masks=(Mask(rects=mask.rects, enabled=False),))
    assert _decision(disabled, us).policy is PixelPolicy.AT_RISK
    sized = Profile("S", options=frozenset({Option.CLEAN_PIXEL_DATA}), masks=(mask,))
    assert _decision(sized, us).policy is PixelPolicy.REDACT
    outside = Profile("O", apply_masks=True, masks=(Mask(rects=(Rect(500, 500, 5, 5),)),))
    assert _decision(outside, us).policy is PixelPolicy.AT_RISK


# -- redaction through render, read_view and write_view ----------------------------------------


@dataclass(frozen=True)
class Case:
    name: str  #: pydicom test file, or a file made by ``make``
    ts_out: str  #: transfer syntax of the served file
    photometric_out: str
    lossy: bool = False
    make: Callable[[Path], Path] | None = None


def _decoded(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some originals make pydicom warn; not the subject
        arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr.reshape(frames, ds.Rows, ds.Columns, int(ds.SamplesPerPixel))


def _rgb_native(planar: int, frames: int) -> Callable[[Path], Path]:
    """Native RGB, samples interleaved or by plane, from a decoded RLE sample."""

    def make(directory: Path) -> Path:
        name = "SC_rgb_rle_2frame.dcm" if frames > 1 else "SC_rgb_rle.dcm"
        ds = dcmread(sample_file(name))
        arr = _decoded(ds)
        if planar:
            arr = arr.transpose(0, 3, 1, 2)
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds.PlanarConfiguration = planar
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = False
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = directory / f"rgb_planar{planar}_{frames}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return make


CASES = [
    Case("CT_small.dcm", EXPLICIT_LE, "MONOCHROME2"),
    Case("MR_small_implicit.dcm", IMPLICIT_LE, "MONOCHROME2"),
    Case("MR_small_bigendian.dcm", EXPLICIT_BE, "MONOCHROME2"),
    Case("ExplVR_BigEnd.dcm", EXPLICIT_BE, "RGB"),  # ultrasound, RGB by plane, big endian
    Case("examples_rgb_color.dcm", EXPLICIT_LE, "RGB"),
    Case("examples_palette.dcm", EXPLICIT_LE, "PALETTE COLOR"),
    Case("rtdose.dcm", IMPLICIT_LE, "MONOCHROME2"),  # 32-bit, 15 frames
    Case("rgb_planar0_2.dcm", EXPLICIT_LE, "RGB", make=_rgb_native(0, 2)),
    Case("rgb_planar1_2.dcm", EXPLICIT_LE, "RGB", make=_rgb_native(1, 2)),
    Case("SC_ybr_full_422_uncompressed.dcm", EXPLICIT_LE, "RGB", lossy=True),
    Case("image_dfl.dcm", DEFLATED, "MONOCHROME2"),
    Case("MR_small_RLE.dcm", RLE, "MONOCHROME2"),
    Case("SC_rgb_rle_16bit_2frame.dcm", RLE, "RGB"),
    # pydicom's RLE encoders take 8 and 16 bits: 32-bit pixel data is stored native.
    Case("SC_rgb_rle_32bit_2frame.dcm", EXPLICIT_LE, "RGB"),
    Case("rtdose_rle.dcm", EXPLICIT_LE, "MONOCHROME2"),
    Case("MR_small_jp2klossless.dcm", RLE, "MONOCHROME2"),
    Case("MR_small_jpeg_ls_lossless.dcm", RLE, "MONOCHROME2"),
    Case("SC_rgb_jpeg_gdcm.dcm", RLE, "RGB"),  # JPEG Lossless
    Case("SC_rgb_jpeg_dcmtk.dcm", RLE, "RGB", lossy=True),  # JPEG Baseline, YBR_FULL
    Case("SC_rgb_dcmtk_+eb+cy+np.dcm", RLE, "RGB", lossy=True),  # JPEG Baseline, YBR_FULL_422
    Case("JPGExtended.dcm", RLE, "MONOCHROME2", lossy=True),  # 12-bit JPEG Extended
    Case("SC_rgb_jls_lossy_line.dcm", RLE, "RGB", lossy=True),  # JPEG-LS near-lossless
    Case("693_J2KI.dcm", RLE, "MONOCHROME2", lossy=True),  # JPEG 2000 lossy
    Case("examples_jpeg2k.dcm", RLE, "RGB"),  # JPEG 2000 lossless, YBR_RCT, ultrasound
    Case("examples_ybr_color.dcm", RLE, "RGB", lossy=True),  # 30 JPEG frames, ultrasound
]


def _rects_for(rows: int, columns: int) -> tuple[Rect, ...]:
    """Two rectangles: one inside, one band at the bottom running past the right edge."""
    inner = Rect(columns // 4, rows // 5, max(1, columns // 3), max(1, rows // 4))
    band_h = max(1, rows // 6)
    return inner, Rect(0, rows - band_h, columns + 40, band_h)


def _masked_profile(src: Dataset) -> Profile:
    mask = Mask(
        rects=_rects_for(src.Rows, src.Columns),
        modality=str(src.get("Modality", "")) or None,
        rows=int(src.Rows),
        columns=int(src.Columns),
    )
    return Profile("Masked", base="Basic", apply_masks=True, masks=(mask,))


@dataclass(frozen=True)
class Redacted:
    source: Path
    served: Served


_SERVED: dict[str, Redacted] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pixels")


def _redacted(case: Case, workdir: Path) -> Redacted:
    if case.name not in _SERVED:
        if case.make is not None:
            path = case.make(workdir)
        else:
            path = workdir / case.name
            shutil.copyfile(sample_file(case.name), path)
        src = dcmread(path, stop_before_pixels=True, force=True)
        with warnings.catch_warnings():
            # As in production: pydicom warns about odd values of some samples (rtdose).
            warnings.simplefilter("ignore")
            served = serve(path, compile_plan(_masked_profile(src)))
        _SERVED[case.name] = Redacted(path, served)
    return _SERVED[case.name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_masks_zero_the_rectangles_and_nothing_else(case: Case, workdir: Path) -> None:
    r = _redacted(case, workdir)
    original = dcmread(r.source, force=True)
    out = r.served.ds
    view = r.served.view
    assert str(out.file_meta.TransferSyntaxUID) == case.ts_out
    assert out.PhotometricInterpretation == case.photometric_out
    if int(out.SamplesPerPixel) > 1:
        # Patched in place: as the source; decoded and encoded again: interleaved.
        assert out.PlanarConfiguration == (original.PlanarConfiguration if view.zeroed else 0)
    assert out.BurnedInAnnotation == "NO"
    assert out.PatientIdentityRemoved == "YES"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert r.served.view.report.redactions
    if case.lossy:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod
    else:
        assert out.get("LossyImageCompression") in (None, "00")
    before = _decoded(original)
    after = _decoded(out)
    assert after.shape == before.shape
    covered = np.zeros((int(out.Rows), int(out.Columns)), dtype=bool)
    for rect in _rects_for(int(out.Rows), int(out.Columns)):
        covered[rect.top : rect.top + rect.height, rect.left : rect.left + rect.width] = True
    assert (after[:, covered, :] == 0).all()
    assert np.array_equal(after[:, ~covered, :], before[:, ~covered, :])
    native_source = str(original.file_meta.TransferSyntaxUID) in (
        EXPLICIT_LE,
        IMPLICIT_LE,
        EXPLICIT_BE,
    ) and original.PhotometricInterpretation in ("MONOCHROME2", "RGB", "PALETTE COLOR")
    if native_source:
        # Native pixel data: the source range is patched, never held in memory.
        assert view.zeroed
        assert not view.pixels
        assert view.pixel_length
    elif case.ts_out != DEFLATED:
        assert view.pixels
        assert not view.zeroed
        assert not view.pixel_length


@pytest.mark.external
def test_dcmdump_reads_every_redacted_output(workdir: Path) -> None:
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump (DCMTK) is not installed")
    failed = []
    for case in CASES:
        r = _redacted(case, workdir)
        out = workdir / f"{case.name}.served"
        out.write_bytes(r.served.data)
        proc = subprocess.run(
            ["dcmdump", "-q", "+dc", str(out)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or "E: " in proc.stderr:
            failed.append((case.name, proc.stderr[:300]))
    assert not failed


@pytest.mark.external
def test_dcmtk_decodes_the_rle_outputs_to_the_same_pixels(workdir: Path) -> None:
    """An independent RLE decoder (DCMTK's dcmdrle) agrees with pydicom's on our encoding."""
    if shutil.which("dcmdrle") is None:
        pytest.skip("dcmdrle (DCMTK) is not installed")
    checked = 0
    for case in CASES:
        if case.ts_out != RLE:
            continue
        r = _redacted(case, workdir)
        encoded = workdir / f"{case.name}.rle"
        decoded = workdir / f"{case.name}.native"
        encoded.write_bytes(r.served.data)
        proc = subprocess.run(
            ["dcmdrle", str(encoded), str(decoded)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, (case.name, proc.stderr[:300])
        native = dcmread(decoded)
        assert str(native.file_meta.TransferSyntaxUID) != RLE
        assert np.array_equal(_decoded(native), _decoded(r.served.ds)), case.name
        checked += 1
    assert checked >= 10


def test_lossy_attributes_kept_and_method_added(workdir: Path) -> None:
    r = _redacted(next(c for c in CASES if c.name == "SC_rgb_jls_lossy_line.dcm"), workdir)
    # The source says nothing about lossy compression; its transfer syntax does.
    assert "LossyImageCompression" not in dcmread(r.source, stop_before_pixels=True)
    assert r.served.ds.LossyImageCompression == "01"
    assert r.served.ds.LossyImageCompressionMethod == "ISO_14495_1"
    jpeg = _redacted(next(c for c in CASES if c.name == "SC_rgb_jpeg_dcmtk.dcm"), workdir)
    assert jpeg.served.ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_masks_apply_under_clean_pixel_data_without_apply_masks(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    shutil.copyfile(sample_file("CT_small.dcm"), path)
    mask = Mask(rects=(Rect(0, 0, 10, 10),), modality="CT")
    profile = PIXEL.derive("PixelCT", masks=(mask,))
    s = serve(path, compile_plan(profile))
    assert (_decoded(s.ds)[:, :10, :10] == 0).all()
    assert s.ds.BurnedInAnnotation == "NO"


def test_unmasked_view_is_unchanged_bytes(tmp_path: Path) -> None:
    """A mask that does not match leaves the view exactly as without masks."""
    path = tmp_path / "ct.dcm"
    shutil.copyfile(sample_file("CT_small.dcm"), path)
    other = Mask(rects=(Rect(0, 0, 10, 10),), modality="MR")
    with_mask = serve(path, compile_plan(Profile("X", apply_masks=True, masks=(other,))))
    without = serve(path, compile_plan(Profile("X")))
    assert with_mask.data == without.data
    assert not with_mask.view.zeroed
    assert "BurnedInAnnotation" not in with_mask.ds


# -- the burned-in policy -------------------------------------------------------------------------


def test_ultrasound_without_mask_withheld_under_pixel_profile(tmp_path: Path) -> None:
    path = tmp_path / "us.dcm"
    shutil.copyfile(sample_file("examples_rgb_color.dcm"), path)
    with pytest.raises(Refused) as info:
        serve(path, compile_plan(PIXEL))
    assert info.value.reason == "burned_in_no_mask"


def test_ultrasound_without_mask_served_header_only_under_basic(tmp_path: Path) -> None:
    path = tmp_path / "us.dcm"
    shutil.copyfile(sample_file("examples_rgb_color.dcm"), path)
    s = serve(path, compile_plan(BASIC))
    assert s.view.report.burned_in_risk
    assert not s.view.report.redactions
    assert not s.view.zeroed
    assert not s.view.pixels
    source = dcmread(path)
    assert s.ds.PixelData == source.PixelData  # pixels as they are
    assert "BurnedInAnnotation" not in s.ds  # left as it was (absent)
    ct = tmp_path / "ct.dcm"
    shutil.copyfile(sample_file("CT_small.dcm"), ct)
    assert not serve(ct, compile_plan(BASIC)).view.report.burned_in_risk


def test_burned_in_yes_not_claimed_removed_unless_masked(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}601", BurnedInAnnotation="YES", rows=8, columns=8)
    path = write_source(tmp_path, "x.dcm", ds)
    plain = serve(path, compile_plan(BASIC))
    assert plain.ds.BurnedInAnnotation == "YES"
    assert plain.ds.PatientIdentityRemoved == "NO"
    assert plain.view.report.burned_in_risk
    masked = Profile("M", apply_masks=True, masks=(Mask(rects=(Rect(0, 0, 8, 2),)),))
    s = serve(path, compile_plan(masked))
    assert s.ds.BurnedInAnnotation == "NO"
    assert s.ds.PatientIdentityRemoved == "YES"
    assert not s.view.report.burned_in_risk
    assert (_decoded(s.ds)[:, :2, :, :] == 0).all()
    assert np.array_equal(_decoded(s.ds)[:, 2:], _decoded(ds)[:, 2:])


def test_one_bit_pixels_under_a_mask_are_withheld(tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    shutil.copyfile(sample_file("liver_1frame.dcm"), path)
    profile = Profile("M", apply_masks=True, masks=(Mask(rects=(Rect(0, 0, 8, 8),)),))
    with pytest.raises(Refused) as info:
        serve(path, compile_plan(profile))
    assert info.value.reason == "pixel_unsupported"


def test_compressed_redaction_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deidfs.view import reference

    path = tmp_path / "mr.dcm"
    shutil.copyfile(sample_file("MR_small_RLE.dcm"), path)
    monkeypatch.setattr(reference, "MAX_DECODED_BYTES", 1000)
    profile = Profile("M", apply_masks=True, masks=(Mask(rects=(Rect(0, 0, 8, 8),)),))
    with pytest.raises(Refused) as info:
        serve(path, compile_plan(profile))
    assert info.value.reason == "too_large"


# -- Clean Graphics -------------------------------------------------------------------------------


@pytest.mark.parametrize("descriptors", [False, True], ids=["graphics", "graphics+descriptors"])
def test_clean_graphics_keeps_graphics_and_not_their_text(
    tmp_path: Path, descriptors: bool
) -> None:
    ds = make_image(f"{UID_ROOT}602", patient_name="Moriarty^James")
    text = Dataset()
    text.UnformattedTextValue = "Moriarty James left kidney"
    text.AnchorPointAnnotationUnits = "PIXEL"
    graphic = Dataset()
    graphic.GraphicAnnotationUnits = "PIXEL"
    graphic.GraphicDimensions = 2
    graphic.NumberOfGraphicPoints = 2
    graphic.GraphicData = [1.0, 1.0, 5.0, 5.0]
    graphic.GraphicType = "POLYLINE"
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER1"
    annotation.TextObjectSequence = [text]
    annotation.GraphicObjectSequence = [graphic]
    ds.GraphicAnnotationSequence = [annotation]
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 8)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")  # Overlay Type
    ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    ds.add_new(0x60003000, "OW", b"\xff" * 8)  # Overlay Data
    path = write_source(tmp_path, "x.dcm", ds)
    options = {Option.CLEAN_GRAPHICS}
    if descriptors:
        options.add(Option.CLEAN_DESCRIPTORS)
    s = serve(path, compile_plan(Profile("G", options=frozenset(options))))
    item = s.ds.GraphicAnnotationSequence[0]
    assert item.GraphicObjectSequence[0].GraphicData == [1.0, 1.0, 5.0, 5.0]
    text_value = item.TextObjectSequence[0].UnformattedTextValue
    assert "Moriarty" not in text_value
    assert "James" not in text_value
    # Unformatted Text Value has its own row: D, or C under Clean Descriptors.
    assert ("kidney" in text_value) is descriptors
    # Overlay bitmaps cannot be searched for text: removed with their group (fail closed).
    assert not [e for e in s.ds if e.tag.group == 0x6000]
    assert "clean_binary_removed" in s.view.report.notes
    assert "113103" in [i.CodeValue for i in s.ds.DeidentificationMethodCodeSequence]


# -- through the mount and through `deidfs anonymize` ----------------------------------------------

MASKED_PROFILE = """
[profiles.Masked]
base = "+Pixel"

[[profiles.Masked.masks]]
modality = "CT"
rows = 128
columns = 128
rects = [[10, 5, 30, 20], [0, 120, 128, 8]]

[[profiles.Masked.masks]]
modality = "MR"
rects = [[0, 0, 64, 6], [50, 40, 14, 24]]
"""
MOUNT_SOURCES = {"CT_small.dcm": "CT", "MR_small_RLE.dcm": "MR"}


def _covered(rows: int, columns: int, rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    covered = np.zeros((rows, columns), dtype=bool)
    for left, top, width, height in rects:
        covered[top : top + height, left : left + width] = True
    return covered


_MOUNT_RECTS = {
    "CT": [(10, 5, 30, 20), (0, 120, 128, 8)],
    "MR": [(0, 0, 64, 6), (50, 40, 14, 24)],
}


def _check_masked(data: bytes, source: Path) -> None:
    out = dcmread(io.BytesIO(data))
    original = dcmread(source)
    covered = _covered(out.Rows, out.Columns, _MOUNT_RECTS[str(out.Modality)])
    after, before = _decoded(out), _decoded(original)
    assert (after[:, covered, :] == 0).all()
    assert np.array_equal(after[:, ~covered, :], before[:, ~covered, :])
    assert out.BurnedInAnnotation == "NO"


@pytest.mark.fuse
def test_masks_through_the_mount(daemon_factory: Callable[..., Any]) -> None:
    d = daemon_factory(profile="Masked")
    with open(d.config_path, "a") as f:
        f.write(MASKED_PROFILE)
    d.start()
    sources = [d.add(sample_file(n), n) for n in MOUNT_SOURCES]
    d.add(sample_file("examples_rgb_color.dcm"), "us.dcm")  # ultrasound, no mask: withheld
    views = d.wait_views(2)
    expected = dict(map(d.expected, sources))
    for view in views:
        rel = str(view.relative_to(d.folder))
        data = view.read_bytes()
        assert data == expected[rel]  # the mount serves what export writes
        assert os.stat(view).st_size == len(data)
        source = next(s for s in sources if d.expected(s)[0] == rel)
        _check_masked(data, source)
    with sqlite3.connect(d.state / "index.sqlite3") as conn:
        rows = conn.execute("SELECT path, reason FROM sources").fetchall()
    reasons = {os.fsdecode(path): reason for path, reason in rows}
    assert reasons[str(d.incoming / "us.dcm")] == "burned_in_no_mask"


def test_masks_through_anonymize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    config = tmp_path / "deidfs.toml"
    config.write_text(MASKED_PROFILE)
    key = tmp_path / "secret.key"
    key.write_text(bytes(range(32)).hex() + "\n")
    key.chmod(0o600)
    src = tmp_path / "src"
    src.mkdir()
    for n in MOUNT_SOURCES:
        shutil.copyfile(sample_file(n), src / n)
    shutil.copyfile(sample_file("examples_rgb_color.dcm"), src / "us.dcm")
    argv = [str(src), "--profile", "Masked", "--to", str(tmp_path / "out")]
    argv += ["--config", str(config), "--key-file", str(key)]
    assert main(["anonymize", *argv]) == 0
    assert "burned_in_no_mask 1" in capsys.readouterr().out  # the ultrasound image
    outputs = sorted(p for p in (tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == 2
    by_modality = {str(dcmread(p, stop_before_pixels=True).Modality): p for p in outputs}
    for name, modality in MOUNT_SOURCES.items():
        _check_masked(by_modality[modality].read_bytes(), src / name)
    # A moved rectangle leaves header and trailer as they were: the file is still rewritten.
    before = by_modality["CT"].read_bytes()
    config.write_text(MASKED_PROFILE.replace("[10, 5, 30, 20]", "[12, 5, 30, 20]"))
    main(["anonymize", *argv])
    after = by_modality["CT"].read_bytes()
    assert after != before
    _MOUNT_RECTS["CT"][0] = (12, 5, 30, 20)
    try:
        _check_masked(after, src / "CT_small.dcm")
    finally:
        _MOUNT_RECTS["CT"][0] = (10, 5, 30, 20)


def test_bytes_past_the_declared_frames_are_zeroed(tmp_path: Path) -> None:
    """A second frame that Number of Frames does not count is not served as it was."""
    ds = make_image(f"{UID_ROOT}603", rows=8, columns=8)
    frame = bytes(ds.PixelData)
    ds.PixelData = frame + bytes(range(1, 129))  # 8x8x2 bytes more: an uncounted frame
    path = write_source(tmp_path, "x.dcm", ds)
    masked = Profile("M", apply_masks=True, masks=(Mask(rects=(Rect(0, 0, 8, 1),)),))
    s = serve(path, compile_plan(masked))
    served = s.ds.PixelData
    assert served[16:128] == frame[16:128]  # the declared frame, below its first row
    assert served[:16] == bytes(16)
    assert served[128:] == bytes(128)
