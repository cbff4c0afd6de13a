"""Whether an encoded data set is whole: checked on its bytes, at every depth.

pydicom reads what it can and stops quietly at the end of a file: an undefined-length sequence
or item cut short ends where the bytes end, a value cut short is shorter than its length, a
stray item delimiter ends the top-level data set early. A data set served from such a parse
lacks what came after the cut and looks complete to every reader. :func:`check_dataset` walks
the encoded elements themselves and refuses, with a reason that says what is wrong, unless

- every element header and value lies inside the bytes;
- every undefined-length sequence is closed by its delimiter, every undefined-length item by
  its own, every defined-length item and sequence ends exactly at its length;
- every item sits in a sequence and every delimiter closes something;
- tags rise strictly within each data set (no element is repeated, none out of order).

It follows pydicom's reading rules where they are the standard's or a documented leniency (UN
of undefined length read as an implicit VR sequence, an item data set in implicit VR inside an
explicit VR one, a VR that is no two capital letters read as implicit), so that a file it
accepts is one pydicom read the same way, whole.

Pure: bytes in, an offset or :class:`~deidfs.errors.Refused` out.
"""

from __future__ import annotations

import struct
from typing import Final

from deidfs.deid.dictionary import LONG_LENGTH_VRS, STANDARD_VRS, vr_of
from deidfs.errors import Refused

__all__ = ["PIXEL_TAGS", "check_dataset", "check_trailer", "meta_end"]

#: Float, Double Float and Pixel Data: the top-level walk stops at the first of them.
PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_LONG: Final = frozenset(vr.encode("ascii") for vr in LONG_LENGTH_VRS)
_KNOWN: Final = frozenset(vr.encode("ascii") for vr in STANDARD_VRS)
#: Deepest nesting of sequences accepted (far beyond any IOD; bounds the recursion).
MAX_DEPTH: Final = 64

_HEAD = {little: struct.Struct("<HHL" if little else ">HHL") for little in (True, False)}
_EXPLICIT = {little: struct.Struct("<HH2sH" if little else ">HH2sH") for little in (True, False)}
_LENGTH = {little: struct.Struct("<L" if little else ">L") for little in (True, False)}


def _truncated(detail: str) -> Refused:
    return Refused("truncated", detail)


def _malformed(detail: str) -> Refused:
    return Refused("unparseable", detail)


