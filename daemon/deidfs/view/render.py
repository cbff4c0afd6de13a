"""View bytes of one source file: de-identified header + original pixel bytes + trailer.

A view never holds the pixel data in memory: it records where the Pixel Data element lies
in the source, and :func:`read_view` / :func:`write_view` copy those bytes from the source
file at their offset. Headers are read up to Pixel Data only; the Pixel Data element is
located by walking its item headers, never by decoding it.

:func:`render` builds a view by the fast path (:mod:`deidfs.deid.fastpath`, straight from
the source's bytes) when it can, else by the reference path (:mod:`deidfs.view.reference`:
pydicom, the engine, the encoder), which gives the same bytes and handles everything else.

Deflated sources are the one exception: the whole dataset is one compressed stream, so it
is inflated (with a size limit), de-identified whole, deflated again and held in memory.

Pixel masks (:mod:`deidfs.deid.pixels`): in native pixel data the bytes the rectangles cover
are listed in ``View.zeroed`` and read as zeros, the rest still streams from the source.
Encapsulated (compressed) pixel data is decoded, redacted and encoded again losslessly; that
view holds its new Pixel Data element in memory (``View.pixels``), bounded in size.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import struct
from pathlib import PurePosixPath
from typing import BinaryIO

from deidfs.deid.fastpath import Decline, NeedMore, deidentify_header
from deidfs.deid.layout import Layout, layout_path, layout_path_of
from deidfs.deid.pixels import native_excess, zero_ranges
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.structure import check_dataset, check_trailer, meta_end
from deidfs.errors import Refused
from deidfs.view.model import (
    DEFLATED,
    LONG_VRS,
    MAX_HEADER_BYTES,
    PIXEL_TAGS,
    PIXEL_VRS,
    SourceStat,
    View,
    pixel_element_end,
    tag_at,
)

__all__ = [
    "DEFLATED",
    "MAX_HEADER_BYTES",
    "PIXEL_TAGS",
    "Layout",
    "SourceStat",
    "View",
    "layout_path",
    "read_view",
    "read_view_into",
    "render",
    "render_path",
    "source_unchanged",
    "write_view",
]

#: Bytes the fast path reads first (headers are mostly a few KiB), and at most.
_FAST_FIRST_READ = 16 * 1024
_FAST_MAX_READ = 16 * 1024 * 1024
#: Bytes of patched pixel data :func:`write_view` reads and writes at a time.
_PATCH_CHUNK = 1 << 20
_END = 1 << 62  #: beyond any offset (a bisect key)


def render(
    f: BinaryIO,
    st: SourceStat,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
    *,
    fast: bool = True,
    max_header_bytes: int | None = None,
) -> View:
    """Build the view of the open source ``f`` whose state is ``st``.

    With ``fast`` (the default), :mod:`deidfs.deid.fastpath` builds the view straight from
    the source's bytes when it can, with the very bytes and report this function builds
    otherwise (pydicom parse, engine, encoder); it declines everything else.

    Raises
    ------
    Refused
        For anything that is not DICOM, cannot be parsed, or cannot be de-identified safely.
    """
    limit = MAX_HEADER_BYTES if max_header_bytes is None else max_header_bytes
    if fast:
        view = _render_fast(f, st, plan, pseudonymizer, layout, source_rel, limit)
        if view is not None:
            return view
    # The reference path, and pydicom with it, loads for the first source the fast path
    # declines: a run whose files all take the fast path never imports pydicom.
    from deidfs.view.reference import render_reference  # noqa: PLC0415

    return render_reference(f, st, plan, pseudonymizer, layout, source_rel, limit)


def _render_fast(
    f: BinaryIO,
    st: SourceStat,
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout,
    source_rel: PurePosixPath | None,
    limit: int = MAX_HEADER_BYTES,
) -> View | None:
    """The view by :func:`~deidfs.deid.fastpath.deidentify_header`, or None when it declines
    (or anything is amiss: the reference path then decides, refusals included). It reads
    at most ``limit`` (and :data:`_FAST_MAX_READ`) bytes of header."""
    size = st.size
    f.seek(0)
    data = f.read(min(size, _FAST_FIRST_READ))
    try:
        while True:
            try:
                fast = deidentify_header(data, size, plan, pseudonymizer)
                break
            except NeedMore as more:
                want = min(max(more.length, 2 * len(data)), size)
                if want <= len(data) or want > min(_FAST_MAX_READ, limit):
                    return None
                data += f.read(want - len(data))
                if len(data) != want:
                    return None  # the source shrank
        pixel_end = fast.pixel_offset
        if fast.has_pixels:
            pixel_end = _fast_pixel_end(f, data, fast.pixel_offset, size)
            if pixel_end < 0:
                return None
            head = data[fast.pixel_offset : fast.pixel_offset + 12]
            long = head[4:6] in LONG_VRS
            length = struct.unpack_from("<L" if long else "<H", head, 8 if long else 6)[0]
            if fast.image is not None and native_excess(fast.image, int(length)) is not None:
                return None  # bytes past the image: the reference path zeroes them
            if pixel_end < size:
                f.seek(pixel_end)
                trailer = f.read(size - pixel_end)
                if len(trailer) != size - pixel_end:
                    return None
                # The reference path says why a trailer that is not whole elements rising
                # above the header's is withheld.
                start = meta_end(data, 132, len(data))
                top = min(len(data), fast.pixel_offset + 12)
                _, highest = check_dataset(data, start, top, False, True)
                check_trailer(trailer, highest, False, True)
                fast = deidentify_header(data, size, plan, pseudonymizer, trailer)
    except (Decline, RecursionError, Refused):
        # RecursionError: sequences nested deeper than the fast path recurses; the reference
        # path refuses them (or handles them) like any other malformed input.
        return None
    sop, patient, study, series = fast.names
    return View(
        header=fast.header,
        pixel_offset=fast.pixel_offset,
        pixel_length=pixel_end - fast.pixel_offset,
        trailer=fast.trailer,
        relpath=layout_path_of(layout, sop, patient, study, series, source_rel=source_rel),
        report=fast.report,
        source=st,
    )


def _fast_pixel_end(f: BinaryIO, data: bytes, pos: int, size: int) -> int:
    """:func:`pixel_element_end` of explicit VR little endian Pixel Data at ``pos``, from
    ``data`` when its value has a defined length; -1 where that function refuses."""
    head = data[pos : pos + 12]
    if len(head) == 12:
        if head[4:6] not in PIXEL_VRS.get(tag_at(head, "<"), (b"OB", b"OW")):
            return -1  # the reference path refuses it
        if head[4:6] in LONG_VRS:
            length, value_start = int(struct.unpack("<L", head[8:12])[0]), pos + 12
        else:
            length, value_start = int(struct.unpack("<H", head[6:8])[0]), pos + 8
        if length != 0xFFFFFFFF:
            return value_start + length if value_start + length <= size else -1
    try:
        return pixel_element_end(f, pos, size, False, True)
    except Refused:
        return -1


def render_path(
    path: str | os.PathLike[str],
    plan: Plan,
    pseudonymizer: Pseudonymizer,
    layout: Layout = Layout.DICOM,
    source_rel: PurePosixPath | None = None,
    max_header_bytes: int | None = None,
) -> View:
    """Open ``path`` read-only (never following a final symlink) and :func:`render` it
    (``max_header_bytes``: the header's bound, the default if None)."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise Refused("unreadable", os.strerror(exc.errno or 0)) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)  # checked before fdopen, which raises IsADirectoryError on directories
        raise Refused("not_regular", "not a regular file")
    with os.fdopen(fd, "rb") as f:
        return render(
            f,
            SourceStat.of(st),
            plan,
            pseudonymizer,
            layout,
            source_rel,
            max_header_bytes=max_header_bytes,
        )


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
    parts: list[bytes] = []
    if offset < h:
        parts.append(view.header[offset : min(end, h)])
    if view.pixels:
        m_end = h + len(view.pixels)
        if end > h and offset < m_end:
            parts.append(view.pixels[max(offset, h) - h : min(end, m_end) - h])
        h = m_end
    p_end = h + view.pixel_length
    if end > h and offset < p_end and view.pixel_length:
        start = max(offset, h)
        stop = min(end, p_end)
        want = stop - start
        chunk = os.pread(fd, want, view.pixel_offset + (start - h))
        if len(chunk) != want:
            raise Refused("source_changed", "source is shorter than when it was indexed")
        if view.zeroed:
            chunk = _zero_chunk(chunk, start - h, view.zeroed)
        parts.append(chunk)
    if end > p_end:
        parts.append(view.trailer[max(offset, p_end) - p_end : end - p_end])
    return b"".join(parts) if len(parts) != 1 else parts[0]


def read_view_into(view: View, fd: int, offset: int, out: memoryview) -> int:
    """Write bytes ``[offset, offset+len(out))`` of ``view`` into ``out``, the very bytes
    :func:`read_view` returns, without building them in Python objects: pixel bytes are
    read from source ``fd`` straight into ``out`` (``preadv``). Returns how many were
    written (fewer than ``len(out)`` only at the end of the view).

    Raises
    ------
    Refused
        When the source no longer holds the bytes the view was built from (changed or
        truncated), so a reader never gets stale or mixed bytes.
    """
    end = min(offset + len(out), view.size)
    if offset >= end:
        return 0
    h = len(view.header)
    if offset < h:
        stop = min(end, h)
        out[: stop - offset] = memoryview(view.header)[offset:stop]
    if view.pixels:
        m_end = h + len(view.pixels)
        if end > h and offset < m_end:
            start, stop = max(offset, h), min(end, m_end)
            out[start - offset : stop - offset] = memoryview(view.pixels)[start - h : stop - h]
        h = m_end
    p_end = h + view.pixel_length
    if end > h and offset < p_end and view.pixel_length:
        start = max(offset, h)
        stop = min(end, p_end)
        at = view.pixel_offset + (start - h)
        into = out[start - offset : stop - offset]
        while into:
            n = os.preadv(fd, [into], at)
            if n <= 0:
                raise Refused("source_changed", "source is shorter than when it was indexed")
            into = into[n:]
            at += n
        if view.zeroed:
            chunk_at = start - h
            first = max(0, bisect.bisect_right(view.zeroed, (chunk_at, _END)) - 1)
            zero_ranges(out[start - offset : stop - offset], chunk_at, view.zeroed, first)
    if end > p_end:
        start = max(offset, p_end)
        out[start - offset : end - offset] = memoryview(view.trailer)[start - p_end : end - p_end]
    return end - offset


def _zero_chunk(chunk: bytes, at: int, zeroed: tuple[tuple[int, int], ...]) -> bytes:
    """``chunk`` (source pixel bytes from offset ``at``) with the ``zeroed`` ranges zeroed;
    the same object when none overlaps."""
    # The first range that may overlap: the last one starting at or before ``at``.
    first = max(0, bisect.bisect_right(zeroed, (at, _END)) - 1)
    end = at + len(chunk)
    if first >= len(zeroed) or (
        zeroed[first][1] <= at and (first + 1 >= len(zeroed) or zeroed[first + 1][0] >= end)
    ):
        return chunk
    data = bytearray(chunk)
    zero_ranges(data, at, zeroed, first)
    return bytes(data)


def source_unchanged(view: View, fd: int) -> bool:
    """True while the open source still has the state the view was built from."""
    return SourceStat.of(os.fstat(fd)) == view.source


def write_view(view: View, src_fd: int, out: BinaryIO) -> None:
    """Write the whole view to ``out``; pixel bytes are copied in the kernel where possible."""
    if view.zeroed:
        # Patched pixel bytes pass through memory, in the bytes read_view serves.
        out.write(view.header)
        out.write(view.pixels)
        h = len(view.header) + len(view.pixels)
        for at in range(0, view.pixel_length, _PATCH_CHUNK):
            out.write(read_view(view, src_fd, h + at, min(_PATCH_CHUNK, view.pixel_length - at)))
        out.write(view.trailer)
        return
    out.flush()
    write_view_fd(view, src_fd, out.fileno())


def write_view_fd(view: View, src_fd: int, out_fd: int) -> None:
    """Write the whole view at the position of the file descriptor ``out_fd``, without a
    buffered file object; pixel bytes are copied in the kernel where possible.

    Raises
    ------
    Refused
        When the source is shorter than the view says (it changed).
    OSError
        When the output cannot be written (a full disk raises ENOSPC).
    """
    if view.zeroed:
        with os.fdopen(os.dup(out_fd), "wb") as out:
            write_view(view, src_fd, out)
        return
    _write_all(out_fd, view.header)
    _write_all(out_fd, view.pixels)
    remaining = view.pixel_length
    src_at = view.pixel_offset
    while remaining > 0:
        try:
            n = os.copy_file_range(src_fd, out_fd, remaining, src_at)
        except OSError:
            n = 0
        if n <= 0:
            chunk = os.pread(src_fd, min(remaining, 1 << 20), src_at)
            if not chunk:
                raise Refused("source_changed", "source is shorter than when it was read")
            n = os.write(out_fd, chunk)  # may be short (a full disk): the rest comes next
        remaining -= n
        src_at += n
    _write_all(out_fd, view.trailer)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - write(2) returns a count or raises
            raise OSError(errno.EIO, "short write")
        view = view[n:]
