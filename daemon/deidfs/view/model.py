"""What a view is: the source state it was built from, its parts, and where pixel data ends.

Shared by the fast path (:mod:`deidfs.view.render`) and the reference path
(:mod:`deidfs.view.reference`), so that neither imports the other's module for them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from deidfs.deid.outcome import Report
from deidfs.errors import Refused

PREAMBLE = b"\x00" * 128 + b"DICM"
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"})
#: Default bound of a header (the elements before Pixel Data) read to render a file: far
#: beyond any image's, room for the largest structure sets and reports.
MAX_HEADER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceStat:
    """The identity of a source file's state; a view is valid for exactly this state.

    ctime is part of it: a file rewritten in place to the same size, its mtime then set back
    (``touch -r``, ``rsync --inplace``, tools that keep timestamps), keeps every other field,
    while its ctime is always the kernel's time of the last change.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceStat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class View:
    """A de-identified file: ``header`` + ``pixels`` + source[pixel_offset:+pixel_length]
    (with the ``zeroed`` ranges read as zeros) + ``trailer``."""

    header: bytes
    pixel_offset: int
    pixel_length: int
    trailer: bytes
    relpath: PurePosixPath
    report: Report
    source: SourceStat
    #: Sorted, disjoint ``[start, end)`` ranges of the source pixel bytes (counted from
    #: ``pixel_offset``) that are served as zeros: mask rectangles in native pixel data.
    zeroed: tuple[tuple[int, int], ...] = ()
    #: A Pixel Data element built in memory (redacted compressed pixels); the source range is
    #: then empty.
    pixels: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + len(self.pixels) + self.pixel_length + len(self.trailer)


#: The VRs each pixel data element may have (PS3.5 Table 7-1 and A.4; OB or OW for Pixel
#: Data, as written, and OB when encapsulated, checked below).
PIXEL_VRS = {0x7FE00010: (b"OB", b"OW"), 0x7FE00008: (b"OF",), 0x7FE00009: (b"OD",)}


def tag_at(head: bytes, e: str) -> int:
    group, element = struct.unpack(e + "HH", head[:4])
    return int((group << 16) | element)


def pixel_element_end(f: BinaryIO, pos: int, size: int, implicit: bool, little: bool) -> int:
    """Offset just past the Pixel Data element at ``pos``, walking items if encapsulated."""
    e = "<" if little else ">"
    f.seek(pos)
    head = f.read(12)
    if len(head) < 8:
        raise Refused("truncated", "pixel data element header is cut short")
    if implicit:
        length = int(struct.unpack(e + "L", head[4:8])[0])
        value_start = pos + 8
    else:
        vr = head[4:6]
        if vr in LONG_VRS:
            if len(head) < 12:
                raise Refused("truncated", "pixel data element header is cut short")
            length = int(struct.unpack(e + "L", head[8:12])[0])
            value_start = pos + 12
        else:
            length = int(struct.unpack(e + "H", head[6:8])[0])
            value_start = pos + 8
        if vr not in PIXEL_VRS.get(tag_at(head, e), (b"OB", b"OW")):
            # What is there must be what can be there: pixel data under another VR (text,
            # a sequence) would reach a reader as that, served verbatim.
            raise Refused("bad_pixel_data", "pixel data with a VR it cannot have")
        if length == 0xFFFFFFFF and vr not in (b"OB", b"OW"):
            # Encapsulated pixel data is OB (PS3.5 A.4; OW is seen in the wild); served as
            # is, an undefined length UN (or SQ) would be read as a sequence by readers.
            raise Refused("bad_pixel_data", "encapsulated pixel data with a VR other than OB")
    if length != 0xFFFFFFFF:
        end = value_start + length
        if end > size:
            raise Refused("truncated", "pixel data is shorter than its declared length")
        return end
    # Encapsulated: items (FFFE,E000) until the sequence delimiter (FFFE,E0DD).
    at = value_start
    while True:
        f.seek(at)
        item = f.read(8)
        if len(item) < 8:
            raise Refused("truncated", "encapsulated pixel data has no sequence delimiter")
        group, elem, item_len = struct.unpack(e + "HHL", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return at + 8
        if (group, elem) != (0xFFFE, 0xE000) or item_len == 0xFFFFFFFF:
            raise Refused("bad_pixel_data", "encapsulated pixel data has a malformed item")
        at += 8 + item_len
        if at > size:
            raise Refused("truncated", "encapsulated pixel data item runs past the end")
