"""Test data with unique markers, and helpers to render and search what deidfs serves.

A *marker* is a value planted in one attribute at one place (top level, a nested sequence
item three levels down, a private block, the file meta group, the file name) that occurs
nowhere else. Text VRs carry ``MRK0<5 digits>1``; the digits 0 and 1 never occur in the
base32 tokens deidfs writes, so every marker is found by searching for ``MRK0`` alone.
Dates, times, UIDs and numbers carry unique values that are valid for their VR.

Used by the engine leak test and by the mount tests, which search served bytes the same way.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import BASIC, Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.deid.tags import parse_tag
from deidfs.deid.trust import ENUMERATED
from deidfs.view.render import (
    Layout,
    SourceStat,
    View,
    read_view,
    render,
    render_path,
    write_view,
)

KEY = b"deidfs-test-key-0123456789abcdef"
OTHER_KEY = b"deidfs-other-key-fedcba987654321"
MARKER_PREFIX = b"MRK0"
UID_ROOT = "1.2.826.0.1.3680043.10.999."  #: planted UIDs; 2.25 pseudonyms never contain it
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})

#: Sequences Table E.1-1 does not list (Basic keeps them and recurses): the nested plants
#: live in VOI LUT Sequence > Anatomic Region Sequence > Anatomic Region Modifier Sequence.
UNLISTED_SEQUENCES = (0x00283010, 0x00082218, 0x00082220)
CODE_MEANING = 0x00080104  #: not in the table: kept wherever its item is kept
REFERENCED_SOP_INSTANCE_UID = 0x00081155
PRIVATE_GROUP = 0x0009


def pseudonymizer(key: bytes = KEY) -> Pseudonymizer:
    return Pseudonymizer(key)


def plan_of(profile: Profile = BASIC, *options: Option, **changes: Any) -> Plan:
    """Compile ``profile``, or a profile derived from it with extra options or changes."""
    if options or changes:
        opts = profile.options | frozenset(options)
        profile = profile.derive(f"{profile.name}+test", options=opts, **changes)
    return compile_plan(profile)


# -- files ---------------------------------------------------------------------------------
def file_meta(sop_class: str, sop_instance: str, ts: str = ExplicitVRLittleEndian) -> Any:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.999.1")
    return meta


def part10_bytes(ds: Dataset, ts: str | None = None) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta) in its meta's transfer syntax.

    Written element by element, not with ``dcmwrite``, which would overwrite a planted Media
    Storage SOP Instance UID and refuses command elements that real sources may hold.
    """
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = UID(ts)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    buf.is_implicit_VR = syntax.is_implicit_VR
    buf.is_little_endian = syntax.is_little_endian
    write_dataset(buf, ds)
    return buf.getvalue()


def write_source(directory: Path, name: str, ds: Dataset, ts: str | None = None) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(ds, ts))
    return path


