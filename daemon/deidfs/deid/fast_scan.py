"""The element structure of one source's bytes, as the fast path reads it.

:class:`_Scanner` holds the bytes being walked (the header, then the trailer after Pixel
Data) and reads them as pydicom does in explicit VR little endian: an element's or item's
header (tag, VR, value offset, value length), where a value ends, a sequence's items and an
item's elements skipped to their delimiters, and the check that an item is explicit VR.
Whatever it cannot read exactly raises :class:`~deidfs.deid.fast_wire.Decline`; bytes that
end too soon raise :class:`~deidfs.deid.fast_wire.NeedMore`. Pure: no I/O.
"""

from __future__ import annotations

from deidfs.deid.fast_wire import (
    _ITEM_END,
    _ITEM_TAG,
    _SEQUENCE_END,
    _VR_LONG,
    _VR_SHORT,
    Decline,
    NeedMore,
    _unpack_head,
    _unpack_tag_len,
    _unpack_ul,
)


class _Scanner:
    """The bytes being walked, read element by element."""

    def __init__(self, data: bytes) -> None:
        self.data = data

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

    def check_explicit(self, pos: int) -> None:
        """pydicom reads an item as implicit VR when its first VR is not two capitals."""
        if pos + 6 > len(self.data):
            raise NeedMore(pos + 6)
        if _unpack_tag_len(self.data, pos)[:2] == (0xFFFE, 0xE00D):
            return  # an empty item of undefined length
        first, second = self.data[pos + 4], self.data[pos + 5]
        if not (0x40 < first < 0x5B and 0x40 < second < 0x5B):
            raise Decline("implicit_item")
