"""The DICOM data dictionary and registered UIDs, as pydicom ships them, read without
importing the ``pydicom`` package.

Importing ``pydicom`` also imports numpy and its pixel codecs (about 0.3 s), while the fast
path (:mod:`deidfs.deid.fastpath`) only needs pydicom's tables: the VR and keyword of a tag,
and whether a UID is registered in PS3.6. This module loads pydicom's own table modules
(``pydicom/_dicom_dict.py`` and ``pydicom/_uid_dict.py``, with their compiled bytecode)
from pydicom's installed package directory, so a run whose files all take the fast path
starts in a fraction of the time. The answers are pydicom's: the same tables, with the
same repeating-group rules as ``pydicom.datadict`` (a test compares them tag by tag). Where
the tables cannot be loaded that way (a zipped or frozen install), it imports them from
pydicom the usual way.

Also here: the VR sets of PS3.5 Table 7.1-1 the encoders need, and the settings of
pydicom's that change how it reads values, taken from pydicom only once something imported it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Final

__all__ = [
    "LONG_LENGTH_VRS",
    "SHORT_TEXT",
    "STANDARD_VRS",
    "TEXT_VRS",
    "datetime_conversion",
    "entry",
    "is_registered_uid",
    "keyword_for_tag",
    "length_fits",
    "name_of",
    "private_transfer_syntaxes",
    "tag_for_keyword",
    "text_is_clean",
    "vr_of",
]

#: Every VR of PS3.5 Table 7.1-1 (as ``pydicom.valuerep.STANDARD_VR``).
STANDARD_VRS: Final = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD",
        "OF", "OL", "OW", "OV", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI",
        "UL", "UN", "UR", "US", "UT", "UV",
    }
)  # fmt: skip
#: VRs whose explicit VR encoding has a 32-bit length (PS3.5 7.1.2; as
#: ``pydicom.valuerep.EXPLICIT_VR_LENGTH_32``).
LONG_LENGTH_VRS: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OW", "OV", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)

_Entry = tuple[str, str, str, str, str]  #: (VR, VM, name, retired, keyword)


@dataclass(frozen=True, slots=True)
class _Tables:
    exact: dict[int, _Entry]
    #: (value, mask, entry) of repeating-group rows such as ``(60xx,3000)``.
    repeaters: tuple[tuple[int, int, _Entry], ...]
    uids: frozenset[str]


def _load(name: str) -> ModuleType:
    """pydicom's table module ``name``, loaded from its file without running pydicom's
    package ``__init__``; imported normally when pydicom is already loaded or has no
    such file."""
    full = f"pydicom.{name}"
    loaded = sys.modules.get(full)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("pydicom")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / f"{name}.py"
        if not path.is_file():
            continue
        # A private name: pydicom, imported later, loads its own copy under its own name.
        sub = importlib.util.spec_from_file_location(f"deidfs.deid._pydicom{name}", path)
        if sub is None or sub.loader is None:
            break
        module = importlib.util.module_from_spec(sub)
        sub.loader.exec_module(module)
        return module
    return importlib.import_module(full)


@cache
def _tables() -> _Tables:
    dicom = _load("_dicom_dict")
    uid = _load("_uid_dict")
    repeaters = []
    for masked, row in dicom.RepeatersDictionary.items():
        # "60xx3000": the x digits may be anything, every other digit must match.
        value = int(masked.replace("x", "0"), 16)
        mask = int("".join("0" if c == "x" else "F" for c in masked), 16)
        repeaters.append((value, mask, row))
    return _Tables(dict(dicom.DicomDictionary), tuple(repeaters), frozenset(uid.UID_dictionary))


def entry(tag: int) -> _Entry:
    """The dictionary row of a public ``tag``: (VR, VM, name, retired, keyword), repeating
    groups such as ``(50xx,eeee)`` and ``(60xx,eeee)`` included.

    Raises
    ------
    KeyError
        For private and unknown tags.
    """
    tables = _tables()
    row = tables.exact.get(tag)
    if row is not None:
        return row
    if not tag >> 16 & 1:
        for value, mask, repeated in tables.repeaters:
            if (tag ^ value) & mask == 0:
                return repeated
    raise KeyError(tag)


def vr_of(tag: int) -> str:
    """The dictionary VR of ``tag`` (``pydicom.datadict.dictionary_VR``).

    Raises
    ------
    KeyError
        For private and unknown tags.
    """
    return entry(tag)[0]


def name_of(tag: int) -> str:
    """The dictionary name of ``tag``.

    Raises
    ------
    KeyError
        For private and unknown tags.
    """
    return entry(tag)[2]


def keyword_for_tag(tag: int) -> str:
    """The keyword of ``tag``, ``""`` for private and unknown tags."""
    try:
        return entry(tag)[4]
    except KeyError:
        return ""


@cache
def _keywords() -> dict[str, int]:
    return {row[4]: tag for tag, row in _tables().exact.items()}


def tag_for_keyword(keyword: str) -> int | None:
    """The tag of a DICOM ``keyword`` of the main dictionary, or None."""
    return _keywords().get(keyword)


def is_registered_uid(uid: str) -> bool:
    """True for UIDs PS3.6 registers (transfer syntaxes, SOP classes, coding schemes...)."""
    return uid in _tables().uids


def _pydicom_attribute(module: str, name: str, default: Any) -> Any:
    loaded = sys.modules.get(module)
    return getattr(loaded, name, default) if loaded is not None else default


def private_transfer_syntaxes() -> tuple[str, ...]:
    """Transfer syntaxes registered with pydicom as private (none until pydicom is imported
    and something registers one)."""
    return tuple(str(ts) for ts in _pydicom_attribute("pydicom.uid", "PrivateTransferSyntaxes", ()))


def datetime_conversion() -> bool:
    """pydicom's ``config.datetime_conversion`` (False until pydicom is imported)."""
    return bool(_pydicom_attribute("pydicom.config", "datetime_conversion", False))


