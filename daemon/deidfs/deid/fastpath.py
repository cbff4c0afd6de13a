"""De-identify a header straight from its bytes, for the common case.

:func:`deidentify_header` returns, byte for byte, the header the reference path builds (pydicom
parse up to Pixel Data, :func:`~deidfs.deid.engine.deidentify`, the view encoder of
:mod:`deidfs.view.render`), with the same :class:`~deidfs.deid.outcome.Report`, at a fraction of its
cost: it walks the encoded elements with :mod:`struct`, copies kept elements as the bytes they
are and encodes only what an action changes. Whatever it does not reproduce exactly raises
:class:`Decline`, and the caller takes the reference path: implicit VR, big endian, deflate,
a file without preamble or transfer syntax, a character set that is not ASCII-compatible, text
it would have to decode that is not printable ASCII, clean and date actions, pixel rules, age
caps, a value that does not read back as it was written, any malformed structure, and every
case the engine could refuse.

The reference encoding, as mirrored here:

- elements in ascending tag order; the engine's added attributes (PatientIdentityRemoved,
  DeidentificationMethod, DeidentificationMethodCodeSequence,
  LongitudinalTemporalInformationModified) replace the source's;
- a top-level data set whose Specific Character Set is kept is written from its raw elements;
  every other data set (each sequence item, a top level without Specific Character Set) is
  re-encoded: pydicom decodes each raw value and writes it again, which drops trailing
  padding and the like (:func:`_reencode` mirrors that, value representation by value
  representation);
- every sequence the engine keeps is rebuilt with defined lengths, sequence and items.

Pure: no I/O, no logging.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from deidfs import __version__
from deidfs.deid.attribute_types import TOP_LEVEL, placements
from deidfs.deid.dictionary import (
    BAD_TEXT,
    LONG_LENGTH_VRS,
    SHORT_TEXT,
    STANDARD_VRS,
    TEXT_VRS,
    VALUE_SIZES,
    datetime_conversion,
    is_registered_uid,
    length_fits,
    private_transfer_syntaxes,
    vr_of,
)
from deidfs.deid.outcome import (
    ENCAPSULATED_DOCUMENT_CLASSES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MEDIA_DIRECTORY_CLASS,
    UID_TEXT,
    Report,
)
from deidfs.deid.pixels import ImageInfo, PixelPolicy
from deidfs.deid.pixels import decide as pixel_decision
from deidfs.deid.plan import Decision, Op, Plan, Source
from deidfs.deid.pseudonym import TOKEN_LENGTH, Pseudonymizer
from deidfs.deid.standard import Action, Option, method_codes
from deidfs.deid.tags import keyword_of
from deidfs.deid.trust import STRUCTURAL, ValueCheck, doubt, value_check

__all__ = ["Decline", "FastHeader", "NeedMore", "deidentify_header"]

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
#: What the short branch of _Run.dataset does with an element (see _Run.fast_op).
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


@dataclass(frozen=True, slots=True)
class FastHeader:
    """The de-identified header of one source, and what the view needs besides."""

    header: bytes  #: preamble, file meta and data set, up to Pixel Data
    pixel_offset: int  #: where the Pixel Data element starts in the source (its size if none)
    has_pixels: bool
    trailer: bytes  #: the de-identified elements after Pixel Data, when given
    report: Report
    #: Output values the view's name is built from (None: absent), in this order:
    #: SOPInstanceUID, PatientID, StudyInstanceUID, SeriesInstanceUID.
    names: tuple[str | None, str | None, str | None, str | None]
    image: ImageInfo | None = None  #: what the header says of the pixels (with pixels)


# -- per-plan tables -------------------------------------------------------------------------
@dataclass(slots=True)
class _Tables:
    plan: Plan
    decline: str  #: why no file of this plan can take the fast path ("" if it can)
    decisions: dict[int, Decision]
    fast_ops: dict[int, int]  #: tag -> _KEEP, _REMOVE, _EMPTY or _OTHER (_Run.fast_op)
    #: The 6 bytes of an element header (tag, VR) -> (tag, short action, header length,
    #: the VR, or the emptied element): the hot path of _Run.dataset.
    #: 6 header bytes -> (tag, fast op, header length, payload, value check of a kept one)
    heads: dict[bytes, tuple[int, int, int, Any, ValueCheck | None]]
    empties: dict[int, tuple[str, bytes]]  #: tag -> (VR, the element emptied)
    #: (tag, VR, raw value) -> the element re-encoded (None: declined); see image_attribute
    image_values: dict[tuple[int, str, bytes], bytes | None]
    identifiers: dict[int, bool]  #: tag -> its keyword names an identifier (engine._dummy)
    un_vrs: dict[int, str]  #: tag -> VR read for UN (see _Run.un_vr; "": declined)
    added: dict[bool, tuple[tuple[int, bytes], ...]]  #: burned in -> added attributes
    private_exact: bool  #: custom rules or disabled entries name private tags
    safe_private: bool


_TABLES: dict[int, _Tables] = {}
_MAX_PLANS = 8
_MAX_TAGS = 1 << 16
#: Values remembered (image attributes, file meta UIDs): few and short, whatever a source holds.
_MAX_CACHED_VALUES = 4096
_MAX_CACHED_VALUE = 128


def _tables(plan: Plan) -> _Tables:
    found = _TABLES.get(id(plan))
    if found is not None and found.plan is plan:
        return found
    if len(_TABLES) >= _MAX_PLANS:
        _TABLES.clear()
    tables = _build_tables(plan)
    _TABLES[id(plan)] = tables
    return tables


def _plan_decline(plan: Plan) -> str:
    profile = plan.profile
    if Option.CLEAN_PIXEL_DATA in plan.options or profile.apply_masks or profile.masks:
        return "pixel_rules"  # pixel decisions are the reference path's
    if profile.max_age is not None:
        return "age_cap"
    return ""


def _build_tables(plan: Plan) -> _Tables:
    decline = _plan_decline(plan)
    added: dict[bool, tuple[tuple[int, bytes], ...]] = {}
    if not decline:
        try:
            added = {burned: _added_attributes(plan, burned) for burned in (False, True)}
        except Decline as exc:
            decline = exc.reason
    return _Tables(
        plan=plan,
        decline=decline,
        decisions={},
        fast_ops={},
        heads={},
        empties={},
        image_values={},
        identifiers={},
        un_vrs={},
        added=added,
        private_exact=any(tag >> 16 & 1 for tag in plan.exact),
        safe_private=Option.RETAIN_SAFE_PRIVATE in plan.options,
    )


def _ascii(text: str) -> bytes:
    if _NOT_PLAIN.search(text.encode("utf-8")):
        raise Decline("text_not_ascii")
    return text.encode("ascii")


def _padded(value: bytes, pad: bytes = b" ") -> bytes:
    return value + pad if len(value) % 2 else value


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """Explicit VR little endian encoding of one element whose value bytes are final."""
    length = len(value)
    vr_bytes = vr.encode("ascii")
    if vr_bytes in _VR_LONG:
        return (
            _pack_tag(tag >> 16, tag & 0xFFFF) + vr_bytes + b"\x00\x00" + _pack_ul(length) + value
        )
    if length > 0xFFFF:
        raise Decline("value_too_long")  # pydicom would write it as UN
    return _pack_tag(tag >> 16, tag & 0xFFFF) + vr_bytes + _pack_us(length) + value


def _sequence(tag: int, items: list[bytes]) -> bytes:
    """A sequence of defined length with items of defined length, as the reference writes."""
    body = b"".join(_ITEM + _pack_ul(len(item)) + item for item in items)
    return _pack_tag(tag >> 16, tag & 0xFFFF) + b"SQ\x00\x00" + _pack_ul(len(body)) + body


def _added_attributes(plan: Plan, burned_in: bool) -> tuple[tuple[int, bytes], ...]:
    """The attributes engine.deidentify sets after its walk, encoded (PS3.15 E.1.1)."""
    removed = b"NO" if burned_in else b"YES"  # no mask redacts anything here
    method = f"deidfs {__version__} {plan.profile.name}"[:64]
    items = []
    for code in method_codes(plan.options):
        items.append(
            _element(0x00080100, "SH", _padded(_ascii(code.value)))
            + _element(0x00080102, "SH", _padded(_ascii(code.scheme)))
            + _element(0x00080104, "LO", _padded(_ascii(code.meaning)))
        )
    if Option.RETAIN_LONGITUDINAL_FULL_DATES in plan.options:
        longitudinal = b"UNMODIFIED"
    elif Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in plan.options:
        longitudinal = b"MODIFIED"
    else:
        longitudinal = b"REMOVED"
    return (
        (0x00120062, _element(0x00120062, "CS", _padded(removed))),
        (0x00120063, _element(0x00120063, "LO", _padded(_ascii(method)))),
        (0x00120064, _sequence(0x00120064, items)),
        (0x00280303, _element(0x00280303, "CS", _padded(longitudinal))),
    )


_META_PARTS: dict[tuple[str, str], tuple[bytes, bytes]] = {}


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The file meta group engine.deidentify builds, as render's encoder writes it."""
    parts = _META_PARTS.get((sop_class, transfer_syntax))
    if parts is None:
        before = _element(0x00020001, "OB", b"\x00\x01") + _element(
            0x00020002, "UI", _padded(_ascii(sop_class), b"\x00")
        )
        after = b"".join(
            (
                _element(0x00020010, "UI", _padded(_ascii(transfer_syntax), b"\x00")),
                _element(0x00020012, "UI", _padded(_ascii(IMPLEMENTATION_CLASS_UID), b"\x00")),
                _element(0x00020013, "SH", _padded(_ascii(IMPLEMENTATION_VERSION_NAME))),
            )
        )
        parts = (before, after)
        if len(_META_PARTS) < 64:
            _META_PARTS[(sop_class, transfer_syntax)] = parts
    body = parts[0] + _element(0x00020003, "UI", _padded(_ascii(sop_instance), b"\x00")) + parts[1]
    return PREAMBLE + _element(0x00020000, "UL", _pack_ul(len(body))) + body


