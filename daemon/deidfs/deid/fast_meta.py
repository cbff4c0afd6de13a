"""The file meta group, as the fast path reads the source's and writes the output's.

:func:`_transfer_syntax` checks the preamble and the source's file meta group and returns
where the data set starts, its transfer syntax and Media Storage SOP Class UID (declining
implicit VR, big endian, deflate and private transfer syntaxes); :func:`_file_meta` writes
the group engine.deidentify builds, as the view encoder writes it. Pure: no I/O.
"""

from __future__ import annotations

from deidfs.deid.dictionary import private_transfer_syntaxes
from deidfs.deid.fast_tables import _MAX_CACHED_VALUE
from deidfs.deid.fast_values import _ascii, _element, _padded, _values
from deidfs.deid.fast_wire import (
    _VR_INFO,
    DEFLATED,
    EXPLICIT_BE,
    IMPLICIT_LE,
    PREAMBLE,
    Decline,
    NeedMore,
    _pack_ul,
    _unpack_head,
    _unpack_ul,
)
from deidfs.deid.outcome import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

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
