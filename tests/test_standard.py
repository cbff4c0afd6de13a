"""The bundled PS3.15 tables: the bytes recorded with them, their edition, fully loaded."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import pytest

from deidfs.deid import attribute_types, standard
from deidfs.deid.standard import (
    BASIC_PROFILE_CODE,
    EDITION,
    OPTION_CODES,
    Action,
    Option,
    cid_7050,
    e1_1_rows,
    safe_private_rows,
)

REPO = Path(__file__).resolve().parent.parent
DATA_FILES = (standard.E1_1_FILE, standard.E3_10_1_FILE, standard.CID_7050_FILE)
#: The PS3.3 table of attribute Types (deidfs.deid.attribute_types): generated, not an edition
#: of PS3.15, so it has its own checks below.
TYPES_FILE = attribute_types.TYPES_FILE
SUMS_FILE = "SHA256SUMS"


def _data_dir() -> Traversable:
    return resources.files("deidfs.deid").joinpath("data")


def _package_bytes(name: str) -> bytes:
    resource = _data_dir().joinpath(name)
    assert resource.is_file(), f"{name} is missing from the package data of deidfs.deid"
    return resource.read_bytes()


def _recorded_digests() -> dict[str, str]:
    """``SHA256SUMS`` (``sha256sum`` format) as a mapping of file name to digest."""
    out: dict[str, str] = {}
    for line in _package_bytes(SUMS_FILE).decode("ascii").splitlines():
        digest, name = line.split("  ", 1)
        assert name not in out, name
        out[name] = digest
    return out


def test_recorded_digests_cover_exactly_the_tables() -> None:
    assert set(_recorded_digests()) == {*DATA_FILES, TYPES_FILE}
    bundled = {r.name for r in _data_dir().iterdir() if r.name.endswith(".json")}
    assert bundled == {*DATA_FILES, TYPES_FILE}


@pytest.mark.parametrize("name", [*DATA_FILES, TYPES_FILE])
def test_package_copy_has_the_recorded_bytes(name: str) -> None:
    assert hashlib.sha256(_package_bytes(name)).hexdigest() == _recorded_digests()[name]


def test_readme_records_edition_and_files() -> None:
    readme = _package_bytes("README.md").decode("utf-8")
    assert f"Edition: **{EDITION}**" in readme
    for name in (*DATA_FILES, TYPES_FILE, SUMS_FILE):
        assert f"`{name}`" in readme, name


def test_every_data_file_is_installed_with_the_package() -> None:
    """The ``package-data`` globs of ``pyproject.toml`` take every file of ``data/``."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["deidfs.deid"]
    names = [p.name for p in (REPO / "daemon" / "deidfs" / "deid" / "data").iterdir()]
    assert set(names) >= {*DATA_FILES, SUMS_FILE, "README.md"}
    for name in names:
        assert any(fnmatch.fnmatch(f"data/{name}", g) for g in globs), name


