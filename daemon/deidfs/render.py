"""View bytes of one source file: de-identified header + original pixel bytes + trailer.

A view never holds the pixel data in memory: it records where the Pixel Data element lies
in the source, and :func:`read_view` / :func:`write_view` copy those bytes from the source
file at their offset. Headers are parsed with pydicom up to Pixel Data only; the Pixel Data
element is located by walking its item headers, never by decoding it.

Deflated sources are the one exception: the whole dataset is one compressed stream, so it
is inflated (with a size limit), de-identified whole, deflated again and held in memory.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

from deidfs.deid.engine import Report, deidentify
from deidfs.deid.layout import Layout, layout_path
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import Refused

__all__ = [
    "Layout",
    "SourceStat",
    "View",
    "layout_path",
    "read_view",
    "render",
    "render_path",
    "source_unchanged",
    "write_view",
]

PREAMBLE = b"\x00" * 128 + b"DICM"
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: Largest inflated size accepted for a deflated source (a deflate bomb is refused).
MAX_INFLATED = 512 * 1024 * 1024
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"})


@dataclass(frozen=True, slots=True)
class SourceStat:
    """The identity of a source file's state; a view is valid for exactly this state."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceStat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class View:
    """A de-identified file: ``header`` + source[pixel_offset:+pixel_length] + ``trailer``."""

    header: bytes
    pixel_offset: int
    pixel_length: int
    trailer: bytes
    relpath: PurePosixPath
    report: Report
    source: SourceStat

    @property
    def size(self) -> int:
        return len(self.header) + self.pixel_length + len(self.trailer)


def _pixel_element_end(f: BinaryIO, pos: int, size: int, implicit: bool, little: bool) -> int:
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
        if vr in _LONG_VRS:
            if len(head) < 12:
                raise Refused("truncated", "pixel data element header is cut short")
            length = int(struct.unpack(e + "L", head[8:12])[0])
            value_start = pos + 12
        else:
            length = int(struct.unpack(e + "H", head[6:8])[0])
            value_start = pos + 8
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


def _encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = little
    write_dataset(buf, ds)
    return buf.getvalue()


def _encode_header(ds: Dataset, implicit: bool, little: bool) -> bytes:
    buf = DicomBytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    return buf.getvalue() + _encode(ds, implicit, little)


def _has_preamble(f: BinaryIO) -> bool:
    f.seek(128)
    return f.read(4) == b"DICM"


