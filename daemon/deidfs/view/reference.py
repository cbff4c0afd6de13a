"""The reference path of :func:`deidfs.view.render.render`: pydicom parses the header up to
Pixel Data, :func:`~deidfs.deid.engine.deidentify` applies the plan, and an encoder
(:mod:`deidfs.view.encode`) writes the result byte for byte as pydicom's ``write_dataset``
would.

It handles every source the fast path declines: implicit VR and big endian data sets, files
without a preamble, deflated data sets (:mod:`deidfs.view.deflated`), masked pixels,
character sets other than ASCII, and anything malformed, which it refuses. Importing it
imports pydicom.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import PurePosixPath
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from deidfs.deid.engine import deidentify
from deidfs.deid.layout import Layout, layout_path
from deidfs.deid.outcome import Report
from deidfs.deid.pixels import (
    MAX_DECODED_BYTES,
    PATCHABLE_PHOTOMETRICS,
    ImageInfo,
    decoded_size,
    image_info,
    merge_ranges,
    native_excess,
    native_geometry,
    native_ranges,
    reencode,
    update_header,
)
from deidfs.deid.plan import Plan
from deidfs.deid.profiles import Rect
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.structure import check_dataset, check_trailer, meta_end
from deidfs.errors import Refused
from deidfs.view.deflated import _meta_transfer_syntax, _render_deflated
from deidfs.view.encode import _encode, _encode_header, _pydicom_element
from deidfs.view.model import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    LONG_VRS,
    MAX_HEADER_BYTES,
    PIXEL_TAGS,
    SourceStat,
    View,
    pixel_element_end,
)

__all__ = ["native_zeroed", "render_reference"]

#: First read of the header walk before pydicom; each further read is four times larger.
_FIRST_WALK_READ = 64 * 1024

#: Largest file whose header is walked to tell why pydicom could not read it.
MAX_DIAGNOSED = 64 * 1024 * 1024
_IMAGE_PIXEL_TAGS = (0x00280010, 0x00280011)  #: Rows, Columns (Pixel Data is Type 1C with them)


def render_reference(
    f: BinaryIO,
    st: SourceStat,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> View:
    """:func:`~deidfs.view.render.render` without its fast path: parse the header with pydicom,
    de-identify it with :func:`~deidfs.deid.engine.deidentify`, encode it.

    Before pydicom reads anything, the header's bytes are walked (at most
    ``max_header_bytes`` of them, the elements before Pixel Data): a header longer than that
    is refused as ``header_too_large``, and a hole of zeros (a sparse file) at once, instead
    of having pydicom walk it at eight bytes an element.

    Raises
    ------
    Refused
        For anything that is not DICOM, cannot be parsed, or cannot be de-identified safely.
    """
    size = st.size
    preamble = _has_preamble(f)
    if not preamble and not _looks_like_raw_dataset(f):
        raise Refused("not_dicom", "no DICM marker and no recognizable data set")
    if preamble and _meta_transfer_syntax(f) == DEFLATED:
        # Before pydicom: dcmread inflates a deflated data set whole, with no size limit.
        return _render_deflated(f, st, plan, pseudonymizer, layout, source_rel)
    if preamble:
        _bound_header(f, size, max_header_bytes)
    f.seek(0)
    try:
        ds = dcmread(f, stop_before_pixels=True, force=not preamble)
    except Exception as exc:  # pydicom raises many types on bad input
        _diagnose(f, preamble, size)
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
    highest = _check_header(f, ts, preamble, pos, size, implicit, little)
    pixel_offset = pixel_end = pos
    trailer: Dataset | None = None
    if pos < size:
        f.seek(pos)
        head = f.read(4)
        tag = struct.unpack("<HH" if little else ">HH", head) if len(head) == 4 else (0, 0)
        pixel_tag = (tag[0] << 16) | tag[1]
        if pixel_tag in PIXEL_TAGS:
            pixel_end = pixel_element_end(f, pos, size, implicit, little)
        if pixel_end < size:
            _check_trailer(f, pixel_end, size, max(pixel_tag, highest), implicit, little)
            f.seek(pixel_end)
            try:
                trailer = read_dataset(f, implicit, little, bytelength=size - pixel_end)
            except Exception as exc:  # bad trailing data: fail closed
                raise Refused("unparseable", "elements after pixel data") from exc
    has_pixels = pixel_end > pixel_offset
    if not has_pixels and any(t in ds for t in _IMAGE_PIXEL_TAGS):
        # The Image Pixel module announces pixels that are not there (PS3.3 C.7.6.3: Pixel
        # Data is Type 1C with Rows): most likely a file cut at an element boundary before
        # Pixel Data (even between Rows and Columns), which the size check cannot see.
        raise Refused("no_pixel_data", "image pixel attributes without pixel data")
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
    zeroed: tuple[tuple[int, int], ...] = ()
    pixels = b""
    report = result.report
    if report.redactions:
        zeroed, pixels = _redact(f, ds, out, report, pixel_offset, pixel_end, preamble)
        if pixels:
            pixel_offset = pixel_end = 0
    if has_pixels and not pixels:
        excess = _excess(f, ds, ts, pixel_offset, pixel_end, implicit, little)
        if excess is not None:
            zeroed = tuple(merge_ranges([*zeroed, excess]))
            counts = dict(report.counts)
            counts["pixel_excess_zeroed"] = 1
            report = dataclasses.replace(report, counts=tuple(sorted(counts.items())))
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
        report=report,
        source=st,
        zeroed=zeroed,
        pixels=pixels,
    )


def _has_preamble(f: BinaryIO) -> bool:
    f.seek(128)
    return f.read(4) == b"DICM"


def _looks_like_raw_dataset(f: BinaryIO) -> bool:
    """A file without preamble is accepted only if it starts with a plausible tag."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return False
    # Little or (retired) big endian: pydicom tells them apart by the first tag too.
    return any(struct.unpack(e, head[:2])[0] in (0x0002, 0x0008) for e in ("<H", ">H"))


