"""Values as pydicom reads and writes them, and elements encoded, for the fast path.

A raw value decoded as pydicom decodes it (:func:`_values`, PN groups, plain text only),
re-encoded as pydicom writes it back (:func:`_reencode`, value representation by value
representation, declining every round trip not known to be exact), a kept or new element
and a sequence of defined lengths encoded (:func:`_element`, :func:`_sequence`), and the
image attributes read from raw top-level elements as :func:`deidfs.deid.pixels.image_info`
reads them (:func:`_image_info`). Pure: no I/O.
"""

from __future__ import annotations

import math
import struct

from deidfs.deid.dictionary import datetime_conversion
from deidfs.deid.fast_wire import (
    _BINARY_FORMATS,
    _BYTES_VRS,
    _DECIMAL,
    _IMAGE_INTEGERS,
    _IMAGE_TEXTS,
    _INTEGER,
    _ITEM,
    _LUT_DESCRIPTOR_TAGS,
    _NOT_PLAIN,
    _STRING_VRS,
    _VR_LONG,
    Decline,
    _pack_tag,
    _pack_ul,
    _pack_us,
)
from deidfs.deid.pixels import ImageInfo


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