class _Walk:
    def __init__(self, data: bytes | memoryview, end: int, little: bool) -> None:
        self.data = data
        self.end = end
        self.little = little
        self.head = _HEAD[little].unpack_from
        self.explicit = _EXPLICIT[little].unpack_from
        self.length = _LENGTH[little].unpack_from
        #: Top level: every tag must rise above ``after``; the highest tag walked.
        self.after = -1
        self.highest = -1
        self.seen: set[int] = set()

    def element(self, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
        """(tag, VR or None when implicit, value offset, value length) of the element at
        ``pos``."""
        if pos + 8 > self.end:
            raise _truncated("the data ends inside an element header")
        if implicit:
            group, elem, length = self.head(self.data, pos)
            return (group << 16) | elem, None, pos + 8, length
        group, elem, vr, short = self.explicit(self.data, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
            return tag, None, pos + 8, self.head(self.data, pos)[2]
        if vr in _LONG:
            if pos + 12 > self.end:
                raise _truncated("the data ends inside an element header")
            return tag, vr.decode("ascii"), pos + 12, self.length(self.data, pos + 8)[0]
        if vr in _KNOWN or (b"AA" <= vr <= b"ZZ"):
            # An unknown VR has a 16-bit length, as pydicom reads it (its check is on the
            # bytes' order, so b"A\x80" passes it too).
            return tag, vr.decode("latin-1"), pos + 8, short
        # No VR at all: pydicom reads such an element as implicit VR, and so does this walk.
        return tag, None, pos + 8, self.head(self.data, pos)[2]

    def dataset(
        self,
        pos: int,
        stop: int | None,
        implicit: bool,
        depth: int,
        top: bool,
        stop_pixels: bool,
        pixels_seen: bool = False,
    ) -> int:
        """Walk the elements of a data set from ``pos`` to ``stop`` (None: to its item
        delimiter, or to the end for the top level); return the offset just past it."""
        if not top and not implicit and pos + 6 <= (self.end if stop is None else stop):
            # pydicom reads an item data set that starts with no VR as implicit VR.
            first_vr = bytes(self.data[pos + 4 : pos + 6])
            if not (0x40 < first_vr[0] < 0x5B and 0x40 < first_vr[1] < 0x5B):
                implicit = True
        limit = self.end if stop is None else stop
        while pos < limit:
            tag, vr, start, length = self.element(pos, implicit)
            if tag == _ITEM_END:
                if top:
                    raise _malformed("an item delimiter outside any item")
                if stop is not None:
                    raise _malformed("an item delimiter inside a defined-length item")
                return start
            if tag in (_ITEM, _SEQUENCE_END):
                raise _malformed("an item or sequence delimiter where an element belongs")
            if top:
                if tag == 0 and length == 0:
                    # Eight zero bytes: no writer emits this, a hole in a sparse file is it.
                    raise Refused("trailing_data", "zero bytes where an element belongs")
                if tag <= self.after:
                    raise Refused("element_order", "an element after pixel data repeats one")
                if tag in self.seen:
                    # Never in a valid file; and a run of zero bytes (a hole) is this, at
                    # every eight bytes: refused at once instead of walked to its end.
                    raise Refused("element_order", "a top-level element is repeated")
                self.seen.add(tag)
                self.highest = max(self.highest, tag)
            if top and tag in PIXEL_TAGS:
                if stop_pixels:
                    return pos
                if pixels_seen:
                    raise _malformed("a second pixel data element")
                pixels_seen = True
            pos = self.value(tag, vr, start, length, implicit, depth)
            if pos > limit:
                if stop is None:
                    raise _truncated("an element value runs past the end of the data")
                raise _malformed("an element runs past the end of its item")
        if stop is None and not top:
            raise _truncated("an item ends without its delimiter")
        return pos

    def value(
        self, tag: int, vr: str | None, start: int, length: int, implicit: bool, depth: int
    ) -> int:
        """Offset just past the value of an element; sequences are walked."""
        if vr is None:
            vr = _dictionary_vr(tag)
        if length != _UNDEFINED:
            end = start + length
            if end > self.end:
                raise _truncated("an element value runs past the end of the data")
            if vr == "SQ":
                self.sequence(start, end, implicit, depth + 1)
            return end
        if vr in {"UN", "SQ"} or (vr is None and self.next_is_item(start)):
            # PS3.5 6.2.2: a UN of undefined length is a sequence in implicit VR.
            # Its items are read as pydicom reads them: each item's first element tells.
            return self.sequence(start, None, implicit, depth + 1)
        return self.fragments(start)

    def next_is_item(self, pos: int) -> bool:
        return pos + 8 <= self.end and self.head(self.data, pos)[:2] == (0xFFFE, 0xE000)

    def sequence(self, pos: int, stop: int | None, implicit: bool, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _malformed("sequences nested too deep")
        limit = self.end if stop is None else stop
        while pos < limit:
            tag, _, start, length = self.item(pos)
            if tag == _SEQUENCE_END:
                if stop is not None:
                    raise _malformed("a sequence delimiter inside a defined-length sequence")
                return start
            if tag != _ITEM:
                raise _malformed("a sequence holds something that is not an item")
            if length == _UNDEFINED:
                pos = self.dataset(start, None, implicit, depth, False, False)
            else:
                pos = start + length
                if pos > limit:
                    if stop is None or pos > self.end:
                        raise _truncated("an item runs past the end of the data")
                    raise _malformed("an item runs past the end of its sequence")
                self.dataset(start, pos, implicit, depth, False, False)
        if stop is None:
            raise _truncated("a sequence ends without its delimiter")
        return pos

    def fragments(self, pos: int) -> int:
        """Encapsulated data (items of defined length up to a sequence delimiter)."""
        while True:
            tag, _, start, length = self.item(pos)
            if tag == _SEQUENCE_END:
                return start
            if tag != _ITEM or length == _UNDEFINED:
                raise _malformed("encapsulated data holds something that is not a fragment")
            pos = start + length
            if pos > self.end:
                raise _truncated("a fragment runs past the end of the data")

    def item(self, pos: int) -> tuple[int, None, int, int]:
        if pos + 8 > self.end:
            raise _truncated("the data ends inside an item header")
        group, elem, length = self.head(self.data, pos)
        return (group << 16) | elem, None, pos + 8, length


def _dictionary_vr(tag: int) -> str | None:
    try:
        vr = vr_of(tag)
    except KeyError:
        return None
    # Ambiguous entries ("US or SS", "OB or OW") are never SQ: any of them reads as raw bytes.
    return vr if vr in STANDARD_VRS else "OB"


def check_dataset(
    data: bytes | memoryview,
    start: int,
    end: int,
    implicit: bool,
    little: bool,
    *,
    stop_at_pixels: bool = True,
    after: int = -1,
) -> tuple[int, int]:
    """Walk the top-level data set encoded in ``data[start:end]``; return the offset of its
    first pixel data element (with ``stop_at_pixels``) or ``end``, and the highest top-level
    tag walked (-1 if none).

    Top-level elements may come in any order (pydicom sorts them), except across Pixel Data:
    what follows it is a separate data set. None may come twice.

    Without ``stop_at_pixels`` one pixel data element is walked as any other and a second
    is refused. ``after`` is the last tag before ``start`` (a trailer follows Pixel Data):
    every top-level tag of the walk must rise above it, and if it is a pixel data tag, no
    other may follow.

    Raises
    ------
    Refused
        ``truncated`` when something runs past ``end`` or is not closed before it,
        ``element_order`` when a top-level tag repeats or does not rise above ``after``,
        ``unparseable`` for any other structure that is not a whole data set.
    """
    walk = _Walk(data, end, little)
    walk.after = after
    stop = walk.dataset(start, None, implicit, 0, True, stop_at_pixels, after in PIXEL_TAGS)
    return stop, walk.highest


def check_trailer(tail: bytes | memoryview, after: int, implicit: bool, little: bool) -> None:
    """Refuse what follows Pixel Data (``tail``) unless it is whole elements whose tags rise
    above ``after`` (the pixel data tag and every tag before it): the served file is header,
    pixels, trailer, and stays in ascending order with no tag twice.

    Raises
    ------
    Refused
        ``trailing_data`` when the bytes there do not even start as an element (zeros,
        garbage, a few stray bytes); otherwise as :func:`check_dataset`.
    """
    if len(tail) < 8:
        raise Refused("trailing_data", "bytes after pixel data that are no element")
    group, element = struct.unpack_from("<HH" if little else ">HH", tail)
    tag = (group << 16) | element
    delimiter = tag in (_ITEM, _ITEM_END, _SEQUENCE_END)
    if group == 0 or (not implicit and not delimiter and bytes(tail[4:6]) not in _KNOWN):
        raise Refused("trailing_data", "bytes after pixel data that are no element")
    check_dataset(tail, 0, len(tail), implicit, little, stop_at_pixels=False, after=after)


def meta_end(data: bytes | memoryview, start: int, end: int) -> int:
    """Offset just past the file meta group at ``start`` (explicit VR little endian,
    every element of group 0002, as pydicom reads it), checked like a data set."""
    walk = _Walk(data, end, True)
    pos = start
    while pos + 8 <= end and walk.head(data, pos)[0] == 0x0002:
        tag, vr, value, length = walk.element(pos, False)
        pos = walk.value(tag, vr, value, length, False, 0)
    return pos
