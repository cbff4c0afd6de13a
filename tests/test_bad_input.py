"""Bad input: every source either de-identifies correctly or is refused with a short,
PHI-free reason. Never another exception, never a partial output.

Each case runs twice: with warnings ignored (production: pydicom's warnings are not errors)
and with warnings as errors (a warning raised inside pydicom must still end in Refused).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from deidfs.deid.dictionary import text_is_clean
from deidfs.deid.profiles import BASIC, HIPAA
from deidfs.deid.standard import Option, safe_private_rows
from deidfs.errors import Refused
from deidfs.view import deflated
from deidfs.view import render as render_module
from deidfs.view.render import read_view, render, render_path, write_view
from leak_corpus import (
    CT_IMAGE,
    UID_ROOT,
    Served,
    file_meta,
    make_image,
    part10_bytes,
    plan_of,
    pseudonymizer,
    serve,
    write_source,
)

#: Every reason a source may be refused for (bounded: they are metric labels).
REASONS = frozenset(
    {
        "not_dicom",
        "unparseable",
        "truncated",
        "trailing_data",
        "transfer_syntax_mismatch",
        "element_order",
        "untrusted_attribute",
        "too_large",
        "bad_value",
        "bad_sequence",
        "bad_pixel_data",
        "no_pixel_data",
        "no_sop_instance_uid",
        "dicomdir",
        "encapsulated_document",
        "unwritable",
        "unreadable",
        "not_regular",
        "burned_in_no_mask",
        "pixel_unsupported",
        "parse_timeout",  # the daemon's: a render past [daemon] parse_timeout_seconds
    }
)
MARK = "QZX9SECRET"  #: planted in values of the bad files; never in a message


def _render_both_ways(path: Path, plan_options: tuple[Option, ...] = ()) -> Served | Refused:
    """Render under both warning filters; the outcomes must agree in kind."""
    outcomes: list[Served | Refused] = []
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)  # type: ignore[arg-type]
            try:
                outcomes.append(serve(path, plan_of(BASIC, *plan_options)))
            except Refused as exc:
                _check_refusal(exc)
                outcomes.append(exc)
    ignored, strict = outcomes
    if isinstance(ignored, Refused):
        # Stricter parsing never serves what lenient parsing refused.
        assert isinstance(strict, Refused)
    return ignored


def _check_refusal(exc: Refused) -> None:
    assert exc.reason in REASONS, exc.reason
    assert MARK not in str(exc)
    assert MARK not in exc.detail
    assert len(str(exc)) < 200


def _refused(outcome: Served | Refused, *reasons: str) -> Refused:
    assert isinstance(outcome, Refused), "expected a refusal"
    assert outcome.reason in reasons, outcome.reason
    return outcome


def _served(outcome: Served | Refused) -> Served:
    assert isinstance(outcome, Served), f"refused: {outcome}"
    assert MARK.encode() not in outcome.data
    assert outcome.ds.PatientIdentityRemoved in ("YES", "NO")
    return outcome


def _image(**attrs: object) -> Dataset:
    return make_image(f"{UID_ROOT}4242", patient_name=f"{MARK}^Pat", **attrs)


# -- not DICOM ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello " + MARK.encode(),
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        bytes(range(256)) * 4,
        b"\x00" * 128 + b"DICM",
        b"\x00" * 128 + b"DICM" + MARK.encode() * 10,
        b"\x00" * 132,
    ],
    ids=["empty", "text", "png", "binary", "preamble-only", "preamble-garbage", "zeros"],
)
def test_not_dicom(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / f"{MARK}.dcm"
    path.write_bytes(data)
    _refused(_render_both_ways(path), "not_dicom", "unparseable", "truncated")


def test_directory_fifo_and_symlink_refused(tmp_path: Path) -> None:
    plan = plan_of(BASIC)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening it blocking would wait for a writer forever
    src = write_source(tmp_path, "real.dcm", _image())
    (tmp_path / "link.dcm").symlink_to(src)
    for name, reason in (
        ("dir", "not_regular"),
        ("fifo", "not_regular"),
        ("link.dcm", "unreadable"),
    ):
        with pytest.raises(Refused) as info:
            render_path(tmp_path / name, plan, pseudonymizer())
        assert info.value.reason == reason
    with pytest.raises(Refused) as info:
        render_path(tmp_path / "missing.dcm", plan, pseudonymizer())
    assert info.value.reason == "unreadable"


# -- truncated ---------------------------------------------------------------------------
def _offsets(data: bytes, ts: str) -> dict[str, int]:
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    name_at = data.index(MARK.encode())
    big = ts == ExplicitVRBigEndian
    pixel_at = data.rindex(b"\x7f\xe0\x00\x10" if big else b"\xe0\x7f\x10\x00")
    return {
        "in-preamble": 60,
        "in-meta": 150,
        "end-of-meta-element": meta_end - 3,
        "in-header-value": name_at + 3,
        "in-header-element-header": name_at - 5,
        "at-pixel-element": pixel_at,
        "in-pixel-header": pixel_at + 6,
        "in-pixel-data": pixel_at + 40,
        "one-byte-short": len(data) - 1,
    }


@pytest.mark.parametrize(
    "where",
    [
        "in-preamble",
        "in-meta",
        "end-of-meta-element",
        "in-header-value",
        "in-header-element-header",
        "at-pixel-element",
        "in-pixel-header",
        "in-pixel-data",
        "one-byte-short",
    ],
)
@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_truncated(tmp_path: Path, where: str, ts: str) -> None:
    data = part10_bytes(_image(), ts)
    cut = _offsets(data, ts)[where]
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    _refused(
        _render_both_ways(path),
        "truncated",
        "not_dicom",
        "unparseable",
        "no_pixel_data",
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0), st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
def test_truncated_anywhere(cut: int, ts: str) -> None:
    """A cut anywhere: refused, or (cut at an element boundary before the image attributes)
    a smaller, complete data set, de-identified like any other."""
    data = part10_bytes(_image(), ts)
    cut %= len(data)
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)  # type: ignore[arg-type]
            try:
                view = render(
                    io.BytesIO(data[:cut]),
                    render_module.SourceStat(0, 0, cut, 0, 0),
                    plan_of(BASIC),
                    pseudonymizer(),
                )
            except Refused as exc:
                _check_refusal(exc)
                continue
        out = view.header + view.trailer
        assert view.pixel_length == 0  # pixels are never served from a cut file
        assert MARK.encode() not in out
        assert "Rows" not in dcmread(io.BytesIO(out))


def test_a_cut_between_rows_and_columns_is_refused() -> None:
    """Rows without Columns (or Pixel Data): a file cut inside the Image Pixel module."""
    data = part10_bytes(_image(), ExplicitVRLittleEndian)
    cut = data.find(b"\x28\x00\x11\x00US")  # the Columns element, explicit VR LE
    assert cut > 0
    with pytest.raises(Refused) as info:
        render(
            io.BytesIO(data[:cut]),
            render_module.SourceStat(0, 0, cut, 0, 0),
            plan_of(BASIC),
            pseudonymizer(),
        )
    assert info.value.reason == "no_pixel_data"


# -- other encodings ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "ExplVR_BigEnd.dcm",
        "MR_small_implicit.dcm",
        "ExplVR_BigEndNoMeta.dcm",
    ],
)
def test_pydicom_encodings(tmp_path: Path, name: str) -> None:
    src = Path(str(get_testdata_file(name)))
    path = tmp_path / name
    path.write_bytes(src.read_bytes())
    s = _served(_render_both_ways(path))
    original = dcmread(src, force=True)
    if "PixelData" in original:  # ExplVR_BigEndNoMeta.dcm is an RT Ion Plan
        assert s.ds.PixelData == original.PixelData
    if "PatientName" in original:
        assert s.ds.PatientName != original.PatientName
    assert s.ds.SOPInstanceUID != original.SOPInstanceUID
    assert s.ds.file_meta.TransferSyntaxUID in (ExplicitVRBigEndian, ImplicitVRLittleEndian)


def test_deflated(tmp_path: Path) -> None:
    src = Path(str(get_testdata_file("image_dfl.dcm")))
    path = tmp_path / "dfl.dcm"
    path.write_bytes(src.read_bytes())
    s = _served(_render_both_ways(path))
    original = dcmread(src)
    assert s.ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert s.ds.PixelData == original.PixelData
    assert s.ds.PatientName != original.PatientName
    assert s.ds.SOPInstanceUID != original.SOPInstanceUID
    assert s.ds.file_meta.MediaStorageSOPInstanceUID == s.ds.SOPInstanceUID


def _deflated(ds: Dataset) -> bytes:
    body = DicomBytesIO()
    body.is_little_endian = True
    body.is_implicit_VR = False
    from pydicom.filewriter import write_dataset

    write_dataset(body, ds)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = c.compress(body.getvalue()) + c.flush()
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out.getvalue() + payload


def test_deflate_bomb_corrupt_and_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _image()
    ds.add_new(0x00291010, "OB", bytes(4 << 20))  # 4 MiB of zeros: a few KiB deflated
    data = _deflated(ds)
    assert len(data) < 64 << 10
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    monkeypatch.setattr(deflated, "MAX_INFLATED", 1 << 20)
    _refused(_render_both_ways(path), "too_large")
    monkeypatch.undo()
    s = _served(_render_both_ways(path))  # within the real limit: served, private removed
    assert 0x00291010 not in s.ds
    corrupt = bytearray(data)
    meta_end = len(data) - len(zlib.compress(b""))  # somewhere in the stream
    corrupt[meta_end - 200 : meta_end - 100] = b"\xff" * 100
    path.write_bytes(bytes(corrupt))
    _refused(_render_both_ways(path), "unparseable", "truncated")
    path.write_bytes(data[: len(data) // 2])
    _refused(_render_both_ways(path), "truncated", "unparseable")


# -- bad values --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "vr", "value", "options"),
    [
        (0x00080020, b"DA", b"garbage!", ()),
        (0x00080020, b"DA", b"garbage!", (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,)),
        (0x00080023, b"DA", b"2021-03-15", (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,)),
        (0x00080023, b"DA", b"20211345", (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,)),
        (0x0008002A, b"DT", b"20211345xx", (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,)),
        (0x00080030, b"TM", b"10:11 Doe ", (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,)),
        (0x00200011, b"IS", b"12A ", ()),
        (0x00180060, b"DS", b"abc ", ()),
        (0x00101030, b"DS", b"seventy ", (Option.RETAIN_PATIENT_CHARACTERISTICS,)),
        (0x00101010, b"AS", b"95 years", (Option.RETAIN_PATIENT_CHARACTERISTICS,)),
        (0x0020000D, b"UI", b"1.2.abc.4\x00", ()),
        (0x00080090, b"PN", b"a^b^c^d^e^f^g ", ()),
        (0x00280010, b"US", b"\x01\x02\x03\x04", ()),
        (0x00280010, b"US", b"\x01\x02\x03", ()),
        (0x00101020, b"DS", b"\xff\xfe\x00\x01", (Option.RETAIN_PATIENT_CHARACTERISTICS,)),
        (0x0008103E, b"LO", b"\xc3\x28\xa0\xa1", (Option.CLEAN_DESCRIPTORS,)),
        (0x00100040, b"ZZ", b"M ", ()),
    ],
)
def test_bad_values(
    tmp_path: Path, tag: int, vr: bytes, value: bytes, options: tuple[Option, ...]
) -> None:
    path = tmp_path / "bad.dcm"
    path.write_bytes(_raw_file(_HEAD + _el(tag >> 16, tag & 0xFFFF, vr, value)))
    outcome = _render_both_ways(path, options)
    if isinstance(outcome, Refused):
        return
    s = _served(outcome)
    if vr in (b"DA", b"DT", b"TM"):
        # A date the engine cannot read is emptied, never half-modified.
        assert str(s.ds.get(tag, "").value if tag in s.ds else "") in (
            "",
            "19000101",
            "19000101000000",
        )


def test_hipaa_never_serves_an_unparseable_age(tmp_path: Path) -> None:
    ds = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00101010, "AS", "95 years")
        path = write_source(tmp_path, "age.dcm", ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = serve(path, plan_of(HIPAA))
    assert b"95" not in s.ds.get("PatientAge", "").encode()


# -- sequences ---------------------------------------------------------------------------
def _undefined(seq: Sequence) -> Sequence:
    for item in seq:
        item.is_undefined_length_sequence_item = True
    return seq


def test_undefined_length_sequences(tmp_path: Path) -> None:
    deep = Dataset()
    deep.PatientName = f"{MARK}^Deep"
    deep.ReferencedSOPInstanceUID = f"{UID_ROOT}5"
    middle = Dataset()
    middle.AnatomicRegionModifierSequence = _undefined(Sequence([deep]))
    top = Dataset()
    top.AnatomicRegionSequence = _undefined(Sequence([middle]))
    ds = _image(VOILUTSequence=_undefined(Sequence([top])))
    for kw in ("VOILUTSequence",):
        ds[kw].is_undefined_length = True
    top["AnatomicRegionSequence"].is_undefined_length = True
    middle["AnatomicRegionModifierSequence"].is_undefined_length = True
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        path = write_source(tmp_path, "u.dcm", ds, ts)
        data = path.read_bytes()
        assert b"\xfe\xff\xdd\xe0" in data or b"\xff\xfe\xe0\xdd" in data  # delimiters
        s = _served(_render_both_ways(path))
        got = s.ds.VOILUTSequence[0].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
        assert str(got.ReferencedSOPInstanceUID).startswith("2.25.")
        # Without its sequence delimiter the file is cut short: refused.
        cut = data.rindex(b"\xfe\xff\xdd\xe0" if ts != ExplicitVRBigEndian else b"\xff\xfe\xe0\xdd")
        path.write_bytes(data[:cut])
        _refused(
            _render_both_ways(path), "truncated", "unparseable", "bad_sequence", "no_pixel_data"
        )


def _private_sequence_image(creator: str, element: int) -> Dataset:
    ds = _image()
    item = Dataset()
    item.PatientName = f"{MARK}^InPrivate"
    item.SOPInstanceUID = f"{UID_ROOT}77"
    inner = item.private_block(0x2001, creator, create=True)
    inner.add_new(0x0D, "LO", f"{MARK}X")  # (2001,xx0D) is not in Table E.3.10-1
    block = ds.private_block(0x2001, creator, create=True)
    block.add_new(element, "SQ", Sequence([item]))
    return ds


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("undefined", [False, True])
def test_private_sequences(tmp_path: Path, ts: str, undefined: bool) -> None:
    creator = "Philips Imaging DD 001"
    (element,) = [
        r.element_low
        for r in safe_private_rows()
        if r.creator == creator and r.group == 0x2001 and r.vr == "SQ"
    ][:1]
    ds = _private_sequence_image(creator, element)
    if undefined:
        seq = ds[0x2001, 0x1000 | element]
        seq.is_undefined_length = True
        _undefined(seq.value)
    path = write_source(tmp_path, "p.dcm", ds, ts)
    basic = _served(_render_both_ways(path))
    assert not [e for e in basic.ds if e.tag.is_private]
    safe = _served(_render_both_ways(path, (Option.RETAIN_SAFE_PRIVATE,)))
    kept = safe.ds.private_block(0x2001, creator)[element].value
    assert len(kept) == 1
    assert str(kept[0].SOPInstanceUID).startswith("2.25.")
    assert "PatientName" not in kept[0] or MARK not in str(kept[0].PatientName)


def test_pydicom_private_sequence_files(tmp_path: Path) -> None:
    """priv_SQ.dcm and nested_priv_SQ.dcm have no SOP Instance UID: refused for that."""
    for name in ("priv_SQ.dcm", "nested_priv_SQ.dcm", "UN_sequence.dcm"):
        path = tmp_path / name
        path.write_bytes(Path(str(get_testdata_file(name))).read_bytes())
        _refused(_render_both_ways(path), "no_sop_instance_uid")


def test_un_encoded_sequence(tmp_path: Path) -> None:
    """A public sequence sent as UN (PS3.5 6.2.2: its value is implicit VR little endian)."""
    item = Dataset()
    item.PatientName = f"{MARK}^UN"
    item.ReferencedSOPInstanceUID = f"{UID_ROOT}6"
    inner = DicomBytesIO()
    inner.is_little_endian = True
    inner.is_implicit_VR = True
    from pydicom.filewriter import write_dataset

    write_dataset(inner, item)
    body = inner.getvalue()
    value = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    path = tmp_path / "un.dcm"
    path.write_bytes(_raw_file(_HEAD + _el(0x0028, 0x3010, b"UN", value)))  # VOI LUT Sequence
    s = _served(_render_both_ways(path))
    seq = s.ds[0x00283010]
    assert seq.VR == "SQ"
    assert str(seq.value[0].ReferencedSOPInstanceUID).startswith("2.25.")


# -- huge lengths and values ---------------------------------------------------------------
def _raw_file(body: bytes) -> bytes:
    meta = file_meta(CT_IMAGE, f"{UID_ROOT}4242")
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body


def _el(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


_HEAD = (
    _el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00")
    + _el(0x0008, 0x0018, b"UI", f"{UID_ROOT}4242".encode())
    + _el(0x0010, 0x0010, b"PN", f"{MARK}^P".encode())
)


@pytest.mark.parametrize(
    ("body", "reasons"),
    [
        (_HEAD + _el(0x0010, 0x4000, b"LT", MARK.encode(), 0xFFF0), ("truncated",)),
        (_HEAD + _el(0x0020, 0x4000, b"UT", MARK.encode(), 0xFFFFFFF0), ("truncated",)),
        (_HEAD + _el(0x0029, 0x1010, b"OB", MARK.encode(), 0x7FFFFFF0), ("truncated",)),
        (
            _HEAD + _el(0x0028, 0x3010, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFF00), 8),
            ("truncated", "bad_value", "bad_sequence", "unparseable", "served"),
        ),
        (_HEAD + _el(0x7FE0, 0x0010, b"OW", b"\x00" * 16, 0x7FFFFFF0), ("truncated",)),
        (
            _HEAD
            + _el(
                0x7FE0, 0x0010, b"OB", struct.pack("<HHL", 0xFFFE, 0xE000, 0x7FFFFFF0), 0xFFFFFFFF
            ),
            ("truncated", "bad_pixel_data"),
        ),
        (
            _HEAD + _el(0x7FE0, 0x0010, b"OB", struct.pack("<HHL", 0x1234, 0x5678, 4), 0xFFFFFFFF),
            ("bad_pixel_data", "truncated"),
        ),
    ],
    ids=[
        "LT-64KiB-declared",
        "UT-4GiB-declared",
        "private-OB-2GiB",
        "item-length-past-sequence",
        "pixel-2GiB-declared",
        "encapsulated-item-2GiB",
        "encapsulated-not-an-item",
    ],
)
def test_huge_declared_lengths(tmp_path: Path, body: bytes, reasons: tuple[str, ...]) -> None:
    path = tmp_path / "huge.dcm"
    path.write_bytes(_raw_file(body))
    outcome = _render_both_ways(path)
    if isinstance(outcome, Served) and "served" in reasons:
        # pydicom reads an item that claims more than its sequence holds as the bytes that
        # are there (here: none): an empty item, nothing to leak, nothing invented.
        assert not _served(outcome).ds.VOILUTSequence[0]
        return
    _refused(outcome, *reasons)


def test_huge_values(tmp_path: Path) -> None:
    big = 24 << 20
    ds = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # longer than LT allows: the point of the test
        ds.ImageComments = (MARK + " ") * (big // 11)  # 24 MiB of identifying text
        ds.add_new(0x00291010, "OB", (MARK.encode() * (big // 10))[:big])
        ds.add_new(0x00281201, "OW", bytes(big))  # Red Palette LUT Data: unlisted, kept
        path = write_source(tmp_path, "big.dcm", ds)
    s = _served(_render_both_ways(path))
    assert "ImageComments" not in s.ds
    assert len(s.ds[0x00281201].value) == big
    assert s.ds.PixelData == dcmread(path).PixelData


# -- never a partial output ------------------------------------------------------------------
def _produce(src: Path, out: Path, mutate: Callable[[], None] | None = None) -> None:
    """What export does: render, then write to a temp file and rename into place."""
    view = render_path(src, plan_of(BASIC), pseudonymizer())
    if mutate is not None:
        mutate()
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(tmp, "wb") as f:
            write_view(view, fd, f)
        os.replace(tmp, out)
    finally:
        os.close(fd)
        if tmp.exists():
            tmp.unlink()


def test_no_partial_output(tmp_path: Path) -> None:
    data = part10_bytes(_image())
    src = tmp_path / "src.dcm"
    out = tmp_path / "out.dcm"
    src.write_bytes(data[: len(data) - 10])
    with pytest.raises(Refused):
        _produce(src, out)
    assert not out.exists()
    # The source shrinks between render and copy: the copy fails, nothing is left.
    src.write_bytes(data)

    def shrink() -> None:
        with open(src, "r+b") as f:
            f.truncate(len(data) - 50)

    with pytest.raises(Refused) as info:
        _produce(src, out, shrink)
    assert info.value.reason == "source_changed"
    assert not out.exists()
    src.write_bytes(data)
    view = render_path(src, plan_of(BASIC), pseudonymizer())
    shrink()
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(Refused):
            read_view(view, fd, 0, view.size)
        assert not render_module.source_unchanged(view, fd)
    finally:
        os.close(fd)


# -- Hypothesis: arbitrary bytes after a valid file meta ------------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bodies(body: bytes, with_head: bool) -> None:
    data = _raw_file((_HEAD if with_head else b"") + body)
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)  # type: ignore[arg-type]
            try:
                view = render(
                    io.BytesIO(data),
                    render_module.SourceStat(0, 0, len(data), 0, 0),
                    plan_of(BASIC),
                    pseudonymizer(),
                )
            except Refused as exc:
                _check_refusal(exc)
                continue
        served = view.header + data[view.pixel_offset : view.pixel_offset + view.pixel_length]
        served += view.trailer
        assert MARK.encode() not in served
        dcmread(io.BytesIO(served))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("StudyDate", "DA"),
                    ("AcquisitionDateTime", "DT"),
                    ("StudyTime", "TM"),
                    ("PatientAge", "AS"),
                    ("SeriesNumber", "IS"),
                    ("KVP", "DS"),
                    ("SeriesDescription", "LO"),
                    ("PatientSex", "CS"),
                    ("OtherPatientIDs", "LO"),
                ]
            ),
            st.binary(max_size=40),
        ),
        max_size=6,
    ),
    st.sampled_from(
        [(), (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,), (Option.CLEAN_DESCRIPTORS,)]
    ),
)
def test_garbage_values(
    values: list[tuple[tuple[str, str], bytes]], options: tuple[Option, ...]
) -> None:
    """Arbitrary bytes as values of attributes the engine decodes: Refused or served."""
    from pydicom.datadict import tag_for_keyword

    elements: dict[int, bytes] = {}
    for (keyword, vr), raw in values:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        value = raw + b" " if len(raw) % 2 else raw
        elements[tag] = _el(tag >> 16, tag & 0xFFFF, vr.encode(), value)
    data = _raw_file(_HEAD + b"".join(elements[t] for t in sorted(elements)))
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)  # type: ignore[arg-type]
            try:
                view = render(
                    io.BytesIO(data),
                    render_module.SourceStat(0, 0, len(data), 0, 0),
                    plan_of(BASIC, *options),
                    pseudonymizer(),
                )
            except Refused as exc:
                _check_refusal(exc)
                continue
        dcmread(io.BytesIO(view.header))


def _unused() -> FileMetaDataset:  # pragma: no cover - keeps the import for readers
    return FileMetaDataset()


def test_a_kept_number_that_swallowed_the_next_element_is_refused(tmp_path: Path) -> None:
    """Rows (US, VM 1) given a length that takes in the element after it: kept as it is,
    that element's bytes (a name, an ID) would travel inside the number. Refused on both
    paths."""
    data = bytearray(Path(str(get_testdata_file("CT_small.dcm"))).read_bytes())
    at = data.find(b"\x28\x00\x10\x00US\x02\x00")
    assert at > 0
    nxt = at + 10  # the element after Rows: its 8-byte header and value join Rows' value
    next_len = int.from_bytes(data[nxt + 6 : nxt + 8], "little")
    data[at + 6 : at + 8] = (2 + 8 + next_len).to_bytes(2, "little")
    path = tmp_path / "swallow.dcm"
    path.write_bytes(bytes(data))
    _refused(_render_both_ways(path), "bad_value")


def test_a_kept_text_that_swallowed_the_patient_name_is_refused(tmp_path: Path) -> None:
    """Manufacturer (LO, kept by Basic) given a length that takes in every element up to and
    including PatientName: kept as it is, the name would travel inside it. The element
    headers it took in hold NULs and control bytes no character string holds: refused on
    both paths."""
    data = bytearray(Path(str(get_testdata_file("CT_small.dcm"))).read_bytes())
    at = data.find(b"\x08\x00\x70\x00LO")
    name = data.find(b"\x10\x00\x10\x00PN")
    assert 0 < at < name
    end = name + 8 + int.from_bytes(data[name + 6 : name + 8], "little")
    data[at + 6 : at + 8] = (end - (at + 8)).to_bytes(2, "little")
    path = tmp_path / "swallow.dcm"
    path.write_bytes(bytes(data))
    _refused(_render_both_ways(path), "bad_value")


@pytest.mark.parametrize(
    ("value", "clean"),
    [
        (b"SIEMENS ", True),
        (b"1.2.840.10008.1.2\x00", True),  # UI padding
        (b"NAME\x00\x00", True),  # NUL padding, tolerated at the end
        (b"Line one\r\nLine two\tand\x0cmore", True),  # LT, ST, UT formatting
        (b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", True),  # ISO 2022 escapes (PS3.5 H)
        ("Müller^Jürgen".encode(), True),
        (b"ABCDEF\x00GHIJ", False),  # a NUL inside
        (b"CT\x10\x00\x10\x00PN\x04\x00", False),  # an element header taken in
        (b"bell rings\x07", False),
        (b"AB\x00CD\x07", True),  # too short to hold an element taken in: not searched
        (b"\x7f", True),  # DEL is no C0 control; the character sets decide about it
    ],
)
def test_what_a_kept_character_string_may_hold(value: bytes, clean: bool) -> None:
    assert text_is_clean(value) is clean
