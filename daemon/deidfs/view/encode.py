"""The encoder of the reference path: a de-identified data set written byte for byte as
pydicom's ``write_dataset`` (and ``write_file_meta_info``) would write it.

Elements the engine kept are written back from their raw source bytes behind a tag and
length encoded here; elements it made go through pydicom's own writer. Used by
:mod:`deidfs.view.reference` and :mod:`deidfs.view.deflated`. Importing it imports pydicom.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32, STANDARD_VR

from deidfs.view.model import PREAMBLE

#: Explicit VR encodings of the standard VRs, and those with a 32-bit length (PS3.5 7.1.2).
_VR_BYTES = {
    str(vr): str(vr).encode("ascii") + (b"\x00\x00" if vr in EXPLICIT_VR_LENGTH_32 else b"")
    for vr in STANDARD_VR
}
_VR_LENGTH_32 = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
#: pydicom's write_string VRs (any character set) and their padding; write_text VRs.
_STRING_PADDING = {"AE": " ", "AS": " ", "CS": " ", "DA": " ", "DT": " ", "TM": " ", "UR": " "}
_STRING_PADDING["UI"] = "\x00"
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_ASCII_SAFE_ENCODINGS = frozenset({"iso8859", "latin_1", "UTF8", "iso8859_2", "iso8859_3"})
_PACKERS = {
    little: (struct.Struct(e + "HH").pack, struct.Struct(e + "L").pack, struct.Struct(e + "H").pack)
    for little, e in ((True, "<"), (False, ">"))
}


def _encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """``write_dataset`` of pydicom, byte for byte, without its cost per unchanged element.

    Elements the engine kept are still the raw elements read from the source: their value
    bytes are written back as they are, behind a tag and length encoded here, exactly as
    pydicom's ``write_data_element`` does for raw elements. Elements the engine made go
    through pydicom's own writer; sequences are walked here so their kept items stay raw.
    A data set whose encoding or character set differs from its source's, which pydicom
    re-encodes whole, is handed to pydicom whole.
    """
    parts: list[bytes] = []
    _encode_into(parts, ds, implicit, little, default_encoding)
    return b"".join(parts)


def _pydicom_encode(
    ds: Dataset, implicit: bool, little: bool, parent_encoding: str | list[str]
) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = little
    write_dataset(buf, ds, parent_encoding)
    return buf.getvalue()


def _pydicom_element(
    elem: DataElement | RawDataElement, implicit: bool, little: bool, encoding: Any
) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = little
    write_data_element(buf, elem, encoding)
    return buf.getvalue()


def _encode_into(
    parts: list[bytes], ds: Dataset, implicit: bool, little: bool, parent_encoding: Any
) -> None:
    # The same test as pydicom's write_dataset for re-encoding a whole data set. Re-encoding
    # corrects ambiguous VRs, recursing into sequences, then decodes each raw element (its
    # own __getitem__); where there is no sequence and no ambiguous VR, the first does
    # nothing and the second is done below as pydicom does it.
    reencode = (
        ds.original_encoding != (implicit, little) or ds.original_character_set != ds._character_set
    )
    if reencode and any(elem.VR == "SQ" or elem.VR in AMBIGUOUS_VR for elem in ds._dict.values()):
        parts.append(_pydicom_encode(ds, implicit, little, parent_encoding))
        return
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    pack_tag, pack_ul, pack_us = _PACKERS[little]
    append = parts.append
    get_item = ds.get_item
    stored = ds._dict
    for tag in sorted(stored):
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0 and group > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        elem: DataElement | RawDataElement = ds[tag] if reencode else stored[tag]
        if isinstance(elem, RawDataElement) and elem.value is None:
            elem = get_item(tag)  # get_item converts a raw element without value
        if isinstance(elem, RawDataElement):
            value = elem.value
            if tag != 0x7FE00010 and isinstance(value, bytes):
                raw_vr = elem.VR
                undefined = elem.length == 0xFFFFFFFF
                length = 0xFFFFFFFF if undefined else len(value)
                if implicit:
                    head = pack_tag(group, element) + pack_ul(length)
                elif raw_vr in _VR_LENGTH_32:
                    head = pack_tag(group, element) + _VR_BYTES[raw_vr] + pack_ul(length)
                elif raw_vr in _VR_BYTES and not undefined and length <= 0xFFFF:
                    head = pack_tag(group, element) + _VR_BYTES[raw_vr] + pack_us(length)
                else:
                    append(_pydicom_element(elem, implicit, little, encoding))
                    continue
                append(head)
                append(value)
                if undefined:
                    append(pack_tag(0xFFFE, 0xE0DD) + b"\x00\x00\x00\x00")
                continue
            append(_pydicom_element(elem, implicit, little, encoding))
            continue
        vr = elem.VR
        if vr == "SQ" and not elem.is_buffered:
            _encode_sequence(parts, elem, implicit, little, encoding)
            continue
        text = _ascii_value(elem, vr, encoding)
        if text is not None:
            if implicit:
                append(pack_tag(group, element) + pack_ul(len(text)))
            elif vr in _VR_LENGTH_32:
                append(pack_tag(group, element) + _VR_BYTES[vr] + pack_ul(len(text)))
            else:
                append(pack_tag(group, element) + _VR_BYTES[vr] + pack_us(len(text)))
            append(text)
            continue
        append(_pydicom_element(elem, implicit, little, encoding))


def _ascii_value(elem: DataElement, vr: str, encoding: Any) -> bytes | None:
    """The value bytes pydicom writes for a single ASCII string value, or None to let
    pydicom write it (any other value, a text VR in a character set that could escape)."""
    value = elem.value
    if not isinstance(value, str) or not value.isascii() or len(value) > 0xFFFE:
        return None
    pad = _STRING_PADDING.get(vr)
    if pad is None:
        if vr not in _TEXT_VRS:
            return None
        # write_text encodes with the data set's first character set: ASCII maps to
        # itself in these, while ISO 2022 and multi-byte sets may add escape sequences.
        first = convert_encodings(encoding or [default_encoding])[0]
        if first not in _ASCII_SAFE_ENCODINGS:
            return None
        pad = " "
    if len(value) % 2:
        value += pad
    return value.encode("ascii")


def _encode_sequence(
    parts: list[bytes], elem: DataElement, implicit: bool, little: bool, encoding: Any
) -> None:
    """pydicom's write_data_element and write_sequence(_item) for a sequence, items here."""
    e = "<" if little else ">"
    tag = int(elem.tag)
    encodings = convert_encodings(encoding or [default_encoding])
    body: list[bytes] = []
    if not elem.is_empty:
        item_head = struct.pack(e + "HH", 0xFFFE, 0xE000)
        for item in elem.value:
            inner: list[bytes] = []
            _encode_into(inner, item, implicit, little, encodings)
            data = b"".join(inner)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body.append(item_head + b"\xff\xff\xff\xff" + data)
                body.append(struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0))
            else:
                body.append(item_head + struct.pack(e + "L", len(data)) + data)
    value = b"".join(body)
    undefined = elem.is_undefined_length
    length = struct.pack(e + "L", 0xFFFFFFFF if undefined else len(value))
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    parts.append(head + length if implicit else head + b"SQ\x00\x00" + length)
    parts.append(value)
    if undefined:
        parts.append(struct.pack(e + "HHL", 0xFFFE, 0xE0DD, 0))


def _encode_header(ds: Dataset, implicit: bool, little: bool) -> bytes:
    return PREAMBLE + _encode_file_meta(ds.file_meta) + _encode(ds, implicit, little)


def _encode_file_meta(meta: FileMetaDataset) -> bytes:
    """pydicom's ``write_file_meta_info(..., enforce_standard=True)``, with :func:`_encode`."""
    validate_file_meta(meta, enforce_standard=True)
    if "FileMetaInformationGroupLength" not in meta:
        meta.FileMetaInformationGroupLength = 0
    body = _encode(meta, False, True)
    # The group length comes first (lowest tag) and is always 12 bytes (explicit VR UL).
    meta.FileMetaInformationGroupLength = len(body) - 12
    return _pydicom_element(meta[0x00020000], False, True, default_encoding) + body[12:]