#: Bytes per value of the VRs whose values have a fixed size (PS3.5 Table 6.2-1).
VALUE_SIZES: Final = {
    "US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8, "AT": 4,
}  # fmt: skip


def length_fits(tag: int, vr: str, length: int) -> bool:
    """Whether ``length`` bytes can be a value of ``tag`` with the fixed-size ``vr``: whole
    values, and no more of them than the dictionary's VM allows (an empty value always fits;
    private and unknown tags are judged by whole values only).

    A corrupt length makes an element take in the elements after it; kept as it is, their
    bytes (names, IDs) would travel inside a number's value.
    """
    size = VALUE_SIZES[vr]
    if length % size:
        return False
    if length == 0:
        return True
    try:
        vm = entry(tag)[1]
    except KeyError:
        return True
    most = vm.rpartition("-")[2]
    if not most.isdigit():
        return True  # "1-n", "2-2n": any number of values
    return length <= int(most) * size


#: The VRs whose values are character strings (PS3.5 Table 6.2-1).
TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)  # fmt: skip

#: What no character string holds (PS3.5 6.1.2, 6.2): a C0 control other than TAB, LF, FF,
#: CR and ESC (ISO 2022), or a NUL before the end (trailing NULs are padding). No character
#: set DICOM allows encodes a character with those bytes, while the header of any element
#: a corrupt length takes in holds them: a group number's high byte, a short length.
BAD_TEXT: Final = re.compile(rb"[\x01-\x08\x0b\x0e-\x1a\x1c-\x1f]|\x00+[^\x00]")


#: Longest value that needs no :data:`BAD_TEXT` check: an element taken in by a corrupt
#: length starts with its 8-byte header, so a value that holds any of its value's bytes is
#: longer than that.
SHORT_TEXT: Final = 8


def text_is_clean(value: bytes) -> bool:
    """Whether ``value`` can be a kept character string as it is (see :data:`BAD_TEXT`).

    A corrupt length makes a kept text element take in the elements after it; kept as it
    is, their values (names, IDs) would travel inside it. Values of up to
    :data:`SHORT_TEXT` bytes cannot hold one and are not searched (the fast path keeps most
    values, and this is on its hot path).
    """
    return len(value) <= SHORT_TEXT or BAD_TEXT.search(value) is None