# -- values as pydicom reads and writes them -----------------------------------------------
def _plain_text(value: bytes) -> str:
    if _NOT_PLAIN.search(value):
        raise Decline("text_not_ascii")
    return value.decode("ascii")


def _person_name(text: str) -> str:
    """A PN value as pydicom's PersonName holds it: empty trailing component groups dropped."""
    groups = text.split("=")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _values(vr: str, value: bytes) -> list[str]:
    """The value(s) pydicom reads from a string VR, as ``str`` (a single value: one item)."""
    if not value:
        return [""]
    if vr == "PN":
        return [_person_name(v) for v in _plain_text(value.rstrip(b"\x00 ")).split("\\")]
    text = _plain_text(value)
    if vr in ("LO", "SH", "UC"):
        return [v.rstrip("\x00 ") for v in text.split("\\")]
    if vr in ("ST", "LT", "UT"):
        return [text.rstrip("\x00 ")]
    if vr in ("CS", "AS", "DA", "DT", "TM"):
        if datetime_conversion():
            raise Decline("datetime_conversion")
        return text.rstrip(" \x00").split("\\")
    if vr == "UI":
        return [v.strip() for v in text.rstrip("\x00 ").split("\\")]
    if vr == "AE":
        return [v.strip() for v in text.split("\\")]
    if vr == "UR":
        return text.rstrip().split("\\")
    raise Decline("not_a_string_vr")


def _engine_values(vr: str, value: bytes) -> list[str]:
    """engine_values._values of the converted value: no item for an empty single value."""
    values = _values(vr, value)
    if len(values) == 1 and not values[0]:
        return []
    return values


def _plain(vr: str, value: bytes | None) -> str:
    """engine_values._plain of the converted value."""
    if value is None:
        return ""
    return "\\".join(_values(vr, value)).strip()


def _number_strings(vr: str, value: bytes) -> bytes:
    """IS and DS as pydicom writes them back: each value stripped, blank ones as they are."""
    text = _plain_text(value)
    if vr == "DS":
        text = text.strip()
    pattern = _INTEGER if vr == "IS" else _DECIMAL
    out = []
    for item in text.rstrip(" \x00").split("\\"):
        stripped = item.strip()
        if not stripped:
            out.append(item)
        elif pattern.match(stripped):
            out.append(stripped)
        else:
            raise Decline("bad_number_string")
    return _padded("\\".join(out).encode("ascii"))


def _reencode(tag: int, vr: str, value: bytes) -> bytes:
    """The value bytes pydicom writes for a raw element it decoded first (a re-encoded data
    set), for the value representations whose round trip is known; else :class:`Decline`."""
    if not value:
        return value
    if vr in ("LO", "SH", "UC", "ST", "LT", "UT", "PN", "CS", "AS", "DA", "DT", "TM", "AE", "UR"):
        return _padded("\\".join(_values(vr, value)).encode("ascii"))
    if vr == "UI":
        return _padded("\\".join(_values(vr, value)).encode("ascii"), b"\x00")
    if vr in ("IS", "DS"):
        return _number_strings(vr, value)
    fmt = _BINARY_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize("<" + fmt)
        if len(value) % size or tag in _LUT_DESCRIPTOR_TAGS:
            raise Decline("binary_value")
        if fmt in "fd":
            numbers = struct.unpack(f"<{len(value) // size}{fmt}", value)
            if any(math.isnan(x) for x in numbers):
                raise Decline("nan")  # a float round trip may change a NaN's bits
        return value
    if vr in _BYTES_VRS:
        if len(value) % 2:
            raise Decline("odd_length")
        return value
    if vr == "AT" and len(value) % 4 == 0:
        return value
    if vr == "UN":
        return value  # pydicom writes an unknown element's bytes as they are
    raise Decline("vr_not_reencoded")


