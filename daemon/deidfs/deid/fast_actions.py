"""What each element of a source becomes on the fast path's long way.

:class:`_Actions` mirrors engine._Walker.apply and its helpers, element by element: the
plan's decision remembered per plan and the short action the hot path may take for a tag
(:meth:`_Actions.fast_op`), whether the top level is written from its raw elements, kept
elements copied or re-encoded as the encoder writes them, UIDs, dummies and pseudonyms,
private blocks with their creators, the image attributes the reference path converts when
the source has pixels, and the counts of the report. Kept sequences are walked by the
caller's ``sequence``. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from deidfs.deid.dictionary import (
    BAD_TEXT,
    SHORT_TEXT,
    TEXT_VRS,
    VALUE_SIZES,
    is_registered_uid,
    length_fits,
    vr_of,
)
from deidfs.deid.fast_root import _TopLevel
from deidfs.deid.fast_scan import _Scanner
from deidfs.deid.fast_tables import _MAX_CACHED_VALUE, _MAX_CACHED_VALUES, _MAX_TAGS, _Tables
from deidfs.deid.fast_values import (
    _element,
    _engine_values,
    _padded,
    _plain,
    _reencode,
    _sequence,
    _values,
)
from deidfs.deid.fast_wire import (
    _ADDED_TAGS,
    _ASCII_CHARSETS,
    _CONVERTED_WITH_PIXELS,
    _DUMMY_TEXT,
    _DUMMY_VALUES,
    _EMPTY,
    _KEEP,
    _KEEP_IMAGE,
    _LAYOUT_TAGS,
    _MAX_LEN,
    _NUMERIC_VRS,
    _OTHER,
    _OTHER_PIXEL_DATA,
    _PRIVATE_REMOVE,
    _REMOVE,
    _ROOT_TAGS,
    _SAFE_VR_MISMATCH,
    _STRING_VRS,
    _VR_INFO,
    _VR_LONG,
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_DATA,
    SPECIFIC_CHARACTER_SET,
    Decline,
)
from deidfs.deid.plan import Decision, Op, Source
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.tags import keyword_of
from deidfs.deid.trust import STRUCTURAL, doubt


class _Actions:
    """One source's elements as decided: encoded output elements, and the counts."""

    def __init__(
        self,
        scan: _Scanner,
        top: _TopLevel,
        tables: _Tables,
        pseudo: Pseudonymizer,
        sequence: Callable[[int, int, int, bool], bytes],
    ) -> None:
        self.scan = scan
        self.top = top
        self.tables = tables
        self.plan = tables.plan
        self.pseudo = pseudo
        #: A kept sequence, every item walked with the same plan, rebuilt (the walker's).
        self.sequence = sequence
        self.counts: dict[str, int] = {}
        self.notes: set[str] = set()
        #: Top-level output slots to replace when the source has pixels (None: decline).
        self.pixel_fixups: list[tuple[int, bytes | None]] = []

    # -- decisions --------------------------------------------------------------------------
    def decide(self, tag: int) -> Decision:
        decisions = self.tables.decisions
        decision = decisions.get(tag)
        if decision is None:
            decision = self.plan.decide(tag)
            if len(decisions) < _MAX_TAGS:
                decisions[tag] = decision
        return decision

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def fast_op(self, tag: int) -> int:
        """What the short branch of :meth:`dataset` does with ``tag`` outside a D sequence
        (_KEEP, _KEEP_IMAGE, _REMOVE, _EMPTY; _OTHER: the long way); remembered per plan.

        Private elements are all removed, and counted so, when no rule names a private tag
        and safe private attributes are not retained: no block keeps an element, so its
        creator goes too (engine._Walker._private)."""
        op = _OTHER
        group = tag >> 16
        tables = self.tables
        if group & 1:
            if not tables.private_exact and not tables.safe_private:
                op = _REMOVE
        elif tag in _CONVERTED_WITH_PIXELS and tag not in _ADDED_TAGS:
            if self.decide(tag).op is Op.KEEP:
                op = _KEEP_IMAGE
        elif not (
            group == 0
            or tag in _ADDED_TAGS
            or tag in _LAYOUT_TAGS
            or tag in _ROOT_TAGS
            or tag in _OTHER_PIXEL_DATA
            or tag == PIXEL_DATA
            or tag in (SPECIFIC_CHARACTER_SET, PATIENT_ID, PATIENT_NAME)
        ):
            decision = self.decide(tag)
            decided = None if decision.by_type else decision.op  # by place: the long way
            if decided is Op.KEEP:
                op = _KEEP
            elif decided is Op.REMOVE:
                op = _REMOVE
            elif decided is Op.EMPTY:
                op = _EMPTY
        fast_ops = self.tables.fast_ops
        if len(fast_ops) < _MAX_TAGS:
            fast_ops[tag] = op
        return op

    def top_mode(self) -> bool:
        """Whether the top level is written from its raw elements: when its Specific
        Character Set, which the encoder compares with the one read, is kept (and one whose
        ASCII text the fast path may decode and write)."""
        found = self.top.root_value(SPECIFIC_CHARACTER_SET)
        if found is None:
            return False
        vr, value = found
        decision = self.decide(SPECIFIC_CHARACTER_SET)
        if decision.op not in (Op.KEEP, Op.VERBATIM) or vr != "CS":
            raise Decline("charset_changed")
        if value.rstrip(b" ") not in _ASCII_CHARSETS:
            raise Decline("charset")
        return True

    def image_attribute(
        self, tag: int, vr: str, start: int, end: int, raw_mode: bool, slot: int
    ) -> None:
        """A kept top-level attribute pixels.image_info reads: recorded, and in a raw data set
        its re-encoded form kept for the case the source has pixels (see converted)."""
        value = self.scan.data[start:end]
        if tag not in self.top.root:
            self.top.root[tag] = (vr, value)
        if not raw_mode:
            return
        cache = self.tables.image_values
        key = (tag, vr, value)
        again = cache.get(key, b"")
        if again == b"":
            try:
                again = self.keep_raw(tag, vr, start, end, False)
            except Decline:
                again = None
            if len(cache) < _MAX_CACHED_VALUES and len(value) <= _MAX_CACHED_VALUE:
                cache[key] = again
        if again != self.scan.data[start - (12 if vr.encode() in _VR_LONG else 8) : end]:
            self.pixel_fixups.append((slot, again))

    def converted(
        self, tag: int, vr: str, start: int, end: int, raw: bytes | None, slot: int
    ) -> bytes | None:
        """A kept top-level element of a raw data set that the reference path converts
        before its walk (see _CONVERTED_WITH_PIXELS): its re-encoded form, now or once the
        source turns out to have pixels."""
        if raw is None or (tag != SPECIFIC_CHARACTER_SET and tag not in _CONVERTED_WITH_PIXELS):
            return raw
        try:
            again: bytes | None = self.keep_raw(tag, vr, start, end, False)
        except Decline:
            again = None
        if tag == SPECIFIC_CHARACTER_SET:
            if again is None:
                raise Decline("charset_value")
            return again
        if again != raw:
            self.pixel_fixups.append((slot, again))
        return raw

    # -- private blocks ---------------------------------------------------------------------
    def private(
        self,
        out: list[bytes],
        tag: int,
        vr: str,
        start: int,
        length: int,
        end: int,
        raw_mode: bool,
        creators: dict[int, tuple[int, str, int, int, int]],
        kept_blocks: set[int],
    ) -> None:
        """engine._Walker._private: creators wait for their block; block elements decided."""
        elem_no = tag & 0xFFFF
        if elem_no < 0x10:
            self.count(Op.REMOVE.value)
            return
        if elem_no <= 0xFF:
            creators[elem_no] = (tag, vr, start, end, len(out))
            out.append(b"")  # the creator's slot, filled if its block keeps an element
            return
        block = elem_no >> 8
        if not self.tables.private_exact and not self.tables.safe_private:
            decision = _PRIVATE_REMOVE  # what decide_private says whatever the creator
            creator = None
        else:
            found = creators.get(block)
            creator = None
            if found is not None:
                _, creator_vr, creator_start, creator_end, _ = found
                if creator_vr not in ("LO", "SH", "CS", "UC", "LT", "ST", "UT"):
                    raise Decline("private_creator")
                creator = _plain(creator_vr, self.scan.data[creator_start:creator_end])
            decision = self.plan.decide_private(tag, creator)
        if decision.source is Source.OPTION and creator is not None:
            vrs = self.plan.safe_private_vrs(tag, creator)
            if vrs and vr != "UN" and vr not in vrs:
                decision = _SAFE_VR_MISMATCH
            elif vrs == {"SQ"} and vr == "UN":
                raise Decline("private_sequence_as_un")
        # Dataset.__setitem__ converts a private element set after its creator (and the
        # creator, to read its value): the engine's output holds both decoded, so the
        # encoder re-encodes them even in a raw data set.
        raw = raw_mode and block not in creators
        encoded = self.apply(tag, vr, start, length, end, decision, raw, False)
        if encoded is not None:
            out.append(encoded)
            kept_blocks.add(block)

    def flush_private(
        self,
        out: list[bytes],
        creators: dict[int, tuple[int, str, int, int, int]],
        kept_blocks: set[int],
    ) -> None:
        """Fill in the creators of blocks an element was kept of; the others are removed
        (and counted so, as the engine does)."""
        for elem_no, (tag, vr, start, end, slot) in creators.items():
            if elem_no in kept_blocks:
                out[slot] = self.keep_raw(tag, vr, start, end, False)  # see private()
            else:
                self.count(Op.REMOVE.value)
        creators.clear()
        kept_blocks.clear()

    # -- actions ----------------------------------------------------------------------------
    def keep_raw(self, tag: int, vr: str, start: int, end: int, raw_mode: bool) -> bytes:
        """A raw element the engine keeps, as the encoder writes it: as it is in a raw data
        set (but an empty one, which pydicom converts), else as pydicom decodes and writes it
        (an element read as UN then has the VR its data dictionary names)."""
        if not tag >> 16 & 1 and doubt(tag, vr, self.scan.data[start:end]):
            raise Decline("untrusted")  # the engine removes it, or withholds the file
        # The engine judges an element read as UN by its dictionary VR.
        real = self.un_vr(tag, end - start) if vr == "UN" and not tag >> 16 & 1 else vr
        if real in VALUE_SIZES and not length_fits(tag, real, end - start):
            raise Decline("number_length")  # the reference path refuses it
        if (
            end - start > SHORT_TEXT
            and real in TEXT_VRS
            and BAD_TEXT.search(self.scan.data, start, end)
        ):
            raise Decline("text_bytes")  # the reference path refuses it
        if raw_mode and (vr != "UN" or end > start):
            return self.scan.data[start - (12 if vr.encode() in _VR_LONG else 8) : end]
        if vr == "UN":
            vr = self.un_vr(tag, end - start)
        return _element(tag, vr, _reencode(tag, vr, self.scan.data[start:end]))

    def apply(
        self,
        tag: int,
        vr: str,
        start: int,
        length: int,
        end: int,
        decision: Decision,
        raw_mode: bool,
        scrub: bool,
    ) -> bytes | None:
        """engine._Walker.apply: the encoded output element, or None when removed."""
        op = decision.op
        if (
            not tag >> 16 & 1
            and (op is Op.KEEP or op is Op.VERBATIM or (tag in STRUCTURAL and op is not Op.EMPTY))
            and op is not Op.REMOVE
            and doubt(tag, vr, self.scan.data[start:end] if vr != "SQ" else b"")
        ):
            raise Decline("untrusted")  # the engine removes it, or withholds the file
        self.count(op.value)
        if op is Op.REMOVE:
            return None
        raw_vr = vr
        if vr == "UN":
            vr = self.un_vr(tag, length)  # engine_values._vr_of
        if op is Op.VERBATIM:
            if vr == "SQ":
                raise Decline("verbatim_sequence")
            return self.keep_raw(tag, raw_vr, start, end, raw_mode)
        if op is Op.KEEP:
            if vr != "SQ":
                return self.keep_raw(tag, raw_vr, start, end, raw_mode)
            return self.sequence(tag, start, length, scrub)
        value = self.scan.data[start:end]
        table_sourced = decision.source in (Source.BASIC, Source.OPTION)
        if table_sourced and tag in (PATIENT_ID, PATIENT_NAME) and op in (Op.EMPTY, Op.DUMMY):
            if vr not in ("LO", "SH", "PN"):
                raise Decline("patient_vr")
            return _element(tag, vr, self.top.patient_token().encode("ascii"))
        if op is Op.EMPTY:
            return _sequence(tag, []) if vr == "SQ" else _element(tag, vr, b"")
        if vr == "SQ":
            if op is Op.DUMMY:
                return self.sequence(tag, start, length, True)
            if op in (Op.UID, Op.PSEUDONYM):
                return self.sequence(tag, start, length, scrub)
            if op is Op.CLEAN:
                raise Decline("clean_sequence")
            return _sequence(tag, [])
        if op is Op.UID or (vr == "UI" and op in (Op.DUMMY, Op.PSEUDONYM, Op.CLEAN)):
            return self.uids(tag, vr, value, decision)
        if op is Op.DUMMY:
            return self.dummy(tag, vr, value)
        if op is Op.PSEUDONYM:
            return self.pseudonym(tag, vr, value)
        raise Decline(f"op_{op.value}")  # clean, shift: dates and text the engine rewrites

    def uids(self, tag: int, vr: str, value: bytes, decision: Decision) -> bytes | None:
        if vr != "UI":
            self.count("uid_on_non_ui_removed")
            return None
        out = []
        uid = self.pseudo.uid
        default = decision.source is Source.DEFAULT
        for item in _engine_values("UI", value):
            text = item.strip().rstrip("\x00")
            if default and (not text or is_registered_uid(text)):
                out.append(text)
            else:
                out.append(uid(text))
        return _element(tag, "UI", _padded("\\".join(out).encode("ascii"), b"\x00"))

    def dummy(self, tag: int, vr: str, value: bytes) -> bytes | None:
        if vr in ("LO", "SH") and self.is_identifier(tag):
            return self.pseudonym(tag, vr, value)
        dummy = _DUMMY_VALUES.get(vr)
        if dummy is not None:
            return _element(tag, vr, dummy)
        if vr in _STRING_VRS:
            return _element(tag, vr, _DUMMY_TEXT[: _MAX_LEN.get(vr, 64)])
        if vr == "AT":
            return _element(tag, vr, b"")
        raise Decline("dummy_vr")

    def un_vr(self, tag: int, length: int) -> str:
        """The VR pydicom and the engine give an element read as UN: its data dictionary's
        (UN for a tag it does not know). Private tags (which take theirs from the private
        dictionary), sequences and ambiguous VRs are declined."""
        if tag >> 16 & 1 or length >= 0xFFFF:
            raise Decline("un_value")
        vrs = self.tables.un_vrs
        found = vrs.get(tag)
        if found is None:
            try:
                found = vr_of(tag)
            except KeyError:
                found = "UN"
            if found.encode() not in _VR_INFO or found == "SQ":
                found = ""
            vrs[tag] = found
        if not found:
            raise Decline("un_value")
        return found

    def is_identifier(self, tag: int) -> bool:
        identifiers = self.tables.identifiers
        found = identifiers.get(tag)
        if found is None:
            found = keyword_of(tag).endswith(("ID", "Number", "Identifier"))
            identifiers[tag] = found
        return found

    def pseudonym(self, tag: int, vr: str, value: bytes) -> bytes | None:
        if vr in ("DA", "DT", "TM"):
            raise Decline("date_shift")
        if vr in _NUMERIC_VRS or vr not in _STRING_VRS:
            return _element(tag, vr, b"")
        values = _engine_values(vr, value)
        if tag in (PATIENT_ID, PATIENT_NAME):
            token = self.top.patient_token()
            tokens = [token for _ in values] or [token]
        else:
            tokens = [self.pseudo.token(v, "id") for v in values]
        if vr == "PN":
            tokens = ["ANON^" + t for t in tokens]
        limit = _MAX_LEN.get(vr)
        if limit:
            tokens = [t[:limit] for t in tokens]
        return _element(tag, vr, _padded("\\".join(tokens).encode("ascii")))

    def output_name(
        self, tag: int, vr: str, start: int, end: int, encoded: bytes | None
    ) -> str | None:
        """The output value of a layout attribute, as ``ds.get(keyword)`` returns it."""
        if encoded is None:
            return None
        head = 12 if vr.encode() in _VR_LONG else 8
        values = _values(vr, encoded[head:]) if vr in _STRING_VRS or vr == "UI" else None
        if values is None or len(values) != 1:
            raise Decline("layout_value")
        return values[0]
