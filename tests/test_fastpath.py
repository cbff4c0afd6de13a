"""The fast path (:mod:`deidfs.deid.fastpath`) against the reference path, byte for byte.

For every source and profile, the view the fast path builds (when it does not decline) must
equal the view of the reference path (pydicom parse, engine, encoder): header, offsets,
trailer, name and report. Sources: every file of pydicom's test data, the leak corpus,
synthetic CT headers like the benchmark's (with their variations: character sets, undefined
lengths, private blocks, burned-in flags, trailing padding), and Hypothesis-built data sets
of raw values that exercise the re-encoding rules. The fast path must also handle the
common cases, so a fast path that silently declines everything fails here.

pydicom's value warnings are ignored, as in production (pytest would make them errors,
which the reference path turns into refusals).
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from deidfs.deid import fastpath
from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import BASIC, BUILTIN_PROFILES, Profile, Rule
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.errors import Refused
from deidfs.view.render import MAX_HEADER_BYTES, Layout, SourceStat, View, _render_fast, render
from leak_corpus import KEY, build_leak_dataset, file_meta, part10_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PSEUDO = Pseudonymizer(KEY)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SOURCE_REL = PurePosixPath("in/a/b.dcm")

#: Custom rules of every act, on attributes the synthetic headers hold (top level, inside
#: sequences, private), in two arrangements so each attribute meets several acts.
RULE_TAGS = (
    "(0008,103E)",
    "PatientID",
    "(0010,0010)",
    "0008,0080",
    "(0008,0020)",
    "0020000D",
    "(0008,1155)",
    "(0040,A730)",
    "(0008,0060)",
    "(0018,1030)",
    "(0010,1010)",
    "(0009,1001)",
    "(0028,0030)",
    "(0008,0008)",
    "(0020,0013)",
    "(0008,1032)",
    "(0040,0275)",
    "(0008,0104)",
    "(0018,0050)",
)
ACTS = (
    "keep",
    "remove",
    "empty",
    "dummy",
    "pseudonymize",
    "shift",
    "K",
    "X",
    "Z",
    "D",
    "C",
    "U",
    "Z/D",
    "X/Z",
    "X/D",
    "X/Z/D",
    "X/Z/U*",
)


def _profiles() -> dict[str, Profile]:
    profiles = dict(BUILTIN_PROFILES)
    for option in Option:
        profiles[option.value] = BASIC.derive(f"opt-{option.value}", options=frozenset({option}))
    for shift in (0, 7):
        rules = tuple(
            Rule.parse(tag, ACTS[(i + shift) % len(ACTS)]) for i, tag in enumerate(RULE_TAGS)
        )
        profiles[f"rules-{shift}"] = BASIC.derive(f"rules-{shift}", rules=rules)
    # Rules whose acts the fast path does itself (no C, no shift, no kept sequence).
    plain = (
        ("(0008,103E)", "keep"),
        ("PatientID", "pseudonymize"),
        ("(0010,0010)", "dummy"),
        ("0008,0080", "Z"),
        ("(0008,0020)", "X"),
        ("0020000D", "K"),
        ("(0008,1155)", "U"),
        ("(0040,A730)", "D"),
        ("(0008,0060)", "X/Z"),
        ("(0018,1030)", "X/D"),
        ("(0010,1010)", "Z/D"),
        ("(0009,1001)", "keep"),
        ("(0028,0030)", "X/Z/D"),
        ("(0008,0008)", "empty"),
        ("(0020,0013)", "remove"),
        ("(0008,1032)", "X/Z/U*"),
        ("(0040,0275)", "D"),
        ("(0008,0104)", "pseudonymize"),
        ("(0018,0050)", "dummy"),
        ("(0020,0032)", "dummy"),
        ("(0008,0070)", "U"),
    )
    profiles["rules-plain"] = BASIC.derive(
        "rules-plain", rules=tuple(Rule.parse(tag, act) for tag, act in plain)
    )
    profiles["disabled"] = BASIC.derive(
        "disabled", disabled=frozenset({0x0008103E, 0x00100010, 0x00080080, 0x00101010})
    )
    # A disabled sequence is kept as it is (VERBATIM): the reference path's.
    profiles["disabled-sequences"] = BASIC.derive(
        "disabled-sequences", disabled=frozenset({0x00081032, 0x00400275})
    )
    return profiles


PROFILES = _profiles()
_PLANS: dict[str, Plan] = {}


def plan(name: str) -> Plan:
    if name not in _PLANS:
        _PLANS[name] = compile_plan(PROFILES[name])
    return _PLANS[name]


# -- the comparison --------------------------------------------------------------------------
def views(
    data: bytes, the_plan: Plan, layout: Layout = Layout.DICOM
) -> tuple[View | str, View | None]:
    """(reference view or refusal reason, fast view or None when the fast path declines)."""
    stat = SourceStat(0, 0, len(data), 0, 0)
    try:
        reference: View | str = render(
            io.BytesIO(data), stat, the_plan, PSEUDO, layout, SOURCE_REL, fast=False
        )
    except Refused as exc:
        reference = exc.reason
    fast = _render_fast(
        io.BytesIO(data), stat, the_plan, PSEUDO, layout, SOURCE_REL, MAX_HEADER_BYTES
    )
    return reference, fast


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return (
        f"at byte {at} of {len(a)}/{len(b)}: {a[at - 24 : at + 24]!r} != {b[at - 24 : at + 24]!r}"
    )


def check_same(data: bytes, the_plan: Plan, layout: Layout = Layout.DICOM) -> bool:
    """Assert the fast view (if any) equals the reference one; True if the fast path served."""
    reference, fast = views(data, the_plan, layout)
    if fast is None:
        return False
    assert isinstance(reference, View), f"the fast path serves what is refused: {reference}"
    for name in ("header", "trailer"):
        a, b = getattr(fast, name), getattr(reference, name)
        assert a == b, f"{name} differs {_first_difference(a, b)}"
    assert fast.report == reference.report
    assert fast == reference
    return True


def decline_reason(data: bytes, the_plan: Plan) -> str:
    """Why the fast path declines ``data`` ("" when it serves it)."""
    try:
        fastpath.deidentify_header(data, len(data), the_plan, PSEUDO)
    except fastpath.Decline as exc:
        return exc.reason
    return ""


# -- sources -----------------------------------------------------------------------------------
def pydicom_files() -> dict[str, bytes]:
    return {
        Path(path).name: Path(path).read_bytes()
        for path in sorted(get_testdata_files())
        if Path(path).is_file()
    }


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def synthetic_ct(n: int, seed: int = 7) -> bytes:
    """A realistic CT header like the benchmark's, varied by ``n``: character set, padding,
    undefined lengths, private blocks, burned-in flag, trailing padding, modality."""
    rng = random.Random(seed * 1000 + n)  # noqa: S311 - test data, not a secret
    ds = Dataset()
    charset = rng.choice(["ISO_IR 100", "ISO_IR 100", "ISO_IR 192", None])
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240312"
    ds.InstanceCreationTime = "101530"
    ds.SOPClassUID = US_IMAGE if n % 11 == 5 else CT_IMAGE
    sop = f"1.2.826.0.1.3680043.10.999.7.{seed}.{n}"
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20240312"
    ds.SeriesDate = "20240312"
    ds.ContentDate = "20240312"
    ds.StudyTime = "100512"
    ds.AcquisitionTime = "101011.250000"
    ds.AccessionNumber = f"ACC{n:06d}"
    ds.Modality = "US" if n % 11 == 5 else "CT"
    ds.Manufacturer = "ACME MEDICAL SYSTEMS"
    ds.InstitutionName = "Saint Example General Hospital "
    ds.InstitutionAddress = "1 Example Street, Springfield"
    ds.ReferringPhysicianName = "Referrer^Rita^^Dr"
    ds.StationName = "CTSCAN01"
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS"
    procedure = Sequence([_code("CTCAP", "L", "CT chest abdomen pelvis")])
    procedure.is_undefined_length = n % 3 == 0
    ds.ProcedureCodeSequence = procedure
    ds.SeriesDescription = rng.choice(["AXIAL 1.25mm", "AXIAL 1.25mm ", "AX\\COR"])
    ds.OperatorsName = ["Tech^Tina", "Tech^Tom"] if n % 4 == 1 else "Tech^Tina"
    ds.ManufacturerModelName = "ScanMaster 128"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.999.8.{n}"
    ref.is_undefined_length_sequence_item = n % 5 == 0
    ds.ReferencedPerformedProcedureStepSequence = Sequence([ref])
    region = _code("T-D3000", "SRT", "Chest ")
    region.AnatomicRegionModifierSequence = Sequence([_code("G-A101", "SRT", "Left")])
    ds.AnatomicRegionSequence = Sequence([region, Dataset()] if n % 6 == 2 else [region])
    ds.PatientName = f"Doe^Patient{n % 3}"
    ds.PatientID = "" if n % 13 == 4 else f"PID{n % 3:06d}"
    ds.PatientBirthDate = "19580423"
    ds.PatientSex = "M"
    ds.OtherPatientIDs = "MRN-77-1234"
    ds.PatientAge = "065Y"
    ds.PatientSize = "1.78"
    ds.PatientWeight = "82.5"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "SN-CT-000451"
    ds.SoftwareVersions = ["CT_SW_4.2.1", "B"]
    ds.ProtocolName = "CHEST ABD PELVIS ROUTINE"
    ds.ReconstructionDiameter = " 380"
    ds.ExposureTime = "500"
    ds.RevolutionTime = 0.5
    ds.CTDIvol = 12.4
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.1.{n % 2}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.2.{n % 4}"
    ds.StudyID = "S1001"
    ds.SeriesNumber = n % 4 + 1
    ds.InstanceNumber = n + 1
    ds.ImagePositionPatient = ["-190.000", "-190.000", f"{n * 1.25:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = f"1.2.826.0.1.3680043.10.999.3.{n % 2}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.PixelSpacing = ["0.742188", "0.742188"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if n % 7 == 3:
        ds.BurnedInAnnotation = "YES"
    elif n % 7 == 4:
        ds.BurnedInAnnotation = "NO"
    attrs = Dataset()
    attrs.RequestedProcedureID = "RP0001"
    attrs.AccessionNumber = f"ACC{n:06d}"
    ds.RequestAttributesSequence = Sequence([attrs])
    block = ds.private_block(0x0009, "ACME CT PRIVATE 1.0", create=True)
    block.add_new(0x01, "LO", "Scanner room 3")
    block.add_new(0x02, "DS", "1.5")
    block.add_new(0x10, "OB", bytes(rng.getrandbits(8) for _ in range(16)))
    if n % 2:
        other = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)  # in Table E.3.10-1
        other.add_new(0x23, "DS", "2")
        other.add_new(0x8C, "SS", 3)
    if n % 10 == 7:
        # A header larger than the fast path's first read.
        ds.private_block(0x0029, "ACME BIG", create=True).add_new(0x10, "OB", bytes(40000))
    ds.PixelData = bytes(range(32))
    ds.file_meta = file_meta(ds.SOPClassUID, sop)
    data = part10_bytes(ds)
    if n % 9 == 8:
        data += b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<L", 4) + b"\x00" * 4
    return data


def _leak_sources() -> dict[str, bytes]:
    leak = build_leak_dataset().ds
    return {
        "leak-explicit": part10_bytes(leak),
        "leak-implicit": part10_bytes(build_leak_dataset().ds, ImplicitVRLittleEndian),
    }


SYNTHETIC = [synthetic_ct(n) for n in range(40)]


# -- tests: corpora ------------------------------------------------------------------------------
def test_every_pydicom_file_under_basic() -> None:
    handled = 0
    for name, data in pydicom_files().items():
        try:
            handled += check_same(data, plan("Basic"))
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    assert handled >= 100  # most of pydicom's files are explicit VR little endian


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_common_files_take_the_fast_path(name: str) -> None:
    data = next(d for n, d in pydicom_files().items() if n == name)
    reason = decline_reason(data, plan("Basic"))
    if name == "rtplan.dcm":
        assert reason == "encoding"  # implicit VR: the reference path's
        return
    # MR_small and CT_small end with trailing padding: the first call tells where pixel data
    # starts, the second (with the trailer) serves; render does both.
    assert check_same(data, plan("Basic"))


def test_synthetic_headers_under_basic_mostly_take_the_fast_path() -> None:
    served = sum(check_same(data, plan("Basic")) for data in SYNTHETIC)
    assert served >= 0.9 * len(SYNTHETIC)


@pytest.mark.parametrize("profile", sorted(set(PROFILES) - {"Basic"}))
def test_every_profile_on_synthetic_and_leak_sources(profile: str) -> None:
    served = 0
    sources = {f"ct{n}": data for n, data in enumerate(SYNTHETIC[:12])} | _leak_sources()
    for name, data in sources.items():
        try:
            served += check_same(data, plan(profile))
        except AssertionError as exc:
            raise AssertionError(f"{profile} {name}: {exc}") from exc
    if profile in ("HIPAA", "+Pixel"):
        assert served == 0  # age caps and pixel rules belong to the reference path
    elif profile in ("retain_uids", "retain_institution_identity", "disabled", "rules-plain"):
        assert served >= 10


@pytest.mark.parametrize("profile", ["retain_safe_private", "clean_graphics", "rules-0", "rules-7"])
def test_profiles_on_pydicom_files(profile: str) -> None:
    for name, data in list(pydicom_files().items())[::3]:
        try:
            check_same(data, plan(profile))
        except AssertionError as exc:
            raise AssertionError(f"{profile} {name}: {exc}") from exc


def test_leak_corpus_takes_the_fast_path_under_basic() -> None:
    sources = _leak_sources()
    assert check_same(sources["leak-explicit"], plan("Basic"))
    assert not check_same(sources["leak-implicit"], plan("Basic"))


@pytest.mark.parametrize("layout", list(Layout))
def test_every_layout_names_the_same_file(layout: Layout) -> None:
    for data in SYNTHETIC[:6]:
        assert check_same(data, plan("Basic"), layout)


# -- tests: declines ---------------------------------------------------------------------------
def test_pixel_rules_and_age_caps_are_declined() -> None:
    data = SYNTHETIC[0]
    assert decline_reason(data, plan("+Pixel")) == "pixel_rules"
    assert decline_reason(data, plan("HIPAA")) == "age_cap"
    masked = BASIC.derive("masks", apply_masks=True)
    assert decline_reason(data, compile_plan(masked)) == "pixel_rules"


def test_clean_and_shift_are_declined() -> None:
    assert decline_reason(SYNTHETIC[0], plan("clean_descriptors")).startswith("op_clean")


def test_other_encodings_are_declined() -> None:
    ds = build_leak_dataset().ds
    assert decline_reason(part10_bytes(ds, ImplicitVRLittleEndian), plan("Basic")) == "encoding"
    assert decline_reason(SYNTHETIC[0][132:], plan("Basic")) == "no_preamble"


def test_a_short_buffer_asks_for_more() -> None:
    data = SYNTHETIC[1]
    with pytest.raises(fastpath.NeedMore) as info:
        fastpath.deidentify_header(data[:600], len(data), plan("Basic"), PSEUDO)
    assert 600 < info.value.length <= len(data)


def test_a_truncated_source_is_left_to_the_reference_path() -> None:
    data = SYNTHETIC[2]
    for cut in (140, 400, 1000, len(data) - 40):
        reference, fast = views(data[:cut], plan("Basic"))
        assert fast is None or fast == reference


def test_a_source_cut_at_any_element_boundary() -> None:
    """Every prefix that ends between two top-level elements: a smaller data set that is
    served the same way, or refused (Rows and Columns without Pixel Data) by both paths."""
    data = SYNTHETIC[4]
    pos = 132
    served = 0
    while True:
        group, elem, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            length = struct.unpack_from("<L", data, pos + 8)[0]
            if length == 0xFFFFFFFF:
                break  # the undefined-length sequence: its end is found by walking it
            pos += 12 + length
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
        if (group, elem) >= (0x7FE0, 0x0010):
            break
        served += check_same(data[:pos], plan("Basic"))
    assert served > 10


def test_large_headers_are_read_to_their_end() -> None:
    data = SYNTHETIC[7]
    assert len(data) > 40000
    with pytest.raises(fastpath.NeedMore):
        fastpath.deidentify_header(data[:16384], len(data), plan("Basic"), PSEUDO)
    assert check_same(data, plan("Basic"))


def test_anonymize_imports_no_daemon_module() -> None:
    """``deidfs anonymize`` imports its own subcommand's modules, not the daemon's."""
    code = (
        "import sys\n"
        "from deidfs.cli.main import main\n"
        "try:\n"
        "    main(['anonymize', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('deidfs'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split("\n")[-2].split())
    assert "deidfs.cli.anonymize_cmd" in loaded
    for module in (
        "deidfs.service.core",
        "deidfs.mount.ops",
        "deidfs.config.edit",
        "deidfs.evidence.report",
    ):
        assert module not in loaded


def test_every_subcommand_is_mapped_to_its_module() -> None:
    from deidfs.cli.main import COMMANDS, MODULES, build_parser, command_module

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    assert set(COMMANDS.values()) == set(MODULES)
    for name, module in COMMANDS.items():
        only = build_parser(module)
        only_sub = next(a for a in only._actions if isinstance(a, argparse._SubParsersAction))
        assert name in only_sub.choices
    assert command_module(["--config", "x.toml", "anonymize", "a"]) == "anonymize_cmd"
    assert command_module(["--log-level=debug", "run"]) == "run_cmd"
    assert command_module(["--help"]) is None
    assert command_module(["no-such-command"]) is None


def test_the_fast_path_costs_less_than_the_reference() -> None:
    """Not a timing test: counts Python function calls, which do not depend on the machine."""
    import cProfile
    import pstats

    data = SYNTHETIC[3]

    def calls(fast: bool) -> int:
        profile = cProfile.Profile()
        stat = SourceStat(0, 0, len(data), 0, 0)
        profile.enable()
        render(io.BytesIO(data), stat, plan("Basic"), PSEUDO, fast=fast)
        profile.disable()
        return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]

    assert calls(True) * 4 < calls(False)


# -- tests: Hypothesis, raw values through both paths ------------------------------------------
#: (tag, VR) of public elements the random data sets draw from: every action of the Basic
#: profile, strings of every kind, numbers, binary values.
ELEMENTS = (
    (0x00080008, "CS"),
    (0x00080012, "DA"),
    (0x00080013, "TM"),
    (0x00080020, "DA"),
    (0x0008002A, "DT"),
    (0x00080050, "SH"),
    (0x00080060, "CS"),
    (0x00080070, "LO"),
    (0x00080080, "LO"),
    (0x00080090, "PN"),
    (0x00080100, "SH"),
    (0x00080104, "LO"),
    (0x00081030, "LO"),
    (0x0008103E, "LO"),
    (0x00081090, "LO"),
    (0x00081155, "UI"),
    (0x00100010, "PN"),
    (0x00100020, "LO"),
    (0x00100030, "DA"),
    (0x00101010, "AS"),
    (0x00101020, "DS"),
    (0x00102000, "LO"),
    (0x00180015, "CS"),
    (0x00181000, "LO"),
    (0x00181030, "LO"),
    (0x00200011, "IS"),
    (0x00200013, "IS"),
    (0x00200032, "DS"),
    (0x00204000, "LT"),
    (0x00280002, "US"),
    (0x00280030, "DS"),
    (0x00281052, "DS"),
    (0x00282110, "CS"),
    (0x00180088, "DS"),
    (0x00189306, "FD"),
    (0x00181150, "IS"),
    (0x00321032, "PN"),
    (0x00400254, "LO"),
    (0x0040A160, "UT"),
    (0x00080201, "SH"),
    (0x00081010, "SH"),
    (0x00200052, "UI"),
    (0x00282000, "OB"),
    (0x00720052, "AT"),
    (0x00081080, "LO"),
    (0x00380500, "LO"),
    (0x00181020, "LO"),
    (0x0040A124, "UI"),
    (0x0040E001, "ST"),
    (0x00082111, "ST"),
    (0x00180050, "DS"),
    (0x00281050, "DS"),
    (0x0018700A, "SH"),
    (0x00080081, "ST"),
    (0x00280301, "CS"),
    (0x00280010, "US"),
    (0x00280011, "US"),
    (0x00280100, "US"),
    (0x00280008, "IS"),
    (0x00280004, "CS"),
    (0x00100021, "LO"),
)
SEQUENCES = (0x00082218, 0x00081110, 0x0040A730, 0x00081032, 0x00400275, 0x00081140)

_TEXT = st.text(alphabet=st.sampled_from(list("AZaz09 .^-=\\")), max_size=20)


@st.composite
def raw_value(draw: st.DrawFn, vr: str) -> bytes:
    """Raw value bytes for ``vr``: well-formed often, padded oddly, sometimes not ASCII or
    of a wrong length."""
    kind = draw(st.integers(0, 9))
    if vr in ("US", "SS", "UL", "FL", "FD", "AT"):
        size = {"US": 2, "SS": 2, "UL": 4, "FL": 4, "FD": 8, "AT": 4}[vr]
        count = draw(st.integers(0, 3))
        extra = 1 if kind == 0 else 0
        return draw(st.binary(min_size=size * count + extra, max_size=size * count + extra))
    if vr == "OB":
        return draw(st.binary(max_size=9))
    if vr == "UI":
        parts = draw(
            st.lists(
                st.sampled_from(["1.2.3", "1.2.840.10008.1.2.1", "", "2.25.9"]),
                min_size=1,
                max_size=3,
            )
        )
        text = "\\".join(parts).encode()
    elif vr in ("IS", "DS"):
        parts = draw(
            st.lists(
                st.sampled_from(["1", "-12", "+3", " 4 ", "1.5", "2e3", "", " ", "x", ".5", "1_0"]),
                min_size=1,
                max_size=3,
            )
        )
        text = "\\".join(parts).encode()
    elif vr in ("DA", "TM", "DT"):
        text = draw(st.sampled_from([b"20240312", b"101530.5", b"2024", b"", b"2024-03-12", b"x"]))
    else:
        text = draw(_TEXT).encode()
    if kind == 1:
        text += b"\x00"
    elif kind == 2:
        text += b"  "
    elif kind == 3:
        text = b" " + text
    elif kind == 4 and vr not in ("UI", "IS", "DS"):
        text += draw(st.sampled_from([b"\xe9", b"\x1b$B", b"\t"]))
    return text


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR"):
        return head + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _sequence(tag: int, items: list[bytes], undefined: bool, undefined_items: bool) -> bytes:
    body = b""
    for item in items:
        if undefined_items:
            body += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        else:
            body += b"\xfe\xff\x00\xe0" + struct.pack("<L", len(item)) + item
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\x00\x00"
    if undefined:
        return head + b"\xff\xff\xff\xff" + body + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return head + struct.pack("<L", len(body)) + body


@st.composite
def data_set(draw: st.DrawFn, depth: int = 0) -> dict[int, bytes]:
    """The encoded elements of a random data set, by tag."""
    chosen = draw(st.lists(st.sampled_from(ELEMENTS), max_size=8 if depth else 14, unique=True))
    elements = {tag: _explicit(tag, vr, draw(raw_value(vr))) for tag, vr in chosen}
    if depth < 2:
        for tag in draw(st.lists(st.sampled_from(SEQUENCES), max_size=2, unique=True)):
            items = [_joined(item) for item in draw(st.lists(data_set(depth + 1), max_size=2))]
            elements[tag] = _sequence(tag, items, draw(st.booleans()), draw(st.booleans()))
    if draw(st.booleans()):
        # GEMS_ACQU_01 (0019,xx23) DS and (0019,xx9E) LO are safe private attributes.
        creator = draw(st.sampled_from([b"GEMS_ACQU_01", b"GEMS_ACQU_01  ", b"ACME 1.0"]))
        elements[0x00190010] = _explicit(0x00190010, "LO", creator)
        elements[0x00191001] = _explicit(0x00191001, "LO", draw(raw_value("LO")))
        elements[0x00191023] = _explicit(0x00191023, "DS", draw(raw_value("DS")))
        elements[0x0019109E] = _explicit(0x0019109E, "LO", draw(raw_value("LO")))
    if depth < 2 and draw(st.booleans()):
        # (2001,xx5F) of Philips Imaging DD 001 is a safe private sequence: its items are
        # walked like any kept sequence's, private blocks included.
        elements[0x20010010] = _explicit(0x20010010, "LO", b"Philips Imaging DD 001")
        items = [_joined(item) for item in draw(st.lists(data_set(depth + 1), max_size=2))]
        elements[0x2001105F] = _sequence(0x2001105F, items, draw(st.booleans()), False)
    return elements


def _joined(elements: dict[int, bytes]) -> bytes:
    return b"".join(elements[tag] for tag in sorted(elements))


@st.composite
def source(draw: st.DrawFn) -> bytes:
    charset = draw(st.sampled_from([None, b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 6", b"GB18030"]))
    sop_class = draw(st.sampled_from([CT_IMAGE, US_IMAGE]))
    elements = draw(data_set())
    elements |= {
        0x00080016: _explicit(0x00080016, "UI", sop_class.encode() + b"\x00"),
        0x00080018: _explicit(0x00080018, "UI", b"1.2.826.0.1.3680043.10.999.5.1"),
        0x0020000D: _explicit(0x0020000D, "UI", b"1.2.826.0.1.3680043.10.999.5.2"),
    }
    if charset is not None:
        elements[0x00080005] = _explicit(0x00080005, "CS", charset + b" " * (len(charset) % 2))
    encoded = _joined(elements)
    if draw(st.booleans()):
        encoded += _explicit(0x7FE00010, "OW", bytes(8))
    meta = file_meta(sop_class, "1.2.826.0.1.3680043.10.999.5.1")
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return bytes(buf.getvalue()) + encoded


HYPOTHESIS_PLANS = (
    "Basic",
    "retain_uids",
    "rules-0",
    "rules-7",
    "rules-plain",
    "disabled",
    "disabled-sequences",
    "retain_safe_private",
)
_OUTCOMES: Counter[str] = Counter()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The same 300 data sets every run: the share the fast path serves (checked below) is
    # then a figure of the code, not of the draw (one random draw in CI gave 24%).
    derandomize=True,
)
@given(data=source(), plan_name=st.sampled_from(HYPOTHESIS_PLANS))
def test_random_data_sets_through_both_paths(data: bytes, plan_name: str) -> None:
    reason = decline_reason(data, plan(plan_name))
    assert not reason.startswith("internal"), reason
    served = check_same(data, plan(plan_name))
    # Values outside their VR's repertoire are the reference path's by design (it removes
    # them and counts why), and so are pixel bytes past the image (it zeroes them); the fast
    # path must serve a fair share of the rest.
    if served:
        outcome = "served"
    elif reason == "untrusted":
        outcome = "untrusted"
    else:
        reference = views(data, plan(plan_name))[0]
        excess = isinstance(reference, View) and "pixel_excess_zeroed" in dict(
            reference.report.counts
        )
        outcome = "excess" if excess else "declined"
    _OUTCOMES[outcome] += 1


def test_random_data_sets_are_mostly_served() -> None:
    """Run after the Hypothesis test (file order): it must have exercised the fast path."""
    if sum(_OUTCOMES.values()) < 50:
        pytest.skip("the Hypothesis test did not run first")
    assert _OUTCOMES["served"] >= 0.3 * (_OUTCOMES["served"] + _OUTCOMES["declined"])
    assert _OUTCOMES["served"] >= 30, _OUTCOMES


# -- actions that depend on the attribute's Type in the instance's IOD -------------------------
_TYPE_CASES = {
    # SOP Class (data set, file meta) -> Referenced Performed Procedure Step Sequence served
    # as: None (removed, Type 3), 0 (emptied, Type 2) or 1 (its item kept, Type 1C: D)
    "ct": (("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2"), None),
    "sr": (("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.11"), 0),
    "seg": (("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.4"), 1),
    "unknown": (("1.2.826.0.1.3680043.10.999.5", "1.2.826.0.1.3680043.10.999.5"), None),
    "meta only": ((None, "1.2.840.10008.5.1.4.1.1.88.11"), 0),
}


@pytest.mark.parametrize("case", sorted(_TYPE_CASES))
def test_type_dependent_actions_take_the_fast_path_and_match(case: str) -> None:
    """X/Z and X/Z/D by the attribute's Type at its place in the IOD: the fast path reads
    SOP Class UID ahead (Instance Creation Date, X/D, comes before it), falls back on the
    file meta's, and decides in nested items by their sequence, as the engine does."""
    (sop_class, media_class), expected = _TYPE_CASES[case]
    ds = Dataset()
    ds.InstanceCreationDate = "20240312"
    ds.SOPClassUID = sop_class
    if sop_class is None:
        del ds.SOPClassUID
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.9.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.9.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.9.3"
    ds.Modality = "OT"
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.999.9.4"
    ds.ReferencedStudySequence = Sequence([study])
    step = Dataset()
    step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    step.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.999.9.5"
    ds.ReferencedPerformedProcedureStepSequence = Sequence([step])
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-9"
    ds.ResponsiblePerson = "Owner^Olive"
    ds.ResponsiblePersonRole = "OWNER"
    request = Dataset()
    request.ReferencedStudySequence = Sequence([study])
    ds.ReferencedRequestSequence = Sequence([request])
    ds.file_meta = file_meta(media_class, ds.SOPInstanceUID)
    data = part10_bytes(ds)
    assert decline_reason(data, plan("Basic")) == ""
    assert check_same(data, plan("Basic"))
    reference, _fast = views(data, plan("Basic"))
    assert isinstance(reference, View)
    out = dcmread(io.BytesIO(reference.header))
    served = out.get("ReferencedPerformedProcedureStepSequence")
    assert (None if served is None else len(served)) == expected
    assert "ReferencedStudySequence" not in out  # Type 3 at the top level of every IOD
    inner = out.ReferencedRequestSequence[0].get("ReferencedStudySequence")
    assert (inner is not None) is (expected == 0)  # Type 2 in SR Document General's items
    assert "ResponsiblePersonRole" not in out
    assert ("ResponsiblePerson" in out) is (case != "unknown")  # Type 2C in the Patient Module