# -- the walk ----------------------------------------------------------------------------------
class _Run:
    """One file: walks its data sets and collects the output, mirroring engine._Walker."""

    def __init__(
        self, data: bytes, size: int, tables: _Tables, pseudo: Pseudonymizer, media_class: str
    ) -> None:
        self.data = data
        self.size = size
        self.tables = tables
        self.plan = tables.plan
        self.pseudo = pseudo
        self.counts: dict[str, int] = {}
        self.notes: set[str] = set()
        #: Top level: raw values of _ROOT_TAGS seen so far, and how far the walk has come.
        self.root: dict[int, tuple[str, bytes]] = {}
        self.root_done = 0  #: every top-level tag below this has been seen
        self.top_next = 0  #: offset of the next top-level element not yet walked
        self.top_end = 0
        self.token: str | None = None
        self.names: dict[int, str | None] = {}
        self.top_count = 0  #: top-level source elements
        self.removed_slot = -1  #: index of PatientIdentityRemoved in the top-level output
        #: Top-level output slots to replace when the source has pixels (None: decline).
        self.pixel_fixups: list[tuple[int, bytes | None]] = []
        self.media_class = media_class  #: the file meta's Media Storage SOP Class UID
        self.top_start = 0  #: offset of the data set
        self._places: Mapping[tuple[int, int], int] | None = None

    # -- structure --------------------------------------------------------------------------
    def header(self, pos: int) -> tuple[int, str, int, int]:
        """(tag, VR, value offset, value length) of the element at ``pos``."""
        data = self.data
        if pos + 8 > len(data):
            raise NeedMore(pos + 12)
        group, elem, vr_bytes, short = _unpack_head(data, pos)
        if vr_bytes in _VR_SHORT:
            return (group << 16) | elem, vr_bytes.decode("ascii"), pos + 8, short
        if vr_bytes in _VR_LONG:
            if short:
                raise Decline("reserved_bytes")
            if pos + 12 > len(data):
                raise NeedMore(pos + 12)
            return (
                (group << 16) | elem,
                vr_bytes.decode("ascii"),
                pos + 12,
                _unpack_ul(data, pos + 8)[0],
            )
        tag = (group << 16) | elem
        if tag in (_ITEM_TAG, _ITEM_END, _SEQUENCE_END):
            return tag, "", pos + 8, _unpack_ul(data, pos + 4)[0]
        raise Decline("unknown_vr")

    def value_end(self, tag: int, vr: str, start: int, length: int) -> int:
        """Offset just past the element whose value starts at ``start``."""
        if length != 0xFFFFFFFF:
            end = start + length
            if end > len(self.data):
                raise NeedMore(end)
            return end
        if vr != "SQ":
            raise Decline("undefined_length")
        return self.skip_items(start, None)

    def skip_items(self, pos: int, end: int | None) -> int:
        """Offset just past the items of a sequence (to ``end``, or its delimiter)."""
        while end is None or pos < end:
            tag, _, start, length = self.item_header(pos)
            if tag == _SEQUENCE_END:
                if end is not None or length:
                    raise Decline("bad_delimiter")
                return start
            if tag != _ITEM_TAG:
                raise Decline("not_an_item")
            if length == 0xFFFFFFFF:
                pos = self.skip_elements(start, None)
            else:
                pos = start + length
                if pos > len(self.data):
                    raise NeedMore(pos)
        if pos != end:
            raise Decline("item_overrun")
        return pos

    def skip_elements(self, pos: int, end: int | None) -> int:
        while end is None or pos < end:
            tag, vr, start, length = self.header(pos)
            if tag == _ITEM_END:
                if end is not None or length:
                    raise Decline("bad_delimiter")
                return start
            if not vr:
                raise Decline("misplaced_item")
            pos = self.value_end(tag, vr, start, length)
        if pos != end:
            raise Decline("element_overrun")
        return pos

    def item_header(self, pos: int) -> tuple[int, str, int, int]:
        data = self.data
        if pos + 8 > len(data):
            raise NeedMore(pos + 8)
        group, elem, length = _unpack_tag_len(data, pos)
        return (group << 16) | elem, "", pos + 8, length

    # -- root values ------------------------------------------------------------------------
    def root_value(self, tag: int) -> tuple[str, bytes] | None:
        """The raw top-level element ``tag`` of the source, scanning ahead if not yet seen."""
        if tag >= self.root_done:
            pos = self.top_next
            while pos < self.top_end:
                found, vr, start, length = self.header(pos)
                if found == PIXEL_DATA or not vr:
                    break
                end = self.value_end(found, vr, start, length)
                if found in _ROOT_TAGS and found not in self.root:
                    self.root[found] = (vr, self.data[start:end])
                if found >= tag:
                    break
                pos = end
        return self.root.get(tag)

    def patient_token(self) -> str:
        if self.token is None:
            found = self.root_value(PATIENT_ID)
            key = _plain(found[0], found[1]) if found is not None else ""
            if not key:
                found = self.root_value(PATIENT_NAME)
                key = "name:" + (_plain(found[0], found[1]) if found is not None else "")
            self.token = self.pseudo.token(key, "patient")
            if len(self.token) != TOKEN_LENGTH:
                raise Decline("token_length")
        return self.token

    # -- decisions --------------------------------------------------------------------------
    def decide(self, tag: int) -> Decision:
        decisions = self.tables.decisions
        decision = decisions.get(tag)
        if decision is None:
            decision = self.plan.decide(tag)
            if len(decisions) < _MAX_TAGS:
                decisions[tag] = decision
        return decision

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def places(self) -> Mapping[tuple[int, int], int]:
        """engine_context._Context.places: by the SOP Class UID, or the file meta's when the
        data set has none."""
        if self._places is None:
            if self.root_done > SOP_CLASS_UID:
                sop = self.root.get(SOP_CLASS_UID)
            else:
                sop = self.sop_class_ahead()
            sop_class = _plain(sop[0], sop[1]) if sop is not None else ""
            self._places = placements(sop_class or self.media_class)
        return self._places

    def sop_class_ahead(self) -> tuple[str, bytes] | None:
        """SOP Class UID (VR, value), read ahead of the walk: Instance Creation Date, which
        comes before it, is decided by the IOD."""
        data = self.data
        pos = self.top_start
        previous = -1
        while True:
            if pos >= len(data):
                if len(data) < self.size:
                    raise NeedMore(min(self.size, 2 * len(data)))
                return None
            tag, vr, start, length = self.header(pos)
            if tag <= previous:
                raise Decline("element_order")
            previous = tag
            if tag > SOP_CLASS_UID:
                return None
            end = self.value_end(tag, vr, start, length)
            if tag == SOP_CLASS_UID:
                return vr, data[start:end]
            pos = end

    # -- data sets --------------------------------------------------------------------------
    def dataset(
        self,
        pos: int,
        end: int | None,
        top: bool,
        scrub: bool,
        raw_mode: bool = False,
        parent: int = TOP_LEVEL,
    ) -> tuple[int, list[bytes]]:
        """Walk one data set from ``pos`` to ``end`` (None: its item delimiter; the top level:
        Pixel Data or the end). Returns the offset after it and its encoded output elements.
        ``parent``: the tag of the sequence whose item this is.

        ``raw_mode``: kept elements are copied as they are (a top level with a kept Specific
        Character Set); else re-encoded. Kept and removed elements of the most common kinds
        take the short branch of the loop (the hot path); all else goes through :meth:`apply`.
        """
        data = self.data
        size_data = len(data)
        out: list[bytes] = []
        append = out.append
        added = self.tables.added[False] if top else ()
        next_added = added[0][0] if added else 1 << 32
        stop_tag = PIXEL_DATA if top else -1
        fast_ops = {} if scrub else self.tables.fast_ops  # nothing is short in a D sequence
        vr_info = _VR_INFO
        unpack_head = _unpack_head
        bad_text = BAD_TEXT.search
        private_group = -1
        #: private creator element number -> (tag, VR, value start, end, output slot)
        creators: dict[int, tuple[int, str, int, int, int]] = {}
        kept_blocks: set[int] = set()
        previous = -1
        limit = size_data if end is None else end
        kept = removed = emptied = seen = 0
        empties = self.tables.empties
        heads = {} if scrub else self.tables.heads
        unpack_us = _unpack_us
        unpack_us_ul = _unpack_us_ul
        while True:
            if pos >= limit:
                if top:
                    if size_data < self.size:
                        raise NeedMore(min(self.size, 2 * size_data))
                elif end is None:
                    raise NeedMore(pos + 8)
                elif pos != end:
                    raise Decline("element_overrun")
                break
            # The hot path: an element header (tag and VR) seen before with a short action.
            entry = heads.get(data[pos : pos + 6])
            if entry is not None and pos + 12 <= size_data:
                tag, op, head, payload, check = entry
                if head == 8:
                    reserved = 0
                    next_pos = pos + 8 + unpack_us(data, pos + 6)[0]
                else:
                    reserved, length = unpack_us_ul(data, pos + 6)
                    next_pos = pos + 12 + length
                if next_pos <= limit and tag > previous and not reserved:
                    previous = tag
                    seen += 1
                    if tag > next_added:
                        while tag > next_added:
                            if next_added == 0x00120062:
                                self.removed_slot = len(out)
                            append(added[0][1])
                            added = added[1:]
                            next_added = added[0][0] if added else 1 << 32
                    if private_group >= 0 and tag >> 16 != private_group:
                        self.flush_private(out, creators, kept_blocks)
                        private_group = -1
                    if op == _REMOVE:
                        removed += 1
                    elif op == _EMPTY:
                        emptied += 1
                        append(payload)
                    else:
                        if (
                            next_pos - pos - head > SHORT_TEXT
                            and payload in TEXT_VRS
                            and bad_text(data, pos + head, next_pos)
                        ):
                            raise Decline("text_bytes")  # the reference path refuses it
                        if check is not None and not check(data, pos + head, next_pos):
                            raise Decline("untrusted")  # the reference path removes it
                        kept += 1
                        if raw_mode:
                            append(data[pos:next_pos])
                        else:
                            value = _reencode(tag, payload, data[pos + head : next_pos])
                            append(_element(tag, payload, value))
                        if op == _KEEP_IMAGE and top:
                            self.image_attribute(
                                tag, payload, pos + head, next_pos, raw_mode, len(out) - 1
                            )
                    pos = next_pos
                    continue
            if pos + 8 > size_data:
                raise NeedMore(pos + 12)
            group, elem, vr_bytes, length = unpack_head(data, pos)
            tag = (group << 16) | elem
            if tag == stop_tag:
                break
            info = vr_info.get(vr_bytes)
            if info is None:
                if tag == _ITEM_END and end is None and not top:
                    if _unpack_ul(data, pos + 4)[0]:
                        raise Decline("bad_delimiter")
                    pos += 8
                    break
                raise Decline("unknown_vr")
            if tag <= previous:
                raise Decline("element_order")
            previous = tag
            seen += 1
            vr, head = info
            if head == 8:
                start = pos + 8
                next_pos = start + length
            else:
                if length:
                    raise Decline("reserved_bytes")
                if pos + 12 > size_data:
                    raise NeedMore(pos + 12)
                length = _unpack_ul(data, pos + 8)[0]
                start = pos + 12
                if length == 0xFFFFFFFF:
                    next_pos = self.value_end(tag, vr, start, length)
                else:
                    next_pos = start + length
            if next_pos > limit:
                if next_pos > size_data:
                    raise NeedMore(next_pos)
                raise Decline("element_overrun")
            if tag > next_added:  # the engine's added attributes, in tag order
                while tag > next_added:
                    if next_added == 0x00120062:
                        self.removed_slot = len(out)
                    append(added[0][1])
                    added = added[1:]
                    next_added = added[0][0] if added else 1 << 32
            if private_group >= 0 and group != private_group:
                self.flush_private(out, creators, kept_blocks)
                private_group = -1
            if group == 0x0002:
                raise Decline("meta_group")  # the engine removes it and counts it so
            known = fast_ops.get(tag)
            op = known if known is not None else _OTHER if scrub else self.fast_op(tag)
            if (
                op >= _KEEP
                and not group & 1
                and doubt(tag, vr, data[start:next_pos] if vr != "SQ" else b"")
            ):
                raise Decline("untrusted")  # the engine removes it, or withholds the file
            if op != _OTHER and not scrub and len(heads) < _MAX_TAGS:
                if op == _REMOVE:
                    heads[data[pos : pos + 6]] = (tag, op, head, b"", None)
                elif vr not in _NOT_RAW and (op < _KEEP or vr not in VALUE_SIZES):
                    # Kept numbers stay on this path: their length is checked below.
                    payload = _element(tag, vr, b"") if op == _EMPTY else vr
                    # A key names the tag and the VR: the VR was found allowed above.
                    check = value_check(tag, vr) if op >= _KEEP and not group & 1 else None
                    heads[data[pos : pos + 6]] = (tag, op, head, payload, check)
            if op == _REMOVE:
                removed += 1
                pos = next_pos
                continue
            if op >= _KEEP and vr not in _NOT_RAW:
                if vr in VALUE_SIZES and not length_fits(tag, vr, next_pos - start):
                    raise Decline("number_length")  # the reference path refuses it
                if (
                    next_pos - start > SHORT_TEXT
                    and vr in TEXT_VRS
                    and bad_text(data, start, next_pos)
                ):
                    raise Decline("text_bytes")  # the reference path refuses it
                kept += 1
                if raw_mode:
                    append(data[pos:next_pos])
                else:
                    append(_element(tag, vr, _reencode(tag, vr, data[start:next_pos])))
                if op == _KEEP_IMAGE and top:
                    self.image_attribute(tag, vr, start, next_pos, raw_mode, len(out) - 1)
                pos = next_pos
                continue
            if op == _EMPTY and vr not in _NOT_RAW:
                emptied += 1
                empty = empties.get(tag)
                if empty is None or empty[0] != vr:
                    empty = empties[tag] = (vr, _element(tag, vr, b""))
                append(empty[1])
                pos = next_pos
                continue
            # The long way: any other action, private blocks, and the top-level elements
            # the checks, the file meta and the name need (none of them is short).
            if top:
                self.top_next = next_pos
                self.root_done = tag + 1
                if tag in _ROOT_TAGS and tag not in self.root:
                    self.root[tag] = (vr, data[start:next_pos])
                if tag in _OTHER_PIXEL_DATA:
                    raise Decline("float_pixel_data")
            if group & 1:
                private_group = group
                self.private(out, tag, vr, start, length, next_pos, raw_mode, creators, kept_blocks)
            elif group == 0x0000:
                raise Decline("command_group")  # pydicom reads it apart, as implicit VR
            else:
                decision = self.decide(tag)
                if decision.by_type:
                    decision = decision.at(self.places().get((parent, tag)))
                if (
                    scrub
                    and decision.op is Op.KEEP
                    and decision.source is Source.DEFAULT
                    and (vr if vr != "UN" else self.un_vr(tag, length)) in _SCRUB_VRS
                ):
                    decision = _SCRUB_DUMMY
                encoded = self.apply(tag, vr, start, length, next_pos, decision, raw_mode, scrub)
                if top and raw_mode and decision.op in (Op.KEEP, Op.VERBATIM):
                    encoded = self.converted(tag, vr, start, next_pos, encoded, len(out))
                if top:
                    if tag in _LAYOUT_TAGS:
                        self.names[tag] = self.output_name(tag, vr, start, next_pos, encoded)
                    if tag in _ADDED_TAGS:
                        encoded = None  # replaced by the engine's own
                if encoded is not None:
                    append(encoded)
            pos = next_pos
        if private_group >= 0:
            self.flush_private(out, creators, kept_blocks)
        for added_tag, value in added:
            if added_tag == 0x00120062:
                self.removed_slot = len(out)
            append(value)
        counts = self.counts
        if kept:
            counts["keep"] = counts.get("keep", 0) + kept
        if removed:
            counts["remove"] = counts.get("remove", 0) + removed
        if emptied:
            counts["empty"] = counts.get("empty", 0) + emptied
        if top:
            self.top_count = seen
        return pos, out

    def fast_op(self, tag: int) -> int:
        """What the short branch of :meth:`dataset` does with ``tag`` outside a D sequence
        (_KEEP, _KEEP_IMAGE, _REMOVE, _EMPTY; _OTHER: the long way); remembered per plan.

        Private elements are all removed, and counted so, when no rule names a private tag
        and safe private attributes are not retained: no block keeps an element, so its
        creator goes too (engine._Walker._private)."""
        op = _OTHER
        group = tag >> 16
        tables = self.tables
        if group & 1:
            if not tables.private_exact and not tables.safe_private:
                op = _REMOVE
        elif tag in _CONVERTED_WITH_PIXELS and tag not in _ADDED_TAGS:
            if self.decide(tag).op is Op.KEEP:
                op = _KEEP_IMAGE
        elif not (
            group == 0
            or tag in _ADDED_TAGS
            or tag in _LAYOUT_TAGS
            or tag in _ROOT_TAGS
            or tag in _OTHER_PIXEL_DATA
            or tag == PIXEL_DATA
            or tag in (SPECIFIC_CHARACTER_SET, PATIENT_ID, PATIENT_NAME)
        ):
            decision = self.decide(tag)
            decided = None if decision.by_type else decision.op  # by place: the long way
            if decided is Op.KEEP:
                op = _KEEP
            elif decided is Op.REMOVE:
                op = _REMOVE
            elif decided is Op.EMPTY:
                op = _EMPTY
        fast_ops = self.tables.fast_ops
        if len(fast_ops) < _MAX_TAGS:
            fast_ops[tag] = op
        return op

    def image_attribute(
        self, tag: int, vr: str, start: int, end: int, raw_mode: bool, slot: int
    ) -> None:
        """A kept top-level attribute pixels.image_info reads: recorded, and in a raw data set
        its re-encoded form kept for the case the source has pixels (see converted)."""
        value = self.data[start:end]
        if tag not in self.root:
            self.root[tag] = (vr, value)
        if not raw_mode:
            return
        cache = self.tables.image_values
        key = (tag, vr, value)
        again = cache.get(key, b"")
        if again == b"":
            try:
                again = self.keep_raw(tag, vr, start, end, False)
            except Decline:
                again = None
            if len(cache) < _MAX_CACHED_VALUES and len(value) <= _MAX_CACHED_VALUE:
                cache[key] = again
        if again != self.data[start - (12 if vr.encode() in _VR_LONG else 8) : end]:
            self.pixel_fixups.append((slot, again))

    def converted(
        self, tag: int, vr: str, start: int, end: int, raw: bytes | None, slot: int
    ) -> bytes | None:
        """A kept top-level element of a raw data set that the reference path converts
        before its walk (see _CONVERTED_WITH_PIXELS): its re-encoded form, now or once the
        source turns out to have pixels."""
        if raw is None or (tag != SPECIFIC_CHARACTER_SET and tag not in _CONVERTED_WITH_PIXELS):
            return raw
        try:
            again: bytes | None = self.keep_raw(tag, vr, start, end, False)
        except Decline:
            again = None
        if tag == SPECIFIC_CHARACTER_SET:
            if again is None:
                raise Decline("charset_value")
            return again
        if again != raw:
            self.pixel_fixups.append((slot, again))
        return raw

    def top_mode(self) -> bool:
        """Whether the top level is written from its raw elements: when its Specific
        Character Set, which the encoder compares with the one read, is kept (and one whose
        ASCII text the fast path may decode and write)."""
        found = self.root_value(SPECIFIC_CHARACTER_SET)
        if found is None:
            return False
        vr, value = found
        decision = self.decide(SPECIFIC_CHARACTER_SET)
        if decision.op not in (Op.KEEP, Op.VERBATIM) or vr != "CS":
            raise Decline("charset_changed")
        if value.rstrip(b" ") not in _ASCII_CHARSETS:
            raise Decline("charset")
        return True

    def private(
        self,
        out: list[bytes],
        tag: int,
        vr: str,
        start: int,
        length: int,
        end: int,
        raw_mode: bool,
        creators: dict[int, tuple[int, str, int, int, int]],
        kept_blocks: set[int],
    ) -> None:
        """engine._Walker._private: creators wait for their block; block elements decided."""
        elem_no = tag & 0xFFFF
        if elem_no < 0x10:
            self.count(Op.REMOVE.value)
            return
        if elem_no <= 0xFF:
            creators[elem_no] = (tag, vr, start, end, len(out))
            out.append(b"")  # the creator's slot, filled if its block keeps an element
            return
        block = elem_no >> 8
        if not self.tables.private_exact and not self.tables.safe_private:
            decision = _PRIVATE_REMOVE  # what decide_private says whatever the creator
            creator = None
        else:
            found = creators.get(block)
            creator = None
            if found is not None:
                _, creator_vr, creator_start, creator_end, _ = found
                if creator_vr not in ("LO", "SH", "CS", "UC", "LT", "ST", "UT"):
                    raise Decline("private_creator")
                creator = _plain(creator_vr, self.data[creator_start:creator_end])
            decision = self.plan.decide_private(tag, creator)
        if decision.source is Source.OPTION and creator is not None:
            vrs = self.plan.safe_private_vrs(tag, creator)
            if vrs and vr != "UN" and vr not in vrs:
                decision = _SAFE_VR_MISMATCH
            elif vrs == {"SQ"} and vr == "UN":
                raise Decline("private_sequence_as_un")
        # Dataset.__setitem__ converts a private element set after its creator (and the
        # creator, to read its value): the engine's output holds both decoded, so the
        # encoder re-encodes them even in a raw data set.
        raw = raw_mode and block not in creators
        encoded = self.apply(tag, vr, start, length, end, decision, raw, False)
        if encoded is not None:
            out.append(encoded)
            kept_blocks.add(block)

    def flush_private(
        self,
        out: list[bytes],
        creators: dict[int, tuple[int, str, int, int, int]],
        kept_blocks: set[int],
    ) -> None:
        """Fill in the creators of blocks an element was kept of; the others are removed
        (and counted so, as the engine does)."""
        for elem_no, (tag, vr, start, end, slot) in creators.items():
            if elem_no in kept_blocks:
                out[slot] = self.keep_raw(tag, vr, start, end, False)  # see private()
            else:
                self.count(Op.REMOVE.value)
        creators.clear()
        kept_blocks.clear()

    # -- actions ----------------------------------------------------------------------------
    def keep_raw(self, tag: int, vr: str, start: int, end: int, raw_mode: bool) -> bytes:
        """A raw element the engine keeps, as the encoder writes it: as it is in a raw data
        set (but an empty one, which pydicom converts), else as pydicom decodes and writes it
        (an element read as UN then has the VR its data dictionary names)."""
        if not tag >> 16 & 1 and doubt(tag, vr, self.data[start:end]):
            raise Decline("untrusted")  # the engine removes it, or withholds the file
        # The engine judges an element read as UN by its dictionary VR.
        real = self.un_vr(tag, end - start) if vr == "UN" and not tag >> 16 & 1 else vr
        if real in VALUE_SIZES and not length_fits(tag, real, end - start):
            raise Decline("number_length")  # the reference path refuses it
        if end - start > SHORT_TEXT and real in TEXT_VRS and BAD_TEXT.search(self.data, start, end):
            raise Decline("text_bytes")  # the reference path refuses it
        if raw_mode and (vr != "UN" or end > start):
            return self.data[start - (12 if vr.encode() in _VR_LONG else 8) : end]
        if vr == "UN":
            vr = self.un_vr(tag, end - start)
        return _element(tag, vr, _reencode(tag, vr, self.data[start:end]))

    def apply(
        self,
        tag: int,
        vr: str,
        start: int,
        length: int,
        end: int,
        decision: Decision,
        raw_mode: bool,
        scrub: bool,
    ) -> bytes | None:
        """engine._Walker.apply: the encoded output element, or None when removed."""
        op = decision.op
        if (
            not tag >> 16 & 1
            and (op is Op.KEEP or op is Op.VERBATIM or (tag in STRUCTURAL and op is not Op.EMPTY))
            and op is not Op.REMOVE
            and doubt(tag, vr, self.data[start:end] if vr != "SQ" else b"")
        ):
            raise Decline("untrusted")  # the engine removes it, or withholds the file
        self.count(op.value)
        if op is Op.REMOVE:
            return None
        raw_vr = vr
        if vr == "UN":
            vr = self.un_vr(tag, length)  # engine_values._vr_of
        if op is Op.VERBATIM:
            if vr == "SQ":
                raise Decline("verbatim_sequence")
            return self.keep_raw(tag, raw_vr, start, end, raw_mode)
        if op is Op.KEEP:
            if vr != "SQ":
                return self.keep_raw(tag, raw_vr, start, end, raw_mode)
            return self.sequence(tag, start, length, scrub)
        value = self.data[start:end]
        table_sourced = decision.source in (Source.BASIC, Source.OPTION)
        if table_sourced and tag in (PATIENT_ID, PATIENT_NAME) and op in (Op.EMPTY, Op.DUMMY):
            if vr not in ("LO", "SH", "PN"):
                raise Decline("patient_vr")
            return _element(tag, vr, self.patient_token().encode("ascii"))
        if op is Op.EMPTY:
            return _sequence(tag, []) if vr == "SQ" else _element(tag, vr, b"")
        if vr == "SQ":
            if op is Op.DUMMY:
                return self.sequence(tag, start, length, True)
            if op in (Op.UID, Op.PSEUDONYM):
                return self.sequence(tag, start, length, scrub)
            if op is Op.CLEAN:
                raise Decline("clean_sequence")
            return _sequence(tag, [])
        if op is Op.UID or (vr == "UI" and op in (Op.DUMMY, Op.PSEUDONYM, Op.CLEAN)):
            return self.uids(tag, vr, value, decision)
        if op is Op.DUMMY:
            return self.dummy(tag, vr, value)
        if op is Op.PSEUDONYM:
            return self.pseudonym(tag, vr, value)
        raise Decline(f"op_{op.value}")  # clean, shift: dates and text the engine rewrites

    def sequence(self, tag: int, start: int, length: int, scrub: bool) -> bytes:
        """A kept sequence: every item walked with the same plan, rebuilt."""
        end = None if length == 0xFFFFFFFF else start + length
        items: list[bytes] = []
        pos = start
        while end is None or pos < end:
            if end is not None and pos + 8 > end:
                raise Decline("sequence_overrun")
            item_tag, _, item_start, item_length = self.item_header(pos)
            if item_tag == _SEQUENCE_END:
                if end is not None or item_length:
                    raise Decline("bad_delimiter")
                pos = item_start
                break
            if item_tag != _ITEM_TAG:
                raise Decline("not_an_item")
            item_end = None if item_length == 0xFFFFFFFF else item_start + item_length
            if item_end is not None and end is not None and item_end > end:
                raise Decline("item_overrun")
            if item_end != item_start:
                self.check_explicit(item_start)
            pos, parts = self.dataset(item_start, item_end, False, scrub, parent=tag)
            items.append(b"".join(parts))
        if end is not None and pos != end:
            raise Decline("sequence_overrun")
        return _sequence(tag, items)

    def check_explicit(self, pos: int) -> None:
        """pydicom reads an item as implicit VR when its first VR is not two capitals."""
        if pos + 6 > len(self.data):
            raise NeedMore(pos + 6)
        if _unpack_tag_len(self.data, pos)[:2] == (0xFFFE, 0xE00D):
            return  # an empty item of undefined length
        first, second = self.data[pos + 4], self.data[pos + 5]
        if not (0x40 < first < 0x5B and 0x40 < second < 0x5B):
            raise Decline("implicit_item")

    def uids(self, tag: int, vr: str, value: bytes, decision: Decision) -> bytes | None:
        if vr != "UI":
            self.count("uid_on_non_ui_removed")
            return None
        out = []
        uid = self.pseudo.uid
        default = decision.source is Source.DEFAULT
        for item in _engine_values("UI", value):
            text = item.strip().rstrip("\x00")
            if default and (not text or is_registered_uid(text)):
                out.append(text)
            else:
                out.append(uid(text))
        return _element(tag, "UI", _padded("\\".join(out).encode("ascii"), b"\x00"))

    def dummy(self, tag: int, vr: str, value: bytes) -> bytes | None:
        if vr in ("LO", "SH") and self.is_identifier(tag):
            return self.pseudonym(tag, vr, value)
        dummy = _DUMMY_VALUES.get(vr)
        if dummy is not None:
            return _element(tag, vr, dummy)
        if vr in _STRING_VRS:
            return _element(tag, vr, _DUMMY_TEXT[: _MAX_LEN.get(vr, 64)])
        if vr == "AT":
            return _element(tag, vr, b"")
        raise Decline("dummy_vr")

    def un_vr(self, tag: int, length: int) -> str:
        """The VR pydicom and the engine give an element read as UN: its data dictionary's
        (UN for a tag it does not know). Private tags (which take theirs from the private
        dictionary), sequences and ambiguous VRs are declined."""
        if tag >> 16 & 1 or length >= 0xFFFF:
            raise Decline("un_value")
        vrs = self.tables.un_vrs
        found = vrs.get(tag)
        if found is None:
            try:
                found = vr_of(tag)
            except KeyError:
                found = "UN"
            if found.encode() not in _VR_INFO or found == "SQ":
                found = ""
            vrs[tag] = found
        if not found:
            raise Decline("un_value")
        return found

    def is_identifier(self, tag: int) -> bool:
        identifiers = self.tables.identifiers
        found = identifiers.get(tag)
        if found is None:
            found = keyword_of(tag).endswith(("ID", "Number", "Identifier"))
            identifiers[tag] = found
        return found

    def pseudonym(self, tag: int, vr: str, value: bytes) -> bytes | None:
        if vr in ("DA", "DT", "TM"):
            raise Decline("date_shift")
        if vr in _NUMERIC_VRS or vr not in _STRING_VRS:
            return _element(tag, vr, b"")
        values = _engine_values(vr, value)
        if tag in (PATIENT_ID, PATIENT_NAME):
            token = self.patient_token()
            tokens = [token for _ in values] or [token]
        else:
            tokens = [self.pseudo.token(v, "id") for v in values]
        if vr == "PN":
            tokens = ["ANON^" + t for t in tokens]
        limit = _MAX_LEN.get(vr)
        if limit:
            tokens = [t[:limit] for t in tokens]
        return _element(tag, vr, _padded("\\".join(tokens).encode("ascii")))

    def output_name(
        self, tag: int, vr: str, start: int, end: int, encoded: bytes | None
    ) -> str | None:
        """The output value of a layout attribute, as ``ds.get(keyword)`` returns it."""
        if encoded is None:
            return None
        head = 12 if vr.encode() in _VR_LONG else 8
        values = _values(vr, encoded[head:]) if vr in _STRING_VRS or vr == "UI" else None
        if values is None or len(values) != 1:
            raise Decline("layout_value")
        return values[0]