def _looks_like_raw_dataset(f: BinaryIO) -> bool:
    """A file without preamble is accepted only if it starts with a plausible tag."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return False
    group = struct.unpack("<H", head[:2])[0]
    return group in (0x0002, 0x0008)


def render(
    f: BinaryIO,
    st: SourceStat,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
) -> View:
    """Build the view of the open source ``f`` whose state is ``st``.

    Raises
    ------
    Refused
        For anything that is not DICOM, cannot be parsed, or cannot be de-identified safely.
    """
    size = st.size
    preamble = _has_preamble(f)
    if not preamble and not _looks_like_raw_dataset(f):
        raise Refused("not_dicom", "no DICM marker and no recognizable data set")
    f.seek(0)
    try:
        ds = dcmread(f, stop_before_pixels=True, force=not preamble)
    except (InvalidDicomError, EOFError) as exc:
        raise Refused("unparseable", type(exc).__name__) from exc
    except Exception as exc:  # pydicom raises many types on bad input
        raise Refused("unparseable", type(exc).__name__) from exc
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts == DEFLATED:
        return _render_deflated(f, st, plan, pseudonymizer, layout, source_rel)
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise Refused("unparseable", "transfer syntax could not be determined")
    if len(ds) == 0:
        raise Refused("not_dicom", "empty data set")
    pos = f.tell()
    pixel_offset = pixel_end = pos
    trailer: Dataset | None = None
    if pos < size:
        f.seek(pos)
        head = f.read(4)
        tag = struct.unpack("<HH" if little else ">HH", head) if len(head) == 4 else (0, 0)
        if ((tag[0] << 16) | tag[1]) in PIXEL_TAGS:
            pixel_end = _pixel_element_end(f, pos, size, implicit, little)
        if pixel_end < size:
            f.seek(pixel_end)
            try:
                trailer = read_dataset(f, implicit, little, bytelength=size - pixel_end)
            except Exception as exc:  # bad trailing data: fail closed
                raise Refused("unparseable", "elements after pixel data") from exc
    has_pixels = pixel_end > pixel_offset
    try:
        result = deidentify(ds, plan, pseudonymizer, has_pixels=has_pixels, trailer=trailer)
    except Refused:
        raise
    except Exception as exc:  # pydicom value errors on hostile input
        raise Refused("unparseable", type(exc).__name__) from exc
    out = result.dataset
    actual_ts = IMPLICIT_LE if implicit else (EXPLICIT_LE if little else EXPLICIT_BE)
    if str(out.file_meta.TransferSyntaxUID) in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE):
        out.file_meta.TransferSyntaxUID = UID(actual_ts)
    try:
        header = _encode_header(out, implicit, little)
        trailer_bytes = (
            _encode(result.trailer, implicit, little) if result.trailer is not None else b""
        )
    except Exception as exc:  # a value pydicom cannot write: fail closed
        raise Refused("unwritable", type(exc).__name__) from exc
    return View(
        header=header,
        pixel_offset=pixel_offset,
        pixel_length=pixel_end - pixel_offset,
        trailer=trailer_bytes,
        relpath=layout_path(out, layout, source_rel),
        report=result.report,
        source=st,
    )


def _render_deflated(
    f: BinaryIO,
    st: SourceStat,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout,
    source_rel: PurePosixPath | None,
) -> View:
    f.seek(0)
    data = f.read(st.size)
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise Refused("unparseable", "deflated file without a standard file meta group")
    meta_len = struct.unpack("<L", data[140:144])[0]
    body_at = 144 + meta_len
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[body_at:], MAX_INFLATED)
    except zlib.error as exc:
        raise Refused("unparseable", "deflate stream is corrupt") from exc
    if inflater.unconsumed_tail:
        raise Refused("too_large", "deflated data set inflates past the size limit")
    try:
        ds = dcmread(io.BytesIO(data[:body_at] + body), force=True)
    except Exception as exc:  # pydicom raises many types on bad input
        raise Refused("unparseable", type(exc).__name__) from exc
    has_pixels = any(int(t) in PIXEL_TAGS for t in ds.keys())
    try:
        result = deidentify(ds, plan, pseudonymizer, has_pixels=has_pixels)
        out = result.dataset
        out.file_meta.TransferSyntaxUID = UID(DEFLATED)
        buf = DicomBytesIO()
        buf.write(PREAMBLE)
        write_file_meta_info(buf, out.file_meta, enforce_standard=True)
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        plain = _encode(out, False, True)
        payload = deflater.compress(plain) + deflater.flush()
        if len(payload) % 2:
            payload += b"\x00"
    except Refused:
        raise
    except Exception as exc:  # pydicom value errors on hostile input
        raise Refused("unparseable", type(exc).__name__) from exc
    return View(
        header=buf.getvalue() + payload,
        pixel_offset=0,
        pixel_length=0,
        trailer=b"",
        relpath=layout_path(out, layout, source_rel),
        report=result.report,
        source=st,
    )


def render_path(
    path: str | os.PathLike[str],
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
) -> View:
    """Open ``path`` read-only (never following a final symlink) and :func:`render` it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused("unreadable", os.strerror(exc.errno or 0)) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_regular", "not a regular file")
        return render(f, SourceStat.of(st), plan, pseudonymizer, layout, source_rel)


def read_view(view: View, fd: int, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset+size)`` of ``view``, pixel bytes read from source ``fd``.

    Raises
    ------
    Refused
        When the source no longer holds the bytes the view was built from (changed or
        truncated), so a reader never gets stale or mixed bytes.
    """
    end = min(offset + size, view.size)
    if offset >= end:
        return b""
    h = len(view.header)
    p_end = h + view.pixel_length
    parts: list[bytes] = []
    if offset < h:
        parts.append(view.header[offset : min(end, h)])
    if end > h and offset < p_end and view.pixel_length:
        start = max(offset, h)
        stop = min(end, p_end)
        want = stop - start
        chunk = os.pread(fd, want, view.pixel_offset + (start - h))
        if len(chunk) != want:
            raise Refused("source_changed", "source is shorter than when it was indexed")
        parts.append(chunk)
    if end > p_end:
        parts.append(view.trailer[max(offset, p_end) - p_end : end - p_end])
    return b"".join(parts) if len(parts) != 1 else parts[0]


def source_unchanged(view: View, fd: int) -> bool:
    """True while the open source still has the state the view was built from."""
    return SourceStat.of(os.fstat(fd)) == view.source


def write_view(view: View, src_fd: int, out: BinaryIO) -> None:
    """Write the whole view to ``out``; pixel bytes are copied in the kernel where possible."""
    out.write(view.header)
    out.flush()
    remaining = view.pixel_length
    src_at = view.pixel_offset
    out_fd = out.fileno()
    while remaining > 0:
        try:
            n = os.copy_file_range(src_fd, out_fd, remaining, src_at)
        except OSError:
            n = 0
        if n <= 0:
            chunk = os.pread(src_fd, min(remaining, 1 << 20), src_at)
            if not chunk:
                raise Refused("source_changed", "source is shorter than when it was read")
            os.write(out_fd, chunk)
            n = len(chunk)
        remaining -= n
        src_at += n
    out.write(view.trailer)
