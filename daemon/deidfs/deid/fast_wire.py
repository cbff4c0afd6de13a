"""The fast path's vocabulary: what it reads, and how it says it cannot.

:class:`Decline` (the reference path must take the file) and :class:`NeedMore` (the
header runs past the bytes given); the transfer syntaxes the fast path leaves to the
reference path; the tags it treats apart (the top-level values the checks, the file meta and
the view's name need, the image attributes pixel decisions read, the attributes the engine
adds); the value representations of explicit VR little endian with their header lengths,
their dummies and limits; the short actions of the hot path; and the :mod:`struct` readers
and writers of element headers. Pure: no I/O.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from deidfs.deid.dictionary import LONG_LENGTH_VRS, STANDARD_VRS
from deidfs.deid.plan import Decision, Op, Source
from deidfs.deid.standard import Action

IMPLICIT_LE: Final = "1.2.840.10008.1.2"


EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"


DEFLATED: Final = "1.2.840.10008.1.2.1.99"


PREAMBLE: Final = b"\x00" * 128 + b"DICM"


#: Secondary Capture: the engine's Media Storage SOP Class when the source names none.
_DEFAULT_SOP_CLASS: Final = "1.2.840.10008.5.1.4.1.1.7"


PIXEL_DATA: Final = 0x7FE00010


_OTHER_PIXEL_DATA: Final = frozenset({0x7FE00008, 0x7FE00009})


SPECIFIC_CHARACTER_SET: Final = 0x00080005


SOP_CLASS_UID: Final = 0x00080016


SOP_INSTANCE_UID: Final = 0x00080018


PATIENT_NAME: Final = 0x00100010


PATIENT_ID: Final = 0x00100020


STUDY_INSTANCE_UID: Final = 0x0020000D


SERIES_INSTANCE_UID: Final = 0x0020000E


BURNED_IN_ANNOTATION: Final = 0x00280301


_IMAGE_PIXEL_TAGS: Final = (0x00280010, 0x00280011)  #: Rows, Columns


#: What pixels.image_info reads: integers, then text.
_IMAGE_INTEGERS: Final = {
    "rows": 0x00280010,
    "columns": 0x00280011,
    "samples_per_pixel": 0x00280002,
    "bits_allocated": 0x00280100,
    "planar_configuration": 0x00280006,
    "number_of_frames": 0x00280008,
}


_IMAGE_TEXTS: Final = {
    "photometric": 0x00280004,
    "modality": 0x00080060,
    "manufacturer": 0x00080070,
    "model": 0x00081090,
    "burned_in_annotation": BURNED_IN_ANNOTATION,
}


#: Attributes the engine sets after its walk, replacing whatever the walk kept.
_ADDED_TAGS: Final = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})


#: Top-level elements the reference path reads through ``Dataset.get`` before the engine's
#: walk, which converts them in place: they are then written re-encoded even in a raw data
#: set. dcmread reads Specific Character Set so; pixels.image_info, for a source with pixels,
#: the attributes below.
_CONVERTED_WITH_PIXELS: Final = frozenset({*_IMAGE_INTEGERS.values(), *_IMAGE_TEXTS.values()})


#: Top-level values the fast path needs besides the output (checks, meta, layout).
_ROOT_TAGS: Final = frozenset(
    {
        SPECIFIC_CHARACTER_SET,
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        PATIENT_NAME,
        PATIENT_ID,
        BURNED_IN_ANNOTATION,
        *_IMAGE_PIXEL_TAGS,
        *_IMAGE_INTEGERS.values(),
        *_IMAGE_TEXTS.values(),
    }
)


#: Values of the output the view's name is built from.
_LAYOUT_TAGS: Final = (SOP_INSTANCE_UID, PATIENT_ID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)


#: LUT descriptors: pydicom rewrites their first value when it reads them.
_LUT_DESCRIPTOR_TAGS: Final = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


#: Specific Character Set values whose text is ASCII where it is printable ASCII, and that
#: pydicom writes ASCII text in as ASCII.
_ASCII_CHARSETS: Final = frozenset({b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 6"})


_VR_LONG: Final = frozenset(vr.encode() for vr in LONG_LENGTH_VRS)


_VR_SHORT: Final = frozenset(vr.encode() for vr in STANDARD_VRS) - _VR_LONG


#: What the short branch of _Run.dataset does with an element (see _Actions.fast_op).
_OTHER, _REMOVE, _EMPTY, _KEEP, _KEEP_IMAGE = 0, 1, 2, 3, 4


#: Kept elements that are never copied as they are: sequences are rebuilt, pydicom reads UN
#: as the data dictionary's VR.
_NOT_RAW: Final = frozenset({"SQ", "UN"})


#: VR bytes -> (VR, length of an element header with it)
_VR_INFO: Final = {vr: (vr.decode(), 12 if vr in _VR_LONG else 8) for vr in _VR_SHORT | _VR_LONG}


_STRING_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "AS"})


_NUMERIC_VRS: Final = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "IS", "DS", "AT"})


_SCRUB_VRS: Final = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})


_MAX_LEN: Final = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "AS": 4}


_BINARY_FORMATS: Final = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "UV": "Q",
    "SV": "q",
    "FL": "f",
    "FD": "d",
}


_BYTES_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


_DUMMY_TEXT: Final = b"ANONYMIZED"


#: The engine's dummy values (engine_values._DUMMY_BY_VR and friends) as pydicom writes them.
_DUMMY_VALUES: Final = {
    "AE": b"ANONYMIZED",
    "AS": b"000Y",
    "CS": b"ANONYMIZED",
    "DA": b"19000101",
    "DT": b"19000101000000",
    "TM": b"000000",
    "DS": b"0 ",
    "IS": b"0 ",
    "UR": b"urn:deidfs:anonymized ",
    "US": b"\x00" * 2,
    "SS": b"\x00" * 2,
    "UL": b"\x00" * 4,
    "SL": b"\x00" * 4,
    "UV": b"\x00" * 8,
    "SV": b"\x00" * 8,
    "FL": b"\x00" * 4,
    "FD": b"\x00" * 8,
    **dict.fromkeys(("OB", "OW", "OD", "OF", "OL", "OV", "UN"), b"\x00\x00"),
}


_SCRUB_DUMMY = Decision(Op.DUMMY, Action.DUMMY, Source.DEFAULT, note="text in a D sequence")


_SAFE_VR_MISMATCH = Decision(
    Op.REMOVE, Action.REMOVE, Source.PRIVATE, note="VR differs from Table E.3.10-1"
)


_PRIVATE_REMOVE = Decision(Op.REMOVE, Action.REMOVE, Source.PRIVATE)


#: Text the fast path decodes: printable ASCII and NUL (which every ASCII-compatible
#: character set decodes to itself; no escape sequences, no whitespace but the space).
_NOT_PLAIN = re.compile(rb"[^\x00\x20-\x7e]")


_INTEGER = re.compile(r"[+-]?\d+\Z", re.ASCII)


_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z", re.ASCII)


_unpack_head = struct.Struct("<HH2sH").unpack_from


_unpack_ul = struct.Struct("<L").unpack_from


_unpack_tag_len = struct.Struct("<HHL").unpack_from


_unpack_us = struct.Struct("<H").unpack_from


_unpack_us_ul = struct.Struct("<HL").unpack_from


_pack_tag = struct.Struct("<HH").pack


_pack_ul = struct.Struct("<L").pack


_pack_us = struct.Struct("<H").pack


_ITEM: Final = b"\xfe\xff\x00\xe0"


_ITEM_TAG: Final = 0xFFFEE000


_ITEM_END: Final = 0xFFFEE00D


_SEQUENCE_END: Final = 0xFFFEE0DD


class Decline(Exception):
    """The fast path does not reproduce this file exactly; use the reference path."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NeedMore(Decline):
    """The header runs past the bytes given: call again with at least ``length`` bytes."""

    def __init__(self, length: int) -> None:
        super().__init__("short_buffer")
        self.length = length