def _check_header(
    f: BinaryIO, ts: str, preamble: bool, pos: int, size: int, implicit: bool, little: bool
) -> int:
    """Refuse a header that is not whole at every depth, or that pydicom read otherwise
    than its bytes are (:func:`~deidfs.deid.structure.check_dataset`): pydicom stops
    quietly at the end of a file inside an undefined-length item or sequence, and at a
    stray item delimiter, and would hand us part of a data set. Returns the highest
    top-level tag of the header."""
    f.seek(0)
    head = f.read(min(size, pos + 12))  # through the header of the element pydicom stopped at
    start = meta_end(head, 132 if preamble else 0, len(head))
    if ts and start + 6 <= len(head):
        # pydicom reads a data set encoded otherwise than its transfer syntax says as it
        # finds it (by the first element), and says so only in a warning; a reader that
        # trusts the transfer syntax would read garbage.
        vr = head[start + 4 : start + 6]
        if (not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)) != _implicit_syntax(ts, implicit):
            raise Refused(
                "transfer_syntax_mismatch",
                "the data set is not encoded as its transfer syntax says",
            )
    stop, highest = check_dataset(head, start, len(head), implicit, little)
    if stop != pos:
        raise Refused("unparseable", "the data set does not end where its parse stopped")
    return highest


def _bound_header(f: BinaryIO, size: int, limit: int) -> None:
    """Walk the header of a Part 10 file (preamble, meta) before pydicom reads it, in reads
    that grow until the walk reaches Pixel Data or the end of the file; refuse it past
    ``limit`` bytes (``header_too_large``) and refuse what the walk refuses. A hole of zero
    bytes reads as one element repeated: refused at its second."""
    ts = _meta_transfer_syntax(f)
    want = _FIRST_WALK_READ
    while True:
        f.seek(0)
        head = f.read(min(size, want))
        start = meta_end(head, 132, len(head))
        if start + 6 > len(head):
            return  # no data set to speak of: pydicom and the checks after it decide
        vr = head[start + 4 : start + 6]
        found_implicit = not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)
        implicit = _implicit_syntax(ts, found_implicit) if ts else found_implicit
        if implicit != found_implicit:
            raise Refused(
                "transfer_syntax_mismatch",
                "the data set is not encoded as its transfer syntax says",
            )
        try:
            stop, _ = check_dataset(head, start, len(head), implicit, ts != EXPLICIT_BE)
        except Refused as refused:
            if refused.reason != "truncated" or len(head) == size:
                raise
        else:
            if stop < len(head) or len(head) == size:
                return  # at Pixel Data, or the whole file walked
        if len(head) >= limit:
            raise Refused("header_too_large", "the header runs past the size limit")
        want = min(4 * want, limit)


def _diagnose(f: BinaryIO, preamble: bool, size: int) -> None:
    """Raise ``truncated`` for a header pydicom could not read because the file ends inside
    it (pydicom raises OSError, EOFError and others then): the reason says what happened.
    Returns when the bytes do not tell (the caller refuses it as unparseable)."""
    if not preamble:
        return
    f.seek(0)
    head = f.read(min(size, MAX_DIAGNOSED))
    ts = _meta_transfer_syntax(f)
    if ts not in (IMPLICIT_LE, EXPLICIT_BE, EXPLICIT_LE) and not UID(ts).is_transfer_syntax:
        return
    try:
        start = meta_end(head, 132, len(head))
        check_dataset(head, start, len(head), ts == IMPLICIT_LE, ts != EXPLICIT_BE)
    except Refused as refused:
        if refused.reason == "truncated" and len(head) == size:
            raise
    except Exception:  # only a diagnosis: the caller refuses the file anyway
        return