@pytest.mark.parametrize("name", DATA_FILES)
def test_content_digest_matches_rows(name: str) -> None:
    data = json.loads(_package_bytes(name))
    blob = json.dumps(data["rows"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(blob.encode("utf-8")).hexdigest() == data["content_sha256"]


@pytest.mark.parametrize("name", DATA_FILES)
def test_edition_is_the_engines(name: str) -> None:
    data = json.loads(_package_bytes(name))
    assert data["edition"] == EDITION
    assert EDITION in name


def test_e1_1_rows_loaded_completely() -> None:
    rows = e1_1_rows()
    assert len(rows) == 657
    assert sum(r.retired for r in rows) == 102
    by_basic: dict[str, int] = {}
    for r in rows:
        by_basic[r.basic.value] = by_basic.get(r.basic.value, 0) + 1
    # Counts published with the tables (README "Verification done").
    assert by_basic == {
        "X": 417,
        "D": 93,
        "U": 55,
        "Z": 42,
        "X/D": 23,
        "X/Z": 11,
        "X/Z/D": 8,
        "Z/D": 6,
        "X/Z/U*": 2,
    }
    cells: dict[Option, int] = {}
    for r in rows:
        for opt, _act in r.options:
            cells[opt] = cells.get(opt, 0) + 1
    assert cells[Option.RETAIN_LONGITUDINAL_FULL_DATES] == 169
    assert cells[Option.RETAIN_LONGITUDINAL_MODIFIED_DATES] == 169
    assert cells[Option.CLEAN_DESCRIPTORS] == 141
    assert cells[Option.RETAIN_UIDS] == 60
    assert cells[Option.RETAIN_DEVICE_IDENTITY] == 59
    assert cells[Option.RETAIN_PATIENT_CHARACTERISTICS] == 19
    assert cells[Option.RETAIN_INSTITUTION_IDENTITY] == 10
    assert cells[Option.CLEAN_STRUCTURED_CONTENT] == 4
    assert cells[Option.CLEAN_GRAPHICS] == 4
    assert cells[Option.RETAIN_SAFE_PRIVATE] == 1


@pytest.mark.parametrize(
    ("tag", "basic", "options"),
    [
        (0x00100010, Action.EMPTY, {}),
        (0x00080018, Action.UID, {Option.RETAIN_UIDS: Action.KEEP}),
        (0x00100020, Action.EMPTY_OR_DUMMY, {}),
        (
            0x00080020,
            Action.EMPTY,
            {
                Option.RETAIN_LONGITUDINAL_FULL_DATES: Action.KEEP,
                Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: Action.CLEAN,
            },
        ),
        (0x0008103E, Action.REMOVE, {Option.CLEAN_DESCRIPTORS: Action.CLEAN}),
        (
            0x00080080,
            Action.REMOVE_OR_EMPTY_OR_DUMMY,
            {Option.RETAIN_INSTITUTION_IDENTITY: Action.KEEP},
        ),
    ],
)
def test_spot_checks(tag: int, basic: Action, options: dict[Option, Action]) -> None:
    (row,) = [r for r in e1_1_rows() if r.pattern is not None and r.pattern.value == tag]
    assert row.pattern is not None
    assert row.pattern.is_exact
    assert row.basic is basic
    for opt, act in options.items():
        assert row.option_action(opt) is act


def test_repeating_group_patterns() -> None:
    patterns = {r.tag_text: r.pattern for r in e1_1_rows() if r.pattern and not r.pattern.is_exact}
    assert set(patterns) == {"(50xx,xxxx)", "(60xx,3000)", "(60xx,4000)"}
    curve = patterns["(50xx,xxxx)"]
    overlay = patterns["(60xx,3000)"]
    assert curve is not None
    assert overlay is not None
    assert curve.matches(0x50000010)
    assert curve.matches(0x50FE3000)
    assert not curve.matches(0x51000010)
    assert overlay.matches(0x60003000)
    assert overlay.matches(0x601E3000)
    assert not overlay.matches(0x60004000)
    private = [r for r in e1_1_rows() if r.pattern is None]
    assert len(private) == 1
    assert private[0].basic is Action.REMOVE


def test_safe_private_rows() -> None:
    rows = safe_private_rows()
    assert len(rows) == 479
    assert any((r.group, r.element_low, r.creator) == (0x0019, 0x23, "GEMS_ACQU_01") for r in rows)
    # Mixed-case hex as published, e.g. (2001,xx0a): parsed all the same.
    assert all(0 <= r.element_low <= 0xFF and r.group & 1 for r in rows)


def test_cid_7050_covers_every_option() -> None:
    codes = cid_7050()
    assert codes[BASIC_PROFILE_CODE].meaning == "Basic Application Confidentiality Profile"
    assert set(OPTION_CODES) == set(Option)
    for opt, value in OPTION_CODES.items():
        code = codes[value]
        assert code.scheme == "DCM"
        # The meaning names the option (PS3.16 CID 7050), e.g. "Retain UIDs Option".
        assert code.meaning.endswith("Option"), (opt, code.meaning)
    assert codes[OPTION_CODES[Option.RETAIN_UIDS]].meaning == "Retain UIDs Option"
    assert codes[OPTION_CODES[Option.CLEAN_PIXEL_DATA]].meaning == "Clean Pixel Data Option"


def test_option_keys_are_the_table_columns() -> None:
    data = json.loads(_package_bytes(standard.E1_1_FILE))
    keys = {k for row in data["rows"] for k in row["options"]}
    assert keys == {o.value for o in Option} - {Option.CLEAN_PIXEL_DATA.value}


def test_attribute_types_digest_matches_its_content() -> None:
    data = json.loads(_package_bytes(TYPES_FILE))
    body = {key: data[key] for key in ("iods", "sop_classes", "entries")}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(blob.encode()).hexdigest() == data["content_sha256"]
    assert "highdicom" in data["source"]


@pytest.mark.parametrize(
    ("sop_class", "parent", "tag", "level"),
    [
        # PS3.3 C.7.2.1 General Study: Referenced Study Sequence is Type 3; C.7.3.1 General
        # Series: Referenced Performed Procedure Step Sequence is Type 3.
        ("1.2.840.10008.5.1.4.1.1.2", 0, 0x00081110, None),
        ("1.2.840.10008.5.1.4.1.1.2", 0, 0x00081111, None),
        # C.7.1.1 Patient: Responsible Person, Responsible Organization are Type 2C.
        ("1.2.840.10008.5.1.4.1.1.2", 0, 0x00102297, 2),
        ("1.2.840.10008.5.1.4.1.1.7", 0, 0x00102299, 2),
        # C.17.1 SR Document Series: Referenced Performed Procedure Step Sequence is Type 2;
        # C.17.2 SR Document General: Referenced Study Sequence is Type 2 in the items of
        # Referenced Request Sequence.
        ("1.2.840.10008.5.1.4.1.1.88.11", 0, 0x00081111, 2),
        ("1.2.840.10008.5.1.4.1.1.88.11", 0x0040A370, 0x00081110, 2),
        ("1.2.840.10008.5.1.4.1.1.88.11", 0, 0x00081110, None),
        # C.8.20.1 Segmentation Series: Referenced Performed Procedure Step Sequence is 1C.
        ("1.2.840.10008.5.1.4.1.1.66.4", 0, 0x00081111, 1),
        # A SOP Class the table does not know: nothing is known to be required.
        ("1.2.826.0.1.3680043.10.999.5", 0, 0x00102297, None),
    ],
)
def test_attribute_types_spot_checks(
    sop_class: str, parent: int, tag: int, level: int | None
) -> None:
    assert attribute_types.placements(sop_class).get((parent, tag)) == level
