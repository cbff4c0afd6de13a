"""Element values as the engine reads and writes them with pydicom.

The value representations the engine treats as text and numbers and their length limits,
the dummies by VR, and the small helpers of :mod:`deidfs.deid.engine`: a raw value
read from a data set (undecoded elements converted), a value as a list or as plain text, the VR
an element is judged by, a new or emptied element, a fixed-size value's length and a text
value's bytes. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from deidfs.deid.dictionary import VALUE_SIZES

_STRING_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "AS"})


_MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "AS": 4}


_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "IS", "DS", "AT"})


_DUMMY_TEXT = "ANONYMIZED"


_DUMMY_BY_VR: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": "urn:deidfs:anonymized",
}


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _raw_value(ds: Dataset, tag: int, charset: Any) -> Any:
    if tag not in ds:
        return None
    raw = ds.get_item(tag)
    try:
        elem = (
            convert_raw_data_element(raw, encoding=charset, ds=ds)
            if isinstance(raw, RawDataElement)
            else raw
        )
    except Exception:  # a bad value is treated as absent here
        return None
    return elem.value


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list | MultiValue):
        return list(value)
    return [value]


def _vr_of(raw: RawDataElement | DataElement, tag: int) -> str:
    vr = raw.VR
    if vr and vr != "UN":
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return str(vr or "UN")


def _element(tag: int, vr: str, value: Any) -> DataElement:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return DataElement(tag, vr, value)


def _empty(tag: int, vr: str) -> DataElement:
    if vr == "SQ":
        return DataElement(tag, "SQ", Sequence())
    if vr in _STRING_VRS or vr in ("DA", "DT", "TM", "UI"):
        return DataElement(tag, vr, "")
    return DataElement(tag, vr, None)


def _fit(vr: str, text: str) -> str:
    limit = _MAX_LEN.get(vr)
    return text[:limit] if limit else text


def _value_length(elem: RawDataElement | DataElement, vr: str) -> int:
    """The length of a fixed-size element's value: as read, or as many values as it holds
    once converted (image attributes are converted to decide about pixels)."""
    if isinstance(elem, RawDataElement):
        return int(elem.length)
    return int(elem.VM) * VALUE_SIZES[vr]


def _text_bytes(elem: RawDataElement | DataElement) -> bytes:
    """A text element's value as read, or as pydicom converted it (characters of a
    converted value that are control characters stay such in UTF-8)."""
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list | MultiValue) else [value]
    return "\\".join(str(v) for v in items).encode("utf-8", "surrogateescape")


PATIENT_ID = 0x00100020


PATIENT_NAME = 0x00100010


PATIENT_AGE = 0x00101010


PATIENT_BIRTH_DATE = 0x00100030


SOP_CLASS_UID = 0x00080016


SOP_INSTANCE_UID = 0x00080018


SPECIFIC_CHARACTER_SET = 0x00080005


BURNED_IN_ANNOTATION = 0x00280301
