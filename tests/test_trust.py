"""An element is kept only when its bytes can be the attribute its tag names (issue 16.1).

Each case moves an identifying value onto a tag the profile keeps (a flipped tag byte, a
wrong VR, a value outside the VR's repertoire) and checks, in all three uncompressed
encodings and under Basic, HIPAA and +Pixel, that the value is never served: the element
is removed and counted, or the file is withheld when the IOD cannot lose the attribute.
"""

from __future__ import annotations

import warnings

import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deidfs.deid.profiles import BASIC, HIPAA, PIXEL
from deidfs.deid.trust import doubt
from deidfs.errors import Refused
from leak_corpus import UID_ROOT, make_image, part10_bytes, plan_of, serve_bytes

CANARY = "Doe^Jane, MRK0999991 of Springfield"
#: (tag the value is moved to, VR written): each tag is one the profiles keep.
MOVES = [
    (0x00181050, "PN"),  # Performing Physician's Name, one flipped byte: Spatial Resolution
    (0x00001030, "LO"),  # Study Description under the command group
    (0x00080008, "PN"),  # Patient's Name under Image Type
    (0x00080060, "LO"),  # Institution Name under Modality
    (0x00041130, "ST"),  # Institution Address under File-set ID
    (0x00180015, "LO"),  # Study Description under Body Part Examined
    (0x00280010, "PN"),  # Rows
    (0x00280030, "PN"),  # Pixel Spacing
    (0x00200013, "LO"),  # Instance Number
    (0x00080008, "CS"),  # the right VR, a value outside CS
    (0x00080016, "UI"),  # the right VR, a value that is no UID (structural)
]
ENCODINGS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
PROFILES = {"Basic": BASIC, "HIPAA": HIPAA, "Pixel": PIXEL}


def _source(tag: int, vr: str, ts: str, nested: bool) -> bytes:
    ds = make_image(f"{UID_ROOT}77")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        element = DataElement(tag, vr, CANARY)
        if nested:
            item = Dataset()
            item.add(element)
            ds.add(DataElement(0x00283010, "SQ", Sequence([item])))  # VOI LUT Sequence: kept
        else:
            if tag in ds:
                del ds[tag]
            ds.add(element)
        return part10_bytes(ds, ts)


@pytest.fixture(autouse=True)
def _lenient_pydicom() -> object:
    saved = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    yield None
    config.settings.reading_validation_mode = saved


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("ts", ENCODINGS, ids=lambda t: t.name.replace(" ", ""))
@pytest.mark.parametrize(("tag", "vr"), MOVES, ids=[f"{t:08X}-{v}" for t, v in MOVES])
def test_a_moved_value_is_never_served(
    tag: int, vr: str, ts: str, profile: str, nested: bool
) -> None:
    data = _source(tag, vr, ts, nested)
    try:
        served = serve_bytes(data, plan_of(PROFILES[profile]))
    except Refused as exc:
        refused = exc.reason
    else:
        refused = ""
    if refused:
        assert refused in (
            "untrusted_attribute",
            "bad_value",
            "truncated",
            "transfer_syntax_mismatch",
        ), refused
        return
    for needle in (b"MRK0999991", b"Springfield", b"Doe^Jane"):
        assert needle not in served.data
    counts = dict(served.view.report.counts)
    assert any(k.startswith(("untrusted_", "misplaced_")) for k in counts), counts


def test_the_checks_judge_bytes_not_tags() -> None:
    assert doubt(0x00080060, "CS", b"CT") is None
    assert doubt(0x00080060, "CS", b"GENERAL HOSPITAL") == "enumerated"
    assert doubt(0x00080008, None, b"ORIGINAL\\PRIMARY\\AXIAL ") is None
    assert doubt(0x00080008, None, b"Doe^John") == "repertoire"
    assert doubt(0x00181050, "PN", b"Smith^Jane") == "vr"
    assert doubt(0x00280030, "DS", b"0.5\\0.5 ") is None
    assert doubt(0x00280030, "DS", b"0.5\\0.5\\0.5 ") == "length"
    assert doubt(0x00280010, "US", b"\x00\x02") is None
    assert doubt(0x00280010, "US", b"\x00\x02\x00\x02") == "length"
    assert doubt(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00") is None
    assert doubt(0x00080016, "UI", b"Smith.Jane") == "repertoire"
    assert doubt(0x00291010, "PN", b"anything") is None  # private: judged elsewhere
