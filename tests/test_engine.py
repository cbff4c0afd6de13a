"""The de-identification engine, always through bytes: render -> served bytes -> dcmread."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import subprocess
import sys
from datetime import date
from pathlib import Path, PurePosixPath

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from deidfs.deid.engine import deidentify
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, HIPAA, PIXEL, Rule
from deidfs.deid.standard import OPTION_CODES, Option, safe_private_rows
from deidfs.errors import Refused
from deidfs.view.render import Layout
from leak_corpus import (
    KEY,
    OTHER_KEY,
    UID_ROOT,
    Served,
    make_image,
    plan_of,
    pseudonymizer,
    serve,
    write_source,
)

GEMS = "GEMS_ACQU_01"
TABLE_OPTIONS = [o for o in Option if o is not Option.CLEAN_PIXEL_DATA]


def _study(tmp_path: Path) -> list[Path]:
    """Three images of one patient and study: two in one series, one referencing the first."""
    study = f"{UID_ROOT}100"
    first = make_image(f"{UID_ROOT}101", study, f"{UID_ROOT}110", InstanceNumber=1)
    second = make_image(f"{UID_ROOT}102", study, f"{UID_ROOT}110", InstanceNumber=2)
    ref = Dataset()
    ref.ReferencedSOPClassUID = first.SOPClassUID
    ref.ReferencedSOPInstanceUID = first.SOPInstanceUID
    deep = Dataset()
    deep.ReferencedSOPClassUID = first.SOPClassUID
    deep.ReferencedSOPInstanceUID = second.SOPInstanceUID
    deep.PatientName = "Nested^Three^Levels"
    level2 = Dataset()
    level2.AnatomicRegionModifierSequence = Sequence([deep])
    level1 = Dataset()
    level1.AnatomicRegionSequence = Sequence([level2])
    third = make_image(
        f"{UID_ROOT}103",
        study,
        f"{UID_ROOT}120",
        ReferencedImageSequence=Sequence([ref]),
        VOILUTSequence=Sequence([level1]),
    )
    return [write_source(tmp_path, f"s{i}.dcm", ds) for i, ds in enumerate((first, second, third))]


def test_uids_consistent_across_a_study(tmp_path: Path) -> None:
    plan = plan_of(BASIC)
    a, b, c = (serve(p, plan) for p in _study(tmp_path))
    assert a.ds.StudyInstanceUID == b.ds.StudyInstanceUID == c.ds.StudyInstanceUID
    assert a.ds.SeriesInstanceUID == b.ds.SeriesInstanceUID != c.ds.SeriesInstanceUID
    assert a.ds.FrameOfReferenceUID == b.ds.FrameOfReferenceUID == c.ds.FrameOfReferenceUID
    assert len({a.ds.SOPInstanceUID, b.ds.SOPInstanceUID, c.ds.SOPInstanceUID}) == 3
    for s in (a, b, c):
        assert str(s.ds.StudyInstanceUID).startswith("2.25.")
        assert s.ds.file_meta.MediaStorageSOPInstanceUID == s.ds.SOPInstanceUID
        assert s.ds.file_meta.MediaStorageSOPClassUID == s.ds.SOPClassUID
        assert not str(s.ds.SOPInstanceUID).startswith(UID_ROOT)
    (ref,) = c.ds.ReferencedImageSequence
    assert ref.ReferencedSOPInstanceUID == a.ds.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # registered: kept
    deep = c.ds.VOILUTSequence[0].AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    assert deep.ReferencedSOPInstanceUID == b.ds.SOPInstanceUID
    assert deep.PatientName != "Nested^Three^Levels"  # the plan applies three levels down
    assert "Nested" not in str(deep.get("PatientName", ""))
    # Layout: names carry only de-identified values.
    assert a.relpath == PurePosixPath(
        str(a.ds.PatientID),
        str(a.ds.StudyInstanceUID),
        str(a.ds.SeriesInstanceUID),
        f"{a.ds.SOPInstanceUID}.dcm",
    )
    assert a.ds.PatientID == c.ds.PatientID != "PID-0001"


def test_pixel_bytes_are_the_originals(tmp_path: Path) -> None:
    paths = _study(tmp_path)
    s = serve(paths[0], plan_of(BASIC))
    original = dcmread(paths[0])
    assert s.ds.PixelData == original.PixelData
    assert s.view.pixel_length > len(original.PixelData)  # the element header comes along
    assert s.data.endswith(original.PixelData)


def test_attributes_the_profile_records(tmp_path: Path) -> None:
    path = _study(tmp_path)[0]
    s = serve(path, plan_of(BASIC))
    assert s.ds.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in s.ds.DeidentificationMethodCodeSequence] == ["113100"]
    item = s.ds.DeidentificationMethodCodeSequence[0]
    assert item.CodingSchemeDesignator == "DCM"
    assert item.CodeMeaning == "Basic Application Confidentiality Profile"
    assert s.ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert "Basic" in s.ds.DeidentificationMethod


@pytest.mark.parametrize("option", TABLE_OPTIONS, ids=lambda o: o.value)
def test_method_codes_name_each_option(tmp_path: Path, option: Option) -> None:
    path = _study(tmp_path)[0]
    s = serve(path, plan_of(BASIC, option))
    codes = [i.CodeValue for i in s.ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", OPTION_CODES[option]]
    expected = {
        Option.RETAIN_LONGITUDINAL_FULL_DATES: "UNMODIFIED",
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: "MODIFIED",
    }.get(option, "REMOVED")
    assert s.ds.LongitudinalTemporalInformationModified == expected


def test_burned_in_annotation_is_not_claimed_removed(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}5", BurnedInAnnotation="YES")
    s = serve(write_source(tmp_path, "b.dcm", ds), plan_of(BASIC))
    assert s.ds.PatientIdentityRemoved == "NO"
    assert s.ds.BurnedInAnnotation == "YES"


def _private_image() -> Dataset:
    ds = make_image(f"{UID_ROOT}7")
    block = ds.private_block(0x0019, GEMS, create=True)  # block 0x10
    block.add_new(0x23, "DS", "12.5")  # (0019,xx23) Table Speed: Table E.3.10-1
    block.add_new(0x22, "LO", "Operator Jane")  # not listed for GEMS_ACQU_01
    other = ds.private_block(0x0019, "OTHER_VENDOR", create=True)  # block 0x11
    other.add_new(0x23, "DS", "99.5")  # same element, creator without listing
    seq_block = ds.private_block(0x0021, "ACME PRIVATE", create=True)
    item = Dataset()
    item.PatientName = "Private^Sequence"
    seq_block.add_new(0x01, "SQ", Sequence([item]))
    return ds


def test_private_attributes_removed_under_basic(tmp_path: Path) -> None:
    s = serve(write_source(tmp_path, "p.dcm", _private_image()), plan_of(BASIC))
    assert not [e for e in s.ds.iterall() if e.tag.is_private]
    assert b"Operator Jane" not in s.data
    assert b"Private^Sequence" not in s.data
    assert b"GEMS_ACQU_01" not in s.data


def test_safe_private_kept_only_when_listed_for_its_creator(tmp_path: Path) -> None:
    path = write_source(tmp_path, "p.dcm", _private_image())
    s = serve(path, plan_of(BASIC, Option.RETAIN_SAFE_PRIVATE))
    assert s.ds[0x00190010].value == GEMS
    assert s.ds[0x00191023].value == "12.5"
    assert 0x00191022 not in s.ds
    assert 0x00190011 not in s.ds
    assert 0x00191123 not in s.ds
    assert b"OTHER_VENDOR" not in s.data
    assert b"99.5" not in s.data
    assert b"ACME PRIVATE" not in s.data
    assert b"Private^Sequence" not in s.data
    assert s.ds.private_block(0x0019, GEMS)[0x23].value == "12.5"


def test_safe_private_with_another_vr_is_removed(tmp_path: Path) -> None:
    """Table E.3.10-1 vouches for (0019,xx23) of GEMS_ACQU_01 as DS, not for text there."""
    ds = make_image(f"{UID_ROOT}6")
    ds.private_block(0x0019, GEMS, create=True).add_new(0x23, "LO", "Jane Doe")
    s = serve(write_source(tmp_path, "v.dcm", ds), plan_of(BASIC, Option.RETAIN_SAFE_PRIVATE))
    assert 0x00191023 not in s.ds
    assert 0x00190010 not in s.ds  # a creator without kept elements goes too
    assert b"Jane Doe" not in s.data


def test_safe_private_sequence_is_de_identified_inside(tmp_path: Path) -> None:
    """A listed private sequence is kept, but the plan still applies inside its items."""
    creator = "Philips Imaging DD 001"
    seqs = [
        r.element_low
        for r in safe_private_rows()
        if r.creator == creator and r.group == 0x2001 and r.vr == "SQ"
    ]
    assert seqs, "Table E.3.10-1 lists private sequences for this creator"
    ds = make_image(f"{UID_ROOT}8")
    block = ds.private_block(0x2001, creator, create=True)
    item = Dataset()
    item.PatientName = "Hidden^In^Private"
    item.SOPInstanceUID = f"{UID_ROOT}81"
    inner = item.private_block(0x2001, creator, create=True)
    inner.add_new(0x01, "LO", "not listed")
    block.add_new(seqs[0], "SQ", Sequence([item]))
    s = serve(write_source(tmp_path, "q.dcm", ds), plan_of(BASIC, Option.RETAIN_SAFE_PRIVATE))
    kept = s.ds.private_block(0x2001, creator)[seqs[0]].value
    assert len(kept) == 1
    assert b"Hidden^In^Private" not in s.data
    assert str(kept[0].SOPInstanceUID).startswith("2.25.")
    assert b"not listed" not in s.data


def test_curves_overlays_and_group_lengths_removed(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}9")
    ds.add_new(0x50000005, "US", 2)  # Curve Dimensions
    ds.add_new(0x50002500, "LO", "Curve label Doe")
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "Overlay comment Doe")
    ds.add_new(0x00080000, "UL", 1234)  # group length
    ds.add_new(0x00100000, "UL", 99)
    s = serve(write_source(tmp_path, "c.dcm", ds), plan_of(BASIC))
    groups = {int(e.tag) >> 16 for e in s.ds}
    assert not any(0x5000 <= g <= 0x50FF or 0x6000 <= g <= 0x60FF for g in groups)
    assert all(int(e.tag) & 0xFFFF for e in s.ds)
    assert b"Doe" not in s.data
    graphics = serve(write_source(tmp_path, "c.dcm", ds), plan_of(BASIC, Option.CLEAN_GRAPHICS))
    # Clean Graphics cannot clean a bit plane: the overlay goes, with its whole group.
    assert 0x60003000 not in graphics.ds
    assert 0x60000010 not in graphics.ds


def test_hipaa(tmp_path: Path) -> None:
    old = make_image(
        f"{UID_ROOT}11",
        PatientAge="095Y",
        PatientBirthDate="19260315",
        AcquisitionDateTime="20210315101010.5",
        PatientWeight="70",
        PatientSize="1.7",
    )
    young = make_image(f"{UID_ROOT}12", PatientAge="045Y", PatientID="PID-2")
    s = serve(write_source(tmp_path, "old.dcm", old), plan_of(HIPAA))
    assert s.ds.StudyDate == "20210101"
    assert s.ds.SeriesDate == "20210101"
    assert s.ds.ContentDate == "20210101"
    assert s.ds.AcquisitionDateTime == "2021"
    assert s.ds.StudyTime == ""
    assert s.ds.ContentTime == "000000"  # Basic gives it a dummy (Type 1 in SR, enhanced)
    assert s.ds.PatientAge == "090Y"
    assert s.ds.PatientBirthDate == ""
    assert s.ds.PatientSex == "F"
    assert s.ds.PatientWeight == 70
    assert s.ds.PatientSize == 1.7
    assert s.ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [i.CodeValue for i in s.ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]
    assert s.ds.PatientName != "Doe^John"
    assert s.ds.PatientID != "PID-0001"
    assert "InstitutionName" not in s.ds or s.ds.InstitutionName == ""
    y = serve(write_source(tmp_path, "young.dcm", young), plan_of(HIPAA))
    assert y.ds.PatientAge == "045Y"
    assert y.ds.PatientBirthDate == ""  # Table E.1-1: Z under every option


def _days(a: str, b: str) -> int:
    def d(s: str) -> date:
        return date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    return (d(b) - d(a)).days


def test_modified_dates_keep_intervals_within_a_patient(tmp_path: Path) -> None:
    first = make_image(f"{UID_ROOT}21", StudyDate="20200101", ContentDate="20200103")
    later = make_image(
        f"{UID_ROOT}22", StudyDate="20210301", ContentDate="20210301", AcquisitionDate="20210228"
    )
    other = make_image(
        f"{UID_ROOT}23", patient_id="PID-OTHER", StudyDate="20200101", ContentDate="20200103"
    )
    plan = plan_of(BASIC, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    a = serve(write_source(tmp_path, "a.dcm", first), plan)
    b = serve(write_source(tmp_path, "b.dcm", later), plan)
    c = serve(write_source(tmp_path, "c.dcm", other), plan)
    assert a.ds.StudyDate != "20200101"
    assert _days(a.ds.StudyDate, a.ds.ContentDate) == 2
    assert _days(a.ds.StudyDate, b.ds.StudyDate) == _days("20200101", "20210301")
    assert _days(b.ds.AcquisitionDate, b.ds.StudyDate) == 1
    assert a.ds.StudyTime == "101112"  # whole-day shifts keep times of day
    assert c.ds.StudyDate != a.ds.StudyDate  # another patient, another shift
    assert _days(c.ds.StudyDate, c.ds.ContentDate) == 2
    assert a.ds.LongitudinalTemporalInformationModified == "MODIFIED"


def test_full_dates_keep_dates(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}31", AcquisitionDateTime="20210315101010")
    s = serve(
        write_source(tmp_path, "f.dcm", ds), plan_of(BASIC, Option.RETAIN_LONGITUDINAL_FULL_DATES)
    )
    assert s.ds.StudyDate == "20210315"
    assert s.ds.ContentDate == "20210316"
    assert s.ds.StudyTime == "101112"
    assert s.ds.AcquisitionDateTime == "20210315101010"
    assert s.ds.PatientBirthDate == ""  # not a longitudinal date: Z
    basic = serve(write_source(tmp_path, "f.dcm", ds), plan_of(BASIC))
    assert basic.ds.StudyDate == ""
    assert basic.ds.ContentDate == "19000101"


def test_disabled_attributes_kept_verbatim(tmp_path: Path) -> None:
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = f"{UID_ROOT}77"
    ds = make_image(
        f"{UID_ROOT}41",
        SeriesDescription="Head Doe",
        ReferencedImageSequence=Sequence([ref]),
    )
    plan = compile_plan(
        BASIC.derive(
            "D",
            disabled=frozenset({0x00100010, 0x0008103E, 0x00081140, 0x00080020}),
        )
    )
    s = serve(write_source(tmp_path, "d.dcm", ds), plan)
    assert s.ds.PatientName == "Doe^John"
    assert s.ds.SeriesDescription == "Head Doe"
    assert s.ds.StudyDate == "20210315"
    assert s.ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == f"{UID_ROOT}77"
    assert s.ds.PatientID != "PID-0001"  # not disabled


def test_custom_rules_of_every_act(tmp_path: Path) -> None:
    ds = make_image(
        f"{UID_ROOT}51",
        SeriesDescription="Head of Doe",
        StudyDescription="CT Doe^John chest",
        ProtocolName="Protocol 7",
        OperatorsName="Smith^Anna",
        PerformedProcedureStepID="PPS-1",
        ImageComments="comment",
        DeviceSerialNumber="SN-42",
        StationName="CT01",
        InstitutionalDepartmentName="Radiology",
        OtherPatientIDs="OTHER-1",
        RequestingPhysician="Who^Dr",
    )
    rules = (
        Rule.parse("(0008,103E)", "keep"),
        Rule.parse("0008,1030", "clean"),
        Rule.parse("00181030", "remove"),
        Rule.parse("0008.1070", "empty"),
        Rule.parse("PerformedProcedureStepID", "dummy"),
        Rule.parse("AccessionNumber", "pseudonymize"),
        Rule.parse("StudyDate", "shift"),
        Rule.parse("(0018,1000)", "K"),
        Rule.parse("(0008,1010)", "X"),
        Rule.parse("(0008,1040)", "Z"),
        Rule.parse("(0020,4000)", "D"),
        Rule.parse("(0010,1000)", "Z/D"),
        Rule.parse("(0032,1032)", "X/Z"),
        Rule.parse("(0008,0080)", "X/D"),
        Rule.parse("(0008,0090)", "X/Z/D"),
        Rule.parse("Manufacturer", "C"),
        Rule.parse("(0020,0052)", "U"),
        Rule.parse("Rows", "keep"),
    )
    plan = compile_plan(BASIC.derive("Custom", rules=rules))
    path = write_source(tmp_path, "r.dcm", ds)
    s = serve(path, plan)
    o = s.ds
    assert o.SeriesDescription == "Head of Doe"  # keep: verbatim
    assert "Doe" not in o.StudyDescription
    assert "chest" in o.StudyDescription
    assert "ProtocolName" not in o  # remove
    assert o.OperatorsName == ""  # empty
    assert o.PerformedProcedureStepID not in ("", "PPS-1")  # dummy
    assert o.AccessionNumber not in ("", "ACC12345")
    assert len(o.AccessionNumber) == 16
    shift = pseudonymizer().date_shift_days("PID-0001")
    assert _days(o.StudyDate, "20210315") == shift  # shift: the patient's days
    assert o.DeviceSerialNumber == "SN-42"  # K
    assert "StationName" not in o  # X
    assert o.InstitutionalDepartmentName == ""  # Z
    assert o.ImageComments not in ("", "comment")  # D
    assert str(o.OtherPatientIDs) in ("",) or "OTHER-1" not in str(o.OtherPatientIDs)  # Z/D
    assert o.get("RequestingPhysician", "") == ""  # X/Z
    assert "InstitutionName" not in o  # X/D: X for a Type 3 attribute
    assert o.get("ReferringPhysicianName", "") == ""  # X/Z/D: Z
    assert o.Manufacturer == "ACME Medical"  # C: nothing identifying in it
    assert str(o.FrameOfReferenceUID).startswith("2.25.")  # U
    assert o.Rows == 8
    # pseudonymize is deterministic across files: same value, same token.
    again = make_image(f"{UID_ROOT}52")
    t = serve(write_source(tmp_path, "r2.dcm", again), plan)
    assert t.ds.AccessionNumber == o.AccessionNumber
    assert s.view.report.counts
    assert "Doe" not in repr(s.view.report)


def test_same_key_same_bytes_other_key_other_uids(tmp_path: Path) -> None:
    path = _study(tmp_path)[2]
    plan = plan_of(BASIC)
    one = serve(path, plan, pseudonymizer(KEY))
    two = serve(path, compile_plan(BASIC), pseudonymizer(KEY))
    assert one.data == two.data
    assert one.relpath == two.relpath
    other = serve(path, plan, pseudonymizer(OTHER_KEY))
    assert other.data != one.data
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert other.ds[kw].value != one.ds[kw].value
    assert (
        other.ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        != one.ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    )


def test_same_bytes_in_another_process(tmp_path: Path) -> None:
    """No clock, no process state: a restart (or another machine) serves the same bytes."""
    path = _study(tmp_path)[2]
    code = (
        "import hashlib, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from leak_corpus import plan_of, serve\n"
        "from deidfs.deid.profiles import BASIC\n"
        "from pathlib import Path\n"
        "print(hashlib.sha256(serve(Path(sys.argv[1]), plan_of(BASIC)).data).hexdigest())\n"
    )
    here = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), here],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == hashlib.sha256(serve(path, plan_of(BASIC)).data).hexdigest()


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_encodings(tmp_path: Path, ts: str) -> None:
    ds = make_image(f"{UID_ROOT}61", SeriesDescription="Doe series")
    path = write_source(tmp_path, "e.dcm", ds, ts)
    s = serve(path, plan_of(BASIC))
    assert s.ds.file_meta.TransferSyntaxUID == ts
    assert s.ds.PatientName != "Doe^John"
    assert "SeriesDescription" not in s.ds
    assert s.ds.Rows == 8
    assert s.ds.PixelData == dcmread(path).PixelData
    assert b"Doe" not in s.data
    assert str(s.ds.SOPInstanceUID) == str(s.ds.file_meta.MediaStorageSOPInstanceUID)


def test_engine_does_not_modify_its_input() -> None:
    ds = make_image(f"{UID_ROOT}71")
    ds.SeriesDescription = "Doe"
    raw = dcmread(io.BytesIO(_bytes(ds)), stop_before_pixels=True)
    before = copy.deepcopy(raw)
    result = deidentify(raw, plan_of(BASIC), pseudonymizer(), has_pixels=True)
    assert raw == before
    assert raw.file_meta == before.file_meta
    assert result.dataset.PatientName != raw.PatientName


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "reason"),
    [
        ("1.2.840.10008.1.3.10", "dicomdir"),
        ("1.2.840.10008.5.1.4.1.1.104.1", "encapsulated_document"),
    ],
)
def test_engine_refusals(tmp_path: Path, sop_class: str, reason: str) -> None:
    ds = make_image(f"{UID_ROOT}81")
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    with pytest.raises(Refused) as info:
        serve(write_source(tmp_path, "x.dcm", ds), plan_of(BASIC))
    assert info.value.reason == reason


def test_pixel_profile_withholds_images_that_may_carry_burned_in_text(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}82", BurnedInAnnotation="YES")
    with pytest.raises(Refused) as info:
        serve(write_source(tmp_path, "x.dcm", ds), compile_plan(PIXEL))
    assert info.value.reason == "burned_in_no_mask"
    del ds.BurnedInAnnotation  # a CT without the flag: nothing suggests burned-in text
    s = serve(write_source(tmp_path, "x.dcm", ds), compile_plan(PIXEL))
    assert s.ds.PatientIdentityRemoved == "YES"
    for kw in ("PixelData", "Rows", "Columns", "BitsAllocated"):
        delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels to clean
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    s = serve(write_source(tmp_path, "x.dcm", ds), compile_plan(PIXEL))
    assert s.ds.PatientName != "Doe^John"
    assert "113101" in [i.CodeValue for i in s.ds.DeidentificationMethodCodeSequence]


def test_image_attributes_without_pixel_data_refused(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}86")
    del ds.PixelData
    with pytest.raises(Refused) as info:
        serve(write_source(tmp_path, "x.dcm", ds), plan_of(BASIC))
    assert info.value.reason == "no_pixel_data"


def test_missing_sop_instance_uid_refused(tmp_path: Path) -> None:
    ds = make_image(f"{UID_ROOT}83")
    del ds.SOPInstanceUID
    with pytest.raises(Refused) as info:
        serve(write_source(tmp_path, "x.dcm", ds), plan_of(BASIC))
    assert info.value.reason == "no_sop_instance_uid"


def test_custom_rule_removing_sop_instance_uid_is_refused_cleanly(tmp_path: Path) -> None:
    plan = compile_plan(BASIC.derive("R", rules=(Rule.parse("SOPInstanceUID", "remove"),)))
    with pytest.raises(Refused) as info:
        serve(write_source(tmp_path, "x.dcm", make_image(f"{UID_ROOT}84")), plan)
    assert info.value.reason == "no_sop_instance_uid"


def test_layouts(tmp_path: Path) -> None:
    path = write_source(tmp_path, "deep/dir/x.dcm", make_image(f"{UID_ROOT}85"))
    flat = serve(path, plan_of(BASIC), layout=Layout.FLAT)
    assert flat.relpath == PurePosixPath(f"{flat.ds.SOPInstanceUID}.dcm")
    mirror = serve(
        path, plan_of(BASIC), layout=Layout.MIRROR, source_rel=PurePosixPath("deep/dir/x.dcm")
    )
    assert mirror.relpath == PurePosixPath("deep/dir/x.dcm")


def test_clean_structured_content_and_basic_content_sequence(tmp_path: Path) -> None:
    """Basic replaces Content Sequence (D) with dummies; Clean Structured Content keeps it
    with identifying values of the instance taken out."""
    ds = make_image(f"{UID_ROOT}91")
    concept = Dataset()
    concept.CodeValue = "121071"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Finding"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = "Doe^John has a nodule, seen 2021-03-15 by House^Gregory"
    ds.ContentSequence = Sequence([item])
    path = write_source(tmp_path, "sr.dcm", ds)
    basic = serve(path, plan_of(BASIC))
    assert len(basic.ds.ContentSequence) == 1  # D: a value, not an empty sequence
    assert b"nodule" not in basic.data
    assert b"Doe" not in basic.data
    clean = serve(path, plan_of(BASIC, Option.CLEAN_STRUCTURED_CONTENT))
    text = clean.ds.ContentSequence[0].TextValue
    assert "nodule" in text
    assert "Doe" not in text
    assert "John" not in text
    assert "House" not in text
    assert "2021-03-15" not in text
    assert clean.ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"


def _served_values(s: Served) -> str:
    return repr(s.ds)


# -- X, X/Z and X/Z/D by the attribute's Type in its IOD (PS3.15 E.1.1) -------------------
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _study_references(ds: Dataset) -> None:
    """Referenced Study Sequence (X/Z) and Referenced Performed Procedure Step Sequence
    (X/Z/D), one item each."""
    study = _reference("1.2.840.10008.3.1.2.3.1", f"{UID_ROOT}61")
    step = _reference("1.2.840.10008.3.1.2.3.3", f"{UID_ROOT}62")
    ds.ReferencedStudySequence = Sequence([study])
    ds.ReferencedPerformedProcedureStepSequence = Sequence([step])


def test_type3_sequences_are_removed_not_emptied(tmp_path: Path) -> None:
    """Both are Type 3 in a CT image (General Study, General Series): zero items would be an
    invalid value, so X/Z and X/Z/D remove them."""
    ds = make_image(f"{UID_ROOT}60")
    _study_references(ds)
    s = serve(write_source(tmp_path, "ct.dcm", ds), plan_of(BASIC))
    assert "ReferencedStudySequence" not in s.ds
    assert "ReferencedPerformedProcedureStepSequence" not in s.ds
    assert f"{UID_ROOT}61".encode() not in s.data


def test_type2_sequences_are_emptied(tmp_path: Path) -> None:
    """In an SR document Referenced Performed Procedure Step Sequence is Type 2 (SR Document
    Series), and Referenced Study Sequence is Type 2 in the items of Referenced Request
    Sequence (SR Document General) but Type 3 at the top level (General Study)."""
    ds = make_image(f"{UID_ROOT}63")
    for kw in ("PixelData", "Rows", "Columns", "BitsAllocated"):
        delattr(ds, kw)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    _study_references(ds)
    request = Dataset()
    request.StudyInstanceUID = f"{UID_ROOT}64"
    request.ReferencedStudySequence = Sequence(
        [_reference("1.2.840.10008.3.1.2.3.1", f"{UID_ROOT}65")]
    )
    ds.ReferencedRequestSequence = Sequence([request])
    s = serve(write_source(tmp_path, "sr.dcm", ds), plan_of(BASIC))
    assert "ReferencedStudySequence" not in s.ds
    assert len(s.ds.ReferencedPerformedProcedureStepSequence) == 0
    inner = s.ds.ReferencedRequestSequence[0]
    assert "ReferencedStudySequence" in inner
    assert len(inner.ReferencedStudySequence) == 0
    for uid in (f"{UID_ROOT}61", f"{UID_ROOT}62", f"{UID_ROOT}65"):
        assert uid.encode() not in s.data


def test_type2c_attributes_of_a_patient_are_emptied_not_removed(tmp_path: Path) -> None:
    """Responsible Person and Responsible Organization (X) are Type 2C in the Patient Module
    (a veterinary patient): present, they stay present, empty. Responsible Person Role
    (Type 1C: only where Responsible Person has a value) goes with the person's name."""
    ds = make_image(f"{UID_ROOT}66")
    ds.PatientSpeciesDescription = "Canine species"
    ds.PatientBreedDescription = "Beagle"
    ds.ResponsiblePerson = "Owner^Olive"
    ds.ResponsiblePersonRole = "OWNER"
    ds.ResponsibleOrganization = "Kennel Club of Springfield"
    s = serve(write_source(tmp_path, "vet.dcm", ds), plan_of(BASIC))
    assert "ResponsiblePerson" in s.ds
    assert s.ds.ResponsiblePerson == ""
    assert "ResponsibleOrganization" in s.ds
    assert s.ds.ResponsibleOrganization == ""
    assert "ResponsiblePersonRole" not in s.ds
    assert b"Olive" not in s.data
    assert b"Kennel" not in s.data


def test_type3_attributes_of_an_unknown_iod_are_removed(tmp_path: Path) -> None:
    """A SOP Class the PS3.3 table does not know: nothing is known to be required, so the
    X/Z attributes are removed (they reveal nothing, present or not)."""
    ds = make_image(f"{UID_ROOT}67")
    ds.SOPClassUID = f"{UID_ROOT}999.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.ResponsiblePerson = "Owner^Olive"
    _study_references(ds)
    s = serve(write_source(tmp_path, "private.dcm", ds), plan_of(BASIC))
    for kw in (
        "ReferencedStudySequence",
        "ReferencedPerformedProcedureStepSequence",
        "ResponsiblePerson",
    ):
        assert kw not in s.ds, kw
