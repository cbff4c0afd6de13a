"""The fast path's walk of one source's data sets.

:class:`_Run` walks the top level and, recursively, every kept sequence's items, and
collects their encoded output elements; it mirrors engine._Walker.dataset. Kept and removed
elements of the most common kinds take the short branch of its loop (the hot path, keyed by
the six bytes of an element header); every other element goes the long way, through
:class:`~deidfs.deid.fast_actions._Actions`. The bytes are read through a
:class:`~deidfs.deid.fast_scan._Scanner`, the top-level values kept by a
:class:`~deidfs.deid.fast_root._TopLevel`. Pure: no I/O.
"""

from __future__ import annotations

from deidfs.deid.attribute_types import TOP_LEVEL
from deidfs.deid.dictionary import BAD_TEXT, SHORT_TEXT, TEXT_VRS, VALUE_SIZES, length_fits
from deidfs.deid.fast_actions import _Actions
from deidfs.deid.fast_root import _TopLevel
from deidfs.deid.fast_scan import _Scanner
from deidfs.deid.fast_tables import _MAX_TAGS, _Tables
from deidfs.deid.fast_values import _element, _reencode, _sequence
from deidfs.deid.fast_wire import (
    _ADDED_TAGS,
    _EMPTY,
    _ITEM_END,
    _ITEM_TAG,
    _KEEP,
    _KEEP_IMAGE,
    _LAYOUT_TAGS,
    _NOT_RAW,
    _OTHER,
    _OTHER_PIXEL_DATA,
    _REMOVE,
    _ROOT_TAGS,
    _SCRUB_DUMMY,
    _SCRUB_VRS,
    _SEQUENCE_END,
    _VR_INFO,
    PIXEL_DATA,
    Decline,
    NeedMore,
    _unpack_head,
    _unpack_ul,
    _unpack_us,
    _unpack_us_ul,
)
from deidfs.deid.plan import Op, Source
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.trust import doubt, value_check


class _Run:
    """One file: walks its data sets and collects the output, mirroring engine._Walker."""

    def __init__(
        self, data: bytes, size: int, tables: _Tables, pseudo: Pseudonymizer, media_class: str
    ) -> None:
        self.scan = _Scanner(data)
        self.top = _TopLevel(self.scan, size, pseudo, media_class)
        self.actions = _Actions(self.scan, self.top, tables, pseudo, self.sequence)
        self.size = size
        self.tables = tables
        self.names: dict[int, str | None] = {}
        self.top_count = 0  #: top-level source elements
        self.removed_slot = -1  #: index of PatientIdentityRemoved in the top-level output

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
        data = self.scan.data
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
                        self.actions.flush_private(out, creators, kept_blocks)
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
                            self.actions.image_attribute(
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
                    next_pos = self.scan.value_end(tag, vr, start, length)
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
                self.actions.flush_private(out, creators, kept_blocks)
                private_group = -1
            if group == 0x0002:
                raise Decline("meta_group")  # the engine removes it and counts it so
            known = fast_ops.get(tag)
            op = known if known is not None else _OTHER if scrub else self.actions.fast_op(tag)
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
                    self.actions.image_attribute(tag, vr, start, next_pos, raw_mode, len(out) - 1)
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
                self.top.top_next = next_pos
                self.top.root_done = tag + 1
                if tag in _ROOT_TAGS and tag not in self.top.root:
                    self.top.root[tag] = (vr, data[start:next_pos])
                if tag in _OTHER_PIXEL_DATA:
                    raise Decline("float_pixel_data")
            if group & 1:
                private_group = group
                self.actions.private(
                    out, tag, vr, start, length, next_pos, raw_mode, creators, kept_blocks
                )
            elif group == 0x0000:
                raise Decline("command_group")  # pydicom reads it apart, as implicit VR
            else:
                self.public(out, tag, vr, start, length, next_pos, top, raw_mode, scrub, parent)
            pos = next_pos
        if private_group >= 0:
            self.actions.flush_private(out, creators, kept_blocks)
        for added_tag, value in added:
            if added_tag == 0x00120062:
                self.removed_slot = len(out)
            append(value)
        counts = self.actions.counts
        if kept:
            counts["keep"] = counts.get("keep", 0) + kept
        if removed:
            counts["remove"] = counts.get("remove", 0) + removed
        if emptied:
            counts["empty"] = counts.get("empty", 0) + emptied
        if top:
            self.top_count = seen
        return pos, out

    def public(
        self,
        out: list[bytes],
        tag: int,
        vr: str,
        start: int,
        length: int,
        next_pos: int,
        top: bool,
        raw_mode: bool,
        scrub: bool,
        parent: int,
    ) -> None:
        """A public element the long way of :meth:`dataset`: decided where it occurs,
        applied, and appended to ``out`` unless removed (or replaced by an added attribute);
        a layout attribute's output value is recorded."""
        decision = self.actions.decide(tag)
        if decision.by_type:
            decision = decision.at(self.top.places().get((parent, tag)))
        if (
            scrub
            and decision.op is Op.KEEP
            and decision.source is Source.DEFAULT
            and (vr if vr != "UN" else self.actions.un_vr(tag, length)) in _SCRUB_VRS
        ):
            decision = _SCRUB_DUMMY
        encoded = self.actions.apply(tag, vr, start, length, next_pos, decision, raw_mode, scrub)
        if top and raw_mode and decision.op in (Op.KEEP, Op.VERBATIM):
            encoded = self.actions.converted(tag, vr, start, next_pos, encoded, len(out))
        if top:
            if tag in _LAYOUT_TAGS:
                self.names[tag] = self.actions.output_name(tag, vr, start, next_pos, encoded)
            if tag in _ADDED_TAGS:
                encoded = None  # replaced by the engine's own
        if encoded is not None:
            out.append(encoded)

    def sequence(self, tag: int, start: int, length: int, scrub: bool) -> bytes:
        """A kept sequence: every item walked with the same plan, rebuilt."""
        end = None if length == 0xFFFFFFFF else start + length
        items: list[bytes] = []
        pos = start
        while end is None or pos < end:
            if end is not None and pos + 8 > end:
                raise Decline("sequence_overrun")
            item_tag, _, item_start, item_length = self.scan.item_header(pos)
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
                self.scan.check_explicit(item_start)
            pos, parts = self.dataset(item_start, item_end, False, scrub, parent=tag)
            items.append(b"".join(parts))
        if end is not None and pos != end:
            raise Decline("sequence_overrun")
        return _sequence(tag, items)
