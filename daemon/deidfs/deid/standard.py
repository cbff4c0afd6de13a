"""PS3.15 2026d Table E.1-1 and Table E.3.10-1, and PS3.16 CID 7050, as package data.

The JSON files under ``data/`` are the tables as published in machine-readable form (their
source, edition and byte digests are recorded beside them, in ``data/README.md`` and
``data/SHA256SUMS``); ``EDITION`` names the edition. They are read once, lazily, on first use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any

from deidfs.deid import attribute_types
from deidfs.deid.tags import parse_tag

EDITION = "2026d"
E1_1_FILE = "ps3.15-2026d-table-E.1-1.json"
E3_10_1_FILE = "ps3.15-2026d-table-E.3.10-1.json"
CID_7050_FILE = "ps3.16-2026d-cid-7050.json"


class Action(Enum):
    """Action codes of PS3.15 E.1.1, plus the custom acts of deidfs profiles."""

    KEEP = "K"
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    CLEAN = "C"
    UID = "U"
    EMPTY_OR_DUMMY = "Z/D"
    REMOVE_OR_EMPTY = "X/Z"
    REMOVE_OR_DUMMY = "X/D"
    REMOVE_OR_EMPTY_OR_DUMMY = "X/Z/D"
    REMOVE_OR_EMPTY_OR_UIDS = "X/Z/U*"
    PSEUDONYMIZE = "pseudonymize"
    SHIFT = "shift"


class Option(Enum):
    """The profile options of PS3.15 E.3 (column keys of Table E.1-1, plus Clean Pixel Data)."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain_longitudinal_full_dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"
    CLEAN_PIXEL_DATA = "clean_pixel_data"


#: CID 7050 code value of each option (PS3.16); the Basic Profile itself is 113100.
OPTION_CODES: dict[Option, str] = {
    Option.CLEAN_PIXEL_DATA: "113101",
    Option.CLEAN_GRAPHICS: "113103",
    Option.CLEAN_STRUCTURED_CONTENT: "113104",
    Option.CLEAN_DESCRIPTORS: "113105",
    Option.RETAIN_LONGITUDINAL_FULL_DATES: "113106",
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: "113107",
    Option.RETAIN_PATIENT_CHARACTERISTICS: "113108",
    Option.RETAIN_DEVICE_IDENTITY: "113109",
    Option.RETAIN_UIDS: "113110",
    Option.RETAIN_SAFE_PRIVATE: "113111",
    Option.RETAIN_INSTITUTION_IDENTITY: "113112",
}
BASIC_PROFILE_CODE = "113100"


@dataclass(frozen=True, slots=True)
class TagPattern:
    """A Table E.1-1 tag: an exact tag (mask all ones) or a repeating group pattern."""

    value: int
    mask: int

    def matches(self, tag: int) -> bool:
        return (tag & self.mask) == self.value

    @property
    def is_exact(self) -> bool:
        return self.mask == 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class StandardRow:
    """One row of PS3.15 Table E.1-1."""

    name: str
    tag_text: str
    pattern: TagPattern | None  #: None for the private-attributes row
    retired: bool
    in_standard_iod: bool
    basic: Action
    options: tuple[tuple[Option, Action], ...]

    def option_action(self, option: Option) -> Action | None:
        for opt, act in self.options:
            if opt is option:
                return act
        return None


@dataclass(frozen=True, slots=True)
class SafePrivate:
    """One row of PS3.15 Table E.3.10-1: a private element that is safe to retain."""

    group: int
    element_low: int  #: the element number within its private block (the ``yy`` of xxyy)
    creator: str
    vr: str
    meaning: str


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept (CID 7050 row)."""

    value: str
    scheme: str
    meaning: str


def _parse_pattern(text: str) -> TagPattern | None:
    if "gggg" in text:
        return None
    if "x" not in text.lower().replace("0x", ""):
        tag = parse_tag(text)
        return TagPattern(tag, 0xFFFFFFFF)
    digits = text.strip("()").replace(",", "")
    value = 0
    mask = 0
    for ch in digits:
        value <<= 4
        mask <<= 4
        if ch.lower() != "x":
            value |= int(ch, 16)
            mask |= 0xF
    return TagPattern(value, mask)


def _load(name: str) -> dict[str, Any]:
    text = resources.files("deidfs.deid").joinpath("data", name).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def e1_1_rows() -> tuple[StandardRow, ...]:
    """All rows of PS3.15 Table E.1-1 (edition :data:`EDITION`)."""
    data = _load(E1_1_FILE)
    rows = []
    for r in data["rows"]:
        options = tuple((Option(key), Action(value)) for key, value in sorted(r["options"].items()))
        rows.append(
            StandardRow(
                name=r["name"],
                tag_text=r["tag"],
                pattern=_parse_pattern(r["tag"]),
                retired=bool(r["retired"]),
                in_standard_iod=bool(r["in_standard_iod"]),
                basic=Action(r["basic_profile"]),
                options=options,
            )
        )
    return tuple(rows)


@cache
def safe_private_rows() -> tuple[SafePrivate, ...]:
    """All rows of PS3.15 Table E.3.10-1 (Safe Private Attributes)."""
    out = []
    for r in _load(E3_10_1_FILE)["rows"]:
        group_text, elem_text = r["tag"].strip("()").split(",")
        out.append(
            SafePrivate(
                group=int(group_text, 16),
                element_low=int(elem_text[-2:], 16),
                creator=r["private_creator"].strip(),
                vr=r["vr"],
                meaning=r["meaning"],
            )
        )
    return tuple(out)


@cache
def cid_7050() -> dict[str, Code]:
    """CID 7050 De-identification Method codes, by code value."""
    return {
        r["code_value"]: Code(r["code_value"], r["scheme_designator"], r["code_meaning"])
        for r in _load(CID_7050_FILE)["rows"]
    }


def method_codes(options: Iterable[Option]) -> tuple[Code, ...]:
    """The De-identification Method Code Sequence's codes for a profile with ``options``:
    the Basic Profile, then each option, by code value (PS3.15 E.1.1)."""
    codes = cid_7050()
    values = [BASIC_PROFILE_CODE, *sorted(OPTION_CODES[o] for o in set(options))]
    return tuple(codes[value] for value in values)


def table_digest_source() -> str:
    """The content digests of the bundled tables (attribute Types included), so plan digests
    change with the tables."""
    tables = [_load(name)["content_sha256"] for name in (E1_1_FILE, E3_10_1_FILE)]
    return "|".join([*tables, attribute_types.digest()])
