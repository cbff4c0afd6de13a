"""The reference path of a deflated data set (Deflated Explicit VR Little Endian).

The file meta group's transfer syntax is read before pydicom (:func:`_meta_transfer_syntax`),
because ``dcmread`` inflates a deflated data set whole with no size limit: here the stream
is inflated in chunks up to :data:`MAX_INFLATED`, de-identified, encoded and deflated again
into a view without source pixel bytes. Importing it imports pydicom.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import PurePosixPath
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from deidfs.deid.engine import deidentify
from deidfs.deid.layout import Layout, layout_path
from deidfs.deid.pixels import image_info, reencode, update_header
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.structure import check_dataset
from deidfs.errors import Refused
from deidfs.view.encode import _encode
from deidfs.view.model import DEFLATED, LONG_VRS, PIXEL_TAGS, PREAMBLE, SourceStat, View

#: Largest inflated size accepted for a deflated source (a deflate bomb is refused).
MAX_INFLATED = 512 * 1024 * 1024
#: Bytes inflated at a time (the memory a deflate bomb costs beyond the limit).
_INFLATE_CHUNK = 16 * 1024 * 1024
#: Bytes read to find the transfer syntax in the file meta group.
_MAX_META_READ = 64 * 1024


def _meta_transfer_syntax(f: BinaryIO) -> str:
    """The Transfer Syntax UID of a Part 10 file meta group, read without pydicom ("" if
    not found). Only the file meta group is read (explicit VR little endian, PS3.10 7.1)."""
    f.seek(132)
    head = f.read(_MAX_META_READ)
    pos = 0
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        if head[pos + 4 : pos + 6] in LONG_VRS:
            if pos + 12 > len(head):
                break
            length, value_at = struct.unpack_from("<L", head, pos + 8)[0], pos + 12
        else:
            length, value_at = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if element == 0x0010:
            return head[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    return ""


def _inflate(stream: bytes) -> bytes:
    """Inflate a raw deflate stream, refusing it as soon as it passes :data:`MAX_INFLATED`:
    a deflate bomb costs at most the limit plus one chunk of memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks: list[bytes] = []
    inflated = 0
    pending = stream
    try:
        while not inflater.eof:
            before = len(pending)
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if not chunk and len(pending) == before:
                break  # no input left to make progress with
            inflated += len(chunk)
            if inflated > MAX_INFLATED:
                raise Refused("too_large", "deflated data set inflates past the size limit")
            chunks.append(chunk)
    except zlib.error as exc:
        raise Refused("unparseable", "deflate stream is corrupt") from exc
    if not inflater.eof:
        raise Refused("truncated", "deflate stream ends early")
    return b"".join(chunks)


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
    body = _inflate(data[body_at:])
    try:
        # The body is already inflated: read it as the explicit VR little endian data set
        # it is (dcmread would try to inflate it again, going by the meta's syntax).
        meta = FileMetaDataset(read_dataset(io.BytesIO(data[132:body_at]), False, True))
        ds = read_dataset(io.BytesIO(body), False, True)
        ds.file_meta = meta
    except Exception as exc:  # pydicom raises many types on bad input
        raise Refused("unparseable", type(exc).__name__) from exc
    check_dataset(body, 0, len(body), False, True, stop_at_pixels=False)
    has_pixels = any(int(t) in PIXEL_TAGS for t in ds.keys())
    try:
        result = deidentify(ds, plan, pseudonymizer, has_pixels=has_pixels)
        out = result.dataset
        if result.report.redactions:
            # Native pixel data inside the deflated stream, already in memory: redacted and
            # stored native again, then deflated with the rest.
            new = reencode(
                ds, image_info(ds, "", DEFLATED), result.report.redactions, allow_rle=False
            )
            update_header(out, new)
            out[0x7FE00010] = new.element
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