def _integer(found: tuple[str, bytes] | None) -> int | None:
    """pixels._int(ds.get(keyword)) of a raw element: None when absent, empty, multi-valued
    or not readable as one integer."""
    if found is None:
        return None
    vr, value = found
    fmt = _BINARY_FORMATS.get(vr)
    if fmt is not None and fmt not in "fd":
        if len(value) != struct.calcsize("<" + fmt):
            return None  # empty, several values, or a length pydicom cannot read
        return int(struct.unpack("<" + fmt, value)[0])
    if vr == "IS":
        items = _plain_text(value).rstrip(" \x00").split("\\")
        if len(items) != 1 or not items[0].strip():
            return None
        if not _INTEGER.match(items[0].strip()):
            raise Decline("image_integer")
        return int(items[0])
    raise Decline("image_integer_vr")


def _text(found: tuple[str, bytes] | None) -> str:
    """pixels._text(ds.get(keyword)) of a raw element of a string VR."""
    if found is None:
        return ""
    vr, value = found
    if vr not in _STRING_VRS or vr == "PN":
        raise Decline("image_text_vr")
    return "\\".join(_values(vr, value))


def _image_info(root: dict[int, tuple[str, bytes]], sop_class: str, ts: str) -> ImageInfo:
    """pixels.image_info of the source, from its raw top-level elements."""
    ints = {name: _integer(root.get(tag)) for name, tag in _IMAGE_INTEGERS.items()}
    texts = {name: _text(root.get(tag)).strip() for name, tag in _IMAGE_TEXTS.items()}
    frames_raw = root.get(_IMAGE_INTEGERS["number_of_frames"])
    empty = frames_raw is None or _values_empty(frames_raw)
    frames = 1 if empty else ints["number_of_frames"]
    return ImageInfo(
        rows=ints["rows"],
        columns=ints["columns"],
        samples_per_pixel=ints["samples_per_pixel"] or 1,
        bits_allocated=ints["bits_allocated"],
        planar_configuration=ints["planar_configuration"] or 0,
        number_of_frames=frames,
        photometric=texts["photometric"].upper(),
        modality=texts["modality"],
        manufacturer=texts["manufacturer"],
        model=texts["model"],
        sop_class=sop_class.strip(),
        burned_in_annotation=texts["burned_in_annotation"].upper(),
        transfer_syntax=ts.strip(),
    )