def _implicit_syntax(ts: str, found: bool) -> bool:
    """Whether ``ts`` names implicit VR (``found`` for a private syntax deidfs cannot tell)."""
    if ts == IMPLICIT_LE:
        return True
    if ts in (EXPLICIT_LE, EXPLICIT_BE) or UID(ts).is_transfer_syntax:
        return False
    return found


def _check_trailer(
    f: BinaryIO, at: int, size: int, after: int, implicit: bool, little: bool
) -> None:
    """:func:`~deidfs.deid.structure.check_trailer` of what follows Pixel Data."""
    f.seek(at)
    check_trailer(f.read(size - at), after, implicit, little)


def _excess(
    f: BinaryIO,
    ds: Dataset,
    ts: str,
    pixel_offset: int,
    pixel_end: int,
    implicit: bool,
    little: bool,
) -> tuple[int, int] | None:
    """The range (relative to ``pixel_offset``) of native pixel bytes past the last frame,
    served as zeros (see :func:`~deidfs.deid.pixels.native_excess`), or None."""
    value_at, length = _pixel_value_at(f, pixel_offset, implicit, little)
    if length == 0xFFFFFFFF:
        return None
    stop = native_excess(image_info(ds, "", ts or IMPLICIT_LE), length)
    if stop is None:
        return None
    return value_at - pixel_offset + stop, pixel_end - pixel_offset


def _pixel_value_at(f: BinaryIO, pos: int, implicit: bool, little: bool) -> tuple[int, int]:
    """Offset and length of the value of the pixel data element at ``pos``."""
    f.seek(pos)
    head = f.read(12)
    e = "<" if little else ">"
    if implicit:
        return pos + 8, int(struct.unpack(e + "L", head[4:8])[0])
    if head[4:6] in LONG_VRS:
        return pos + 12, int(struct.unpack(e + "L", head[8:12])[0])
    return pos + 8, int(struct.unpack(e + "H", head[6:8])[0])


def native_zeroed(
    f: BinaryIO,
    info: ImageInfo,
    rects: tuple[Rect, ...],
    pixel_offset: int,
    implicit: bool,
    little: bool,
) -> tuple[tuple[int, int], ...] | None:
    """The :attr:`View.zeroed` ranges that redact ``rects`` in the native pixel data element
    at ``pixel_offset``, or None when that pixel data is not patched in place (encapsulated,
    or a colour space where zero is not uniform: it is decoded and encoded instead).

    Raises
    ------
    Refused
        For pixel data shorter than its image, or a layout zero bytes cannot redact.
    """
    value_at, length = _pixel_value_at(f, pixel_offset, implicit, little)
    if (
        not info.is_native
        or length == 0xFFFFFFFF
        or info.photometric not in (PATCHABLE_PHOTOMETRICS)
    ):
        return None
    geom = native_geometry(info)
    if geom.total_bytes > length:
        raise Refused("bad_pixel_data", "native pixel data shorter than its image")
    shift = value_at - pixel_offset
    ranges = native_ranges(geom, rects)
    if length > geom.total_bytes:
        # Bytes past the last frame the header declares (padding, or frames Number of
        # Frames does not count, which some readers still show): zeroed, fail closed.
        ranges = (*ranges, (geom.total_bytes, length))
    return tuple((a + shift, b + shift) for a, b in merge_ranges(ranges))


def _redact(
    f: BinaryIO,
    ds: Dataset,
    out: Dataset,
    report: Report,
    pixel_offset: int,
    pixel_end: int,
    preamble: bool,
) -> tuple[tuple[tuple[int, int], ...], bytes]:
    """Apply ``report.redactions`` to the source's pixel data: the zeroed byte ranges of
    native pixel data (relative to ``pixel_offset``), or a new Pixel Data element (and
    ``out`` updated to describe it)."""
    implicit, little = ds.original_encoding
    ts = str(out.file_meta.TransferSyntaxUID)
    info = image_info(ds, "", ts)
    zeroed = native_zeroed(f, info, report.redactions, pixel_offset, bool(implicit), bool(little))
    if zeroed is not None:
        return zeroed, b""
    if pixel_end - pixel_offset > MAX_DECODED_BYTES or decoded_size(info) > MAX_DECODED_BYTES:
        raise Refused("too_large", "pixel data to redact exceeds the size limit")
    f.seek(0)
    try:
        full = dcmread(f, force=not preamble)
    except Exception as exc:  # read before without error; changed meanwhile
        raise Refused("unparseable", type(exc).__name__) from exc
    if not hasattr(full, "file_meta"):
        full.file_meta = FileMetaDataset()
    full.file_meta.TransferSyntaxUID = UID(ts)
    new = reencode(
        full, info, report.redactions, allow_rle=not info.is_native, little_endian=bool(little)
    )
    update_header(out, new)
    try:
        element = _pydicom_element(new.element, bool(implicit), bool(little), default_encoding)
    except Exception as exc:  # pragma: no cover - pydicom writes what it made
        raise Refused("unwritable", type(exc).__name__) from exc
    return (), element