def make_image(
    sop: str,
    study: str = f"{UID_ROOT}1",
    series: str = f"{UID_ROOT}2",
    patient_id: str = "PID-0001",
    patient_name: str = "Doe^John",
    rows: int = 8,
    columns: int = 8,
    **attrs: Any,
) -> Dataset:
    """A small, valid CT image (16-bit pixels whose bytes encode their index)."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = f"{study}.9"
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700215"
    ds.PatientSex = "F"
    ds.StudyDate = "20210315"
    ds.StudyTime = "101112"
    ds.SeriesDate = "20210315"
    ds.ContentDate = "20210316"
    ds.ContentTime = "121314.5"
    ds.AccessionNumber = "ACC12345"
    ds.StudyID = "STUDY1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.KVP = "120"
    ds.PixelData = bytes(i % 251 for i in range(rows * columns * 2))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta = file_meta(CT_IMAGE, sop)
    return ds


@dataclass(frozen=True)
class Served:
    """One rendered source: its view, the served bytes and the bytes parsed back."""

    view: View
    data: bytes
    ds: Dataset

    @property
    def relpath(self) -> PurePosixPath:
        return self.view.relpath


def serve_bytes(data: bytes, plan: Plan, pseudo: Pseudonymizer | None = None) -> Served:
    """Render an in-memory source (no file name) and parse the served bytes back."""
    stat = SourceStat(0, 0, len(data), 0, 0)
    view = render(io.BytesIO(data), stat, plan, pseudo or pseudonymizer())
    pixels = data[view.pixel_offset : view.pixel_offset + view.pixel_length]
    served = view.header + pixels + view.trailer
    assert len(served) == view.size
    return Served(view, served, dcmread(io.BytesIO(served)))


def serve(
    path: Path,
    plan: Plan,
    pseudo: Pseudonymizer | None = None,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
) -> Served:
    """Render ``path`` and return exactly the bytes a reader gets, parsed back by pydicom.

    The bytes come from :func:`read_view` in odd-sized chunks (as FUSE reads) and from
    :func:`write_view` (as export writes); both must be identical.
    """
    view = render_path(path, plan, pseudo or pseudonymizer(), layout, source_rel)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        at = 0
        while at < view.size:
            chunk = read_view(view, fd, at, 4093)
            assert chunk, "read_view returned nothing before the end"
            chunks.append(chunk)
            at += len(chunk)
        data = b"".join(chunks)
        out_path = path.parent / f".{path.name}.written"
        with open(out_path, "wb") as out:
            write_view(view, fd, out)
        written = out_path.read_bytes()
        out_path.unlink()
    finally:
        os.close(fd)
    assert len(data) == view.size
    assert written == data, "write_view and read_view disagree"
    return Served(view, data, dcmread(io.BytesIO(data)))


# -- walking output --------------------------------------------------------------------------
def iter_elements(ds: Dataset, depth: int = 0) -> Iterator[tuple[int, DataElement, int]]:
    """Every element of ``ds`` and its sequence items, with its nesting depth."""
    for elem in ds:
        yield int(elem.tag), elem, depth
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                yield from iter_elements(item, depth + 1)


def value_texts(ds: Dataset) -> set[str]:
    """Every non-binary value in ``ds`` (file meta and nested items included), as text."""
    out: set[str] = set()
    sources = [ds]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        sources.append(meta)
    for src in sources:
        for _tag, elem, _depth in iter_elements(src):
            if elem.VR == "SQ" or isinstance(elem.value, bytes | bytearray):
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            out.update(str(v).strip() for v in values if v is not None)
    return out


# -- the leak corpus -----------------------------------------------------------------------
@dataclass(frozen=True)
class TableRow:
    tag: int
    text: str
    name: str
    basic: str
    options: Mapping[str, str]


def table_rows() -> list[TableRow]:
    """The exact-tag rows of Table E.1-1, read from the package data (not via deidfs code)."""
    path = resources.files("deidfs.deid").joinpath("data", "ps3.15-2026d-table-E.1-1.json")
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return [
        TableRow(parse_tag(r["tag"]), r["tag"], r["name"], r["basic_profile"], r["options"])
        for r in rows
        if "x" not in r["tag"].lower() and "gggg" not in r["tag"]
    ]


_ROWS_BY_TAG = {r.tag: r for r in table_rows()}
#: PS3.3 C.7.1.3: Clinical Trial Protocol Ethics Committee Name is Type 1C, required if
#: (and only if) Clinical Trial Protocol Ethics Committee Approval Number is present.
_CONDITIONED_ON = {0x00120081: 0x00120082}


def condition_dropped(row: TableRow, options: Iterable[Option]) -> bool:
    """Whether ``row``'s attribute is Type 1C on another attribute's value that ``options``
    do not keep: it goes with that value (PS3.3), whatever its own action says."""
    leader = _CONDITIONED_ON.get(row.tag)
    return leader is not None and row_action(_ROWS_BY_TAG[leader], options) != "K"


def row_action(row: TableRow, options: Iterable[Option]) -> str:
    """PS3.15 action under ``options``; where two options set a cell, C wins over K."""
    cells = [row.options[o.value] for o in options if o.value in row.options]
    if not cells:
        return row.basic
    return "C" if "C" in cells else cells[0]


#: Actions that keep a sequence and its items (the items get the plan applied inside).
STRUCTURE_KEPT = frozenset({"K", "C", "D", "U", "X/Z/U*"})


@dataclass(frozen=True)
class Plant:
    """One planted value."""

    n: int
    #: top, nested, deep, inner (item of a table sequence), private, safe (private, listed
    #: in Table E.3.10-1), meta, name
    where: str
    tag: int
    vr: str
    value_text: str | None  #: searched among the output's values (None: bytes only)
    needle: bytes | None  #: searched in the output bytes and the output path
    row: TableRow | None = None  #: the Table E.1-1 row that decides it
    parent: TableRow | None = None  #: for "inner" plants: the table sequence holding it
    at: str = ""  #: for "inner" plants: where the table sequence is (top, nested, deep)


@dataclass
class LeakCorpus:
    """A dataset with markers everywhere, and the record of every marker."""

    ds: Dataset
    plants: list[Plant]
    file_name: str
    #: rows not planted, with the reason (see build_leak_dataset)
    skipped: dict[str, list[str]] = field(default_factory=dict)


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


_DATES: dict[int, int] = {}  #: plant number -> rank among dated plants (see _unique_date)


def _marker(n: int) -> str:
    return f"MRK0{n:05d}1"


def _unique_date(n: int) -> str:
    """A date no other plant has, and no modification of another plant's date can give.

    Never January 1st, so keeping only the year never reproduces it; eleven years apart,
    so shifting every date of the instance by up to ten years (the per-patient shift)
    never turns one planted date into another.
    """
    k = _DATES.setdefault(n, len(_DATES))
    if k >= 800:
        raise ValueError("more dated plants than distinct years")
    return date(1000 + 11 * k, 2 + k % 10, 2 + k % 27).strftime("%Y%m%d")


def _value_for(vr: str, n: int) -> tuple[Any, str | None, bytes | None]:
    """(element value, value text to search, bytes to search) for a plant of ``vr``."""
    if vr in TEXT_VRS:
        m = _marker(n)
        return m, m, m.encode()
    if vr == "DA":
        d = _unique_date(n)
        return d, d, d.encode()
    if vr == "DT":
        d = _unique_date(n)
        return d + "123456", d + "123456", d.encode()
    if vr == "TM":
        t = f"1{n % 10}{n % 60:02d}{n % 59:02d}.{n:06d}"
        return t, t, t.encode()
    if vr == "UI":
        u = f"{UID_ROOT}{10000 + n}"
        return u, u, u.encode()
    if vr in BYTES_VRS:
        m = _marker(n).encode() + b"BB"  # even length, multiple of 4 and of 8 not needed
        if vr in ("OF", "OL"):
            m = m.ljust(16, b"B")
        if vr in ("OD", "OV"):
            m = m.ljust(16, b"B")
        return m, None, _marker(n).encode()
    if vr == "DS":
        s = f"7{n:05d}.25"
        return s, s, None
    if vr == "IS":
        s = f"8{n:05d}"
        return s, s, None
    if vr == "AS":
        s = f"{n % 1000:03d}W"
        return s, s, None
    if vr in ("US", "UL", "UV"):
        return 20000 + n, str(20000 + n), None
    if vr in ("SS", "SL", "SV"):
        return -(10000 + n), str(-(10000 + n)), None
    if vr in ("FL", "FD"):
        return 30000.5 + n, str(30000.5 + n), None
    raise ValueError(vr)


def _row_vr(row: TableRow) -> str | None:
    try:
        vr = str(dictionary_VR(row.tag))
    except KeyError:
        return None
    return vr.split(" or ", maxsplit=1)[0]


def _plant_rows(
    ds: Dataset, where: str, rows: list[TableRow], counter: _Counter, plants: list[Plant]
) -> None:
    """Plant every row in ``ds`` (one level)."""
    for row in rows:
        if row.tag >> 16 in (0x0000, 0x0002):
            continue  # command and file meta groups: see build_leak_dataset
        vr = _row_vr(row)
        n = counter.next()
        if vr is None:
            # Not in pydicom's data dictionary (new in 2026d): planted as UN bytes, the way
            # a reader that does not know the VR sees it.
            m = _marker(n).encode() + b"UU"
            ds.add(DataElement(row.tag, "UN", m))
            plants.append(Plant(n, where, row.tag, "UN", None, _marker(n).encode(), row))
            continue
        if vr == "SQ":
            item = Dataset()
            inner_n = counter.next()
            item.add_new(CODE_MEANING, "LO", _marker(inner_n))
            plants.append(
                Plant(
                    inner_n,
                    "inner",
                    CODE_MEANING,
                    "LO",
                    _marker(inner_n),
                    _marker(inner_n).encode(),
                    None,
                    row,
                    where,
                )
            )
            uid_n = counter.next()
            uid_value, uid_text, uid_needle = _value_for("UI", uid_n)
            item.add_new(REFERENCED_SOP_INSTANCE_UID, "UI", uid_value)
            plants.append(
                Plant(
                    uid_n,
                    "inner",
                    REFERENCED_SOP_INSTANCE_UID,
                    "UI",
                    uid_text,
                    uid_needle,
                    _ROWS_BY_TAG[REFERENCED_SOP_INSTANCE_UID],
                    row,
                    where,
                )
            )
            ds.add(DataElement(row.tag, "SQ", Sequence([item])))
            continue
        value, text, needle = _value_for(vr, n)
        if row.tag in ENUMERATED:
            # A value outside the enumerated ones is no value of the attribute (deidfs
            # removes it): the plant is the least common value the standard allows.
            value = text = min(ENUMERATED[row.tag], key=lambda v: (-len(v), v))
            needle = None
        ds.add(DataElement(row.tag, vr, value))
        plants.append(Plant(n, where, row.tag, vr, text, needle, row))


_ROWS_BY_TAG: dict[int, TableRow] = {}


def _private_block(
    ds: Dataset, where: str, counter: _Counter, plants: list[Plant], nested_item: bool
) -> None:
    """A private block whose creator, values and nested private sequence all carry markers."""
    g = PRIVATE_GROUP << 16

    def text(tag: int, vr: str) -> None:
        n = counter.next()
        value, vtext, needle = _value_for(vr, n)
        ds.add(DataElement(tag, vr, value))
        plants.append(Plant(n, where, tag, vr, vtext, needle))

    text(g | 0x0010, "LO")  # private creator, itself a marker
    text(g | 0x1001, "LO")
    text(g | 0x1004, "DA")
    text(g | 0x1005, "UI")
    n = counter.next()
    ds.add(DataElement(g | 0x1003, "UN", _marker(n).encode() + b"UU"))
    plants.append(Plant(n, where, g | 0x1003, "UN", None, _marker(n).encode()))
    text(g | 0x0001, "LO")  # elements (gggg,0001-000F) are never valid: removed
    text(0x00111001, "LO")  # a private element without its creator
    if nested_item:
        # Retain Safe Private keeps (0019,xx23) of GEMS_ACQU_01 (Table E.3.10-1), and only
        # that: not its neighbour in the block, not the same element of another creator.
        gems = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        other = ds.private_block(0x0019, "OTHER_VENDOR_01", create=True)
        for block, element, vr, where_ in (
            (gems, 0x23, "DS", "safe"),
            (gems, 0x22, "LO", where),
            (other, 0x23, "DS", where),
        ):
            n = counter.next()
            value, vtext, needle = _value_for(vr, n)
            block.add_new(element, vr, value)
            plants.append(Plant(n, where_, block.get_tag(element), vr, vtext, needle))
        item = Dataset()
        saved = ds
        ds = item
        text(g | 0x0010, "LO")
        text(g | 0x1001, "LO")
        text(0x00100010, "PN")  # a public identifying attribute inside a private sequence
        ds = saved
        saved.add(DataElement(g | 0x1002, "SQ", Sequence([item])))


def build_leak_dataset(with_pixels: bool = True) -> LeakCorpus:
    """A Secondary Capture image with a marker in every place PS3.15 says must not leak.

    * every exact-tag row of Table E.1-1 (all have a Basic action other than K), at top
      level, in an item of an unlisted sequence, and three sequence levels down; rows whose
      tag pydicom's dictionary does not know are planted as UN; a sequence row gets an item
      with an unlisted attribute and a Referenced SOP Instance UID, both marked;
    * a private block with marked creator, values, a private sequence and orphan elements;
    * the file meta group (its SOP Instance UID differs from the data set's, and its source
      AE title and private information are marked);
    * the file name (see :attr:`LeakCorpus.file_name`).
    """
    rows = table_rows()
    _ROWS_BY_TAG.update({r.tag: r for r in rows})
    counter = _Counter()
    plants: list[Plant] = []
    skipped: dict[str, list[str]] = {
        "file meta group rows (planted in file_meta instead)": [
            r.text for r in rows if r.tag >> 16 == 0x0002
        ],
        # DIMSE command elements (PS3.7 6.3) have no place in a Part 10 file; pydicom
        # reads a group 0000 at the start of a data set as an implicit VR command set.
        "command group rows (not part of a Part 10 data set)": [
            r.text for r in rows if r.tag >> 16 == 0x0000
        ],
    }

    deep = Dataset()
    _plant_rows(deep, "deep", rows, counter, plants)
    modifier = Dataset()
    modifier.add_new(UNLISTED_SEQUENCES[2], "SQ", Sequence([deep]))
    nested = Dataset()
    _plant_rows(nested, "nested", rows, counter, plants)
    _private_block(nested, "private", counter, plants, nested_item=False)
    nested.add_new(UNLISTED_SEQUENCES[1], "SQ", Sequence([modifier]))

    ds = Dataset()
    _plant_rows(ds, "top", rows, counter, plants)
    _private_block(ds, "private", counter, plants, nested_item=True)
    ds.add_new(UNLISTED_SEQUENCES[0], "SQ", Sequence([nested]))
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    sop_instance = str(ds.SOPInstanceUID)
    if with_pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 4
        ds.Columns = 4
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(range(16))

    n_meta = counter.next()
    meta = file_meta(SECONDARY_CAPTURE, f"{UID_ROOT}{10000 + n_meta}")
    plants.append(
        Plant(
            n_meta,
            "meta",
            0x00020003,
            "UI",
            f"{UID_ROOT}{10000 + n_meta}",
            f"{UID_ROOT}{10000 + n_meta}".encode(),
        )
    )
    for tag, vr in ((0x00020016, "AE"), (0x00020013, "SH"), (0x00020102, "OB")):
        n = counter.next()
        value, text, needle = _value_for(vr, n)
        meta.add_new(tag, vr, value)
        plants.append(Plant(n, "meta", tag, vr, text, needle))
    n = counter.next()
    meta.add_new(0x00020100, "UI", f"{UID_ROOT}{10000 + n}")
    plants.append(Plant(n, "meta", 0x00020100, "UI", None, f"{UID_ROOT}{10000 + n}".encode()))
    ds.file_meta = meta
    assert sop_instance != str(meta.MediaStorageSOPInstanceUID)

    n = counter.next()
    name = f"{_marker(n)}_Doe^John_19800101.dcm"
    plants.append(Plant(n, "name", 0, "", None, _marker(n).encode()))
    return LeakCorpus(ds, plants, name, skipped)


# -- expectations ----------------------------------------------------------------------------
def expectation(plant: Plant, options: frozenset[Option], year_only: bool = False) -> str:
    """``"absent"`` or ``"present"``: what ``plant`` must be under a profile's options.

    PS3.15 semantics, independent of the engine's code: K keeps the value; X, Z, D, U and
    the combined codes never let it through (D on a sequence replaces the text in its items);
    C on dates modifies them (shift or year only),
    on times keeps them when dates are shifted by whole days and empties them when only the
    year is kept, on text keeps it minus the instance's identifying values (a marker is not
    one, so it remains), on binary values removes them. Private elements outside Table
    E.3.10-1, the file meta group and file names never show a marker.
    """
    if plant.where in ("private", "meta", "name"):
        return "absent"
    if plant.where == "safe":
        return "present" if Option.RETAIN_SAFE_PRIVATE in options else "absent"
    if plant.where == "inner":
        assert plant.parent is not None
        parent = row_action(plant.parent, options)
        if parent not in STRUCTURE_KEPT:
            return "absent"
        if plant.row is None:
            # Unlisted text in a kept item: a D sequence's value is replaced (its text by
            # dummies), a C sequence's text cleaned, other kept sequences keep it.
            return "absent" if parent == "D" else "present"
    assert plant.row is not None
    if condition_dropped(plant.row, options):
        return "absent"
    action = row_action(plant.row, options)
    if action == "K":
        return "present"
    if action != "C":
        return "absent"
    if plant.vr in ("DA", "DT"):
        return "absent"
    if plant.vr == "TM":
        return "absent" if year_only else "present"
    if plant.vr in TEXT_VRS:
        return "present"  # a marker names nobody of this instance: cleaning keeps it
    return "absent"


#: A UID deidfs made (``2.25.`` and a 128-bit integer from the keyed hash).
_MADE_UID = re.compile(rb"2\.25\.\d{10,39}")


def find(plant: Plant, data: bytes, values: set[str], relpath: PurePosixPath) -> bool:
    """Whether ``plant`` shows in the served bytes, the parsed values or the served path.

    A needle of digits alone (a date, a time, a number) is not looked for inside the UIDs
    deidfs made: 39 digits of a keyed hash hold any 8-digit string now and then, by chance
    and depending on the key, without anything of the source in them.
    """
    if plant.needle is not None:
        where, path = data, str(relpath).encode()
        if plant.needle.isdigit():
            where, path = _MADE_UID.sub(b"", where), _MADE_UID.sub(b"", path)
        if plant.needle in where or plant.needle in path:
            return True
    return plant.value_text is not None and plant.value_text in values