def _values_empty(found: tuple[str, bytes]) -> bool:
    """Whether pydicom reads the element's value as None or "" (IS: empty or blank)."""
    vr, value = found
    if vr == "IS":
        return not _plain_text(value).rstrip(" \x00").strip()
    return not value


_META_UIDS: dict[bytes, list[str]] = {}


def _meta_uid(value: bytes) -> list[str]:
    """The values of a UI element of the file meta group (they repeat from file to file)."""
    found = _META_UIDS.get(value)
    if found is None:
        found = _values("UI", value)
        if len(_META_UIDS) < 256 and len(value) <= _MAX_CACHED_VALUE:
            _META_UIDS[value] = found
    return found


def _transfer_syntax(data: bytes) -> tuple[int, str, str]:
    """Check the preamble and file meta group; returns (data set offset, transfer syntax,
    Media Storage SOP Class UID)."""
    if len(data) < 144:
        raise NeedMore(144)
    if data[128:132] != b"DICM":
        raise Decline("no_preamble")
    pos = 132
    previous = -1
    ts_raw: bytes | None = None
    media_class: bytes | None = None
    size_data = len(data)
    while True:
        if pos + 8 > size_data:
            raise NeedMore(pos + 12)
        group, elem, vr_bytes, length = _unpack_head(data, pos)
        if group != 0x0002:
            break
        info = _VR_INFO.get(vr_bytes)
        if info is None or elem <= previous:
            raise Decline("meta")
        previous = elem
        if info[1] == 8:
            start = pos + 8
        else:
            if pos + 12 > size_data:
                raise NeedMore(pos + 12)
            start, length = pos + 12, _unpack_ul(data, pos + 8)[0]
            if length == 0xFFFFFFFF:
                raise Decline("meta_undefined_length")
        pos = start + length
        if pos > size_data:
            raise NeedMore(pos)
        if elem in (0x0002, 0x0010):
            if vr_bytes != b"UI":
                raise Decline("meta_vr")
            if elem == 0x0010:
                ts_raw = data[start:pos]
            else:
                media_class = data[start:pos]
    if ts_raw is None:
        raise Decline("no_transfer_syntax")
    values = _meta_uid(ts_raw)
    if len(values) != 1 or not values[0]:
        raise Decline("transfer_syntax")
    ts = values[0]
    if ts in (IMPLICIT_LE, EXPLICIT_BE, DEFLATED):
        raise Decline("encoding")
    if ts in private_transfer_syntaxes():
        raise Decline("private_transfer_syntax")
    sop_class = ""
    if media_class is not None:
        classes = _meta_uid(media_class)
        if len(classes) != 1:
            raise Decline("media_storage_class")
        sop_class = classes[0].strip()
    return pos, ts, sop_class


def deidentify_header(
    data: bytes,
    size: int,
    plan: Plan,
    pseudo: Pseudonymizer,
    trailer: bytes | None = None,
) -> FastHeader:
    """De-identify the header in ``data`` (the first bytes of a source of ``size`` bytes).

    Parameters
    ----------
    data
        The source from its first byte, through at least the first 12 bytes of its Pixel
        Data element (or the whole source when it has none).
    size
        The size of the source.
    plan, pseudo
        As for :func:`~deidfs.deid.engine.deidentify`.
    trailer
        The source's bytes after its Pixel Data element, if any: a first call without them
        tells where Pixel Data starts, the caller finds where it ends.

    Raises
    ------
    NeedMore
        When ``data`` ends before the header does: call again with more bytes.
    Decline
        When the reference path must take this source.
    """
    try:
        return _deidentify_header(data, size, plan, pseudo, trailer)
    except Decline:
        raise
    except Exception as exc:  # a case the checks above missed: the reference path decides
        raise Decline(f"internal_{type(exc).__name__}") from exc


def _deidentify_header(
    data: bytes, size: int, plan: Plan, pseudo: Pseudonymizer, trailer: bytes | None
) -> FastHeader:
    tables = _tables(plan)
    if tables.decline:
        raise Decline(tables.decline)
    if len(data) > size:
        raise Decline("size")
    start, ts, media_class = _transfer_syntax(data)
    run = _Run(data, size, tables, pseudo, media_class)
    run.top_next = start
    run.top_start = start
    run.top_end = len(data)
    raw_mode = run.top_mode()
    # The added attributes depend on Burned In Annotation, which may follow them: walk with
    # the common value, and swap in the other if the source says YES.
    pos, parts = run.dataset(start, None, True, False, raw_mode)
    has_pixels = pos < len(data)
    root = run.root
    if not run.top_count:
        raise Decline("empty")
    if has_pixels:
        for slot, converted in run.pixel_fixups:
            if converted is None:
                raise Decline("pixel_attribute")
            parts[slot] = converted
    trailer_out = b""
    if trailer:
        if not has_pixels:
            raise Decline("trailer_without_pixels")
        # engine.deidentify walks the trailer with the same context; render encodes it as a
        # data set of its own, re-encoded like a sequence item.
        run.data = trailer
        run.root_done = 1 << 32
        _, trailer_parts = run.dataset(0, len(trailer), False, False)
        trailer_out = b"".join(trailer_parts)
    if not has_pixels and any(t in root for t in _IMAGE_PIXEL_TAGS):
        raise Decline("no_pixel_data")
    burned = root.get(BURNED_IN_ANNOTATION)
    burned_in = burned is not None and _plain(burned[0], burned[1]).upper() == "YES"
    if burned_in:
        parts[run.removed_slot] = tables.added[True][0][1]
    sop = root.get(SOP_CLASS_UID)
    sop_class = _plain(sop[0], sop[1]) if sop is not None else ""
    if not sop_class:
        sop_class = media_class
    if sop_class and not UID_TEXT.match(sop_class):
        raise Decline("bad_sop_class")  # the reference path refuses it
    if sop_class == MEDIA_DIRECTORY_CLASS or sop_class in ENCAPSULATED_DOCUMENT_CLASSES:
        raise Decline("refused_class")
    at_risk = False
    image = None
    if has_pixels:
        image = _image_info(root, sop_class, ts)
        policy = pixel_decision(plan.profile, plan.options, image)
        if policy.policy not in (PixelPolicy.AS_IS, PixelPolicy.AT_RISK) or policy.rects:
            raise Decline("pixel_policy")
        at_risk = policy.policy is PixelPolicy.AT_RISK
    instance = root.get(SOP_INSTANCE_UID)
    if instance is None or not _plain(instance[0], instance[1]):
        raise Decline("no_sop_instance_uid")
    names = run.names
    sop_out = names.get(SOP_INSTANCE_UID)
    if not sop_out or not sop_out.strip():
        raise Decline("no_sop_instance_uid")
    header = _file_meta(sop_class or _DEFAULT_SOP_CLASS, sop_out, ts) + b"".join(parts)
    report = Report(
        profile=plan.profile.name,
        digest=plan.digest,
        counts=tuple(sorted(run.counts.items())),
        burned_in_annotation=burned_in,
        notes=tuple(sorted(run.notes)),
        burned_in_risk=at_risk,
    )
    return FastHeader(
        header=header,
        pixel_offset=pos if has_pixels else size,
        has_pixels=has_pixels,
        trailer=trailer_out,
        report=report,
        names=(
            sop_out,
            names.get(PATIENT_ID),
            names.get(STUDY_INSTANCE_UID),
            names.get(SERIES_INSTANCE_UID),
        ),
        image=image,
    )
