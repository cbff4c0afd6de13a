"""The checks of ``deidfs verify``: one served file against its original, the UIDs across
files, and the files of the served tree that are not served DICOM files.

A :class:`_Verifier` holds what one verification gathers (findings, the UID maps, the
values searched, the identifiers kept); :func:`deidfs.evidence.verify.verify_tree` walks
the tree and hands it each file. What is checked, and why, is told in
:mod:`deidfs.evidence.verify`.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary as _REGISTERED_UIDS  # type: ignore[attr-defined]

from deidfs.deid.attribute_types import TOP_LEVEL, placements
from deidfs.deid.element_rules import (
    ITEMS_SERVED,
    MISPLACED_GROUP,
    distrust,
    element_decision,
    item_scrub,
)
from deidfs.deid.identifiers import DirectKind, direct_kind
from deidfs.deid.plan import Decision, Op, Plan, Source, compile_plan
from deidfs.deid.profiles import BASIC, Profile
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, keyword_of
from deidfs.evidence.findings import (
    Finding,
    FindingKind,
    KeptIdentifier,
)
from deidfs.evidence.scan import (
    _DUMMIES,
    _REMOVED,
    CHUNK,
    _element,
    _implicit,
    _Needle,
    _read_header,
    _search_manifest,
    _Searcher,
    _sop_class,
    _texts,
    _uid_texts,
    _Values,
)
from deidfs.export.manifest import is_manifest_name
from deidfs.view.deflated import MAX_INFLATED
from deidfs.view.render import DEFLATED, PIXEL_TAGS

log = logging.getLogger(__name__)

MIN_PIXEL_BYTES = 8  #: shortest value searched inside pixel data
#: Attributes that define the objects references point to.
_DEFINING_TAGS = frozenset({0x00080018, 0x0020000E, 0x0020000D, 0x00200052})
#: Operations that serve an element's original value.
_KEPT_OPS = frozenset({Op.KEEP, Op.VERBATIM})


@dataclass(frozen=True, slots=True)
class _Level:
    """Where in the served data set an element is, as the engine and Basic would see it."""

    scrub: Op | None = None  #: the profile's D or C sequence around (engine ``scrub``)
    basic_scrub: Op | None = None  #: Basic's
    basic_drops: bool = False  #: Basic would not serve this level at all
    verbatim: Decision | None = None  #: a sequence kept as is around: its decision
    verbatim_source: str | None = None  #: and what keeps it, with its tag
    cause: str | None = None  #: what keeps this level though Basic drops it, with its tag
    #: where the file's IOD requires attributes, and the sequence whose items these are
    places: Mapping[tuple[int, int], int] | None = None
    parent: int = TOP_LEVEL

    def inside(self, tag: int, decision: Decision, basic: Decision, source: str) -> _Level:
        """The level of the items of the sequence ``tag``, served by ``decision``, which
        Basic decides as ``basic`` (item scrubbing as the engine's ``_sequence``)."""
        on = f"{source} on {format_tag(tag)}"
        verbatim = self.verbatim
        verbatim_source = self.verbatim_source
        if verbatim is None and decision.op is Op.VERBATIM:
            verbatim, verbatim_source = decision, on
        drops = self.basic_drops or basic.op not in ITEMS_SERVED
        cause = self.cause
        if cause is None and drops and not self.basic_drops:
            cause = verbatim_source if verbatim is not None else on
        return _Level(
            scrub=item_scrub(self.scrub, decision.op),
            basic_scrub=item_scrub(self.basic_scrub, basic.op),
            basic_drops=drops,
            verbatim=verbatim,
            verbatim_source=verbatim_source,
            cause=cause,
            places=self.places,
            parent=tag,
        )


@dataclass(frozen=True, slots=True)
class _Original:
    path: Path
    token: str
    pixel_offset: int
    pixel_length: int


class _Verifier:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.findings: set[Finding] = set()
        self.forward: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        self.reverse: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        self.definitions: dict[str, str] = {}
        self.references: list[tuple[str, str, int, str]] = []
        self.all_secret: dict[bytes, _Needle] = {}
        self.all_kept: set[bytes] = set()
        self.uids_checked = 0
        self.pixel_checked = 0
        self.pixel_skipped = 0
        profile = plan.profile
        self.pixel_rule = Option.CLEAN_PIXEL_DATA in profile.options or (
            profile.apply_masks and any(m.enabled for m in profile.masks)
        )
        #: PS3.15 Basic, which kept identifiers are measured against
        self.basic = compile_plan(BASIC)
        self._option_plans: dict[Option, Plan] = {}
        #: (tag, source) of a kept identifier -> its direct kind ("" if none), files
        self.kept: dict[tuple[int, str], tuple[str, set[str]]] = {}

    def add(self, kind: FindingKind, token: str, tag: int | None = None, reason: str = "") -> None:
        self.findings.add(Finding.of(kind, token, tag, reason))

    # -- one served file against its original ---------------------------------------------
    def check(self, served: Path, rel: PurePosixPath, orig: _Original) -> None:
        token = orig.token
        try:
            with open(orig.path, "rb") as f:
                original = _read_header(f)
        except Exception as exc:  # changed or vanished since it was rendered
            log.debug("original %s unreadable: %s", token, type(exc).__name__)
            self.add(FindingKind.UNREADABLE, token)
            return
        values = _Values(
            self.plan, implicit=_implicit(original), places=placements(_sop_class(original))
        )
        values.walk(original, top=True)
        values.walk_meta(original)
        needles = values.needles()
        for n in needles:
            self.all_secret.setdefault(n.data, n)
        self.all_kept.update(values.kept)
        everything = _Searcher(needles)
        long_only = _Searcher(n for n in needles if len(n.data) >= MIN_PIXEL_BYTES)
        for n in everything.search(str(rel).encode("utf-8", "surrogateescape")):
            self.add(FindingKind.VALUE_IN_PATH, token, n.tag)
        try:
            with open(served, "rb") as f:
                ds = _read_header(f)
                header_end = f.tell()
                size = os.fstat(f.fileno()).st_size
                ts = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
                if ts == DEFLATED:
                    self._check_deflated(f, orig, everything, token)
                else:
                    self._check_regions(f, header_end, size, orig, everything, long_only, token)
        except (OSError, ValueError, EOFError, zlib.error) as exc:
            log.debug("served file of %s unreadable: %s", token, type(exc).__name__)
            self.add(FindingKind.UNREADABLE, token)
            return
        except Exception as exc:  # pydicom raises many types on bad input
            log.debug("served file of %s unparseable: %s", token, type(exc).__name__)
            self.add(FindingKind.UNREADABLE, token)
            return
        self._structural(values, ds, token)
        self._served(ds, _Level(places=placements(_sop_class(ds))), token, implicit=_implicit(ds))
        self._pair_uids(original, ds, 0, token)

    def _check_regions(
        self,
        f: BinaryIO,
        header_end: int,
        size: int,
        orig: _Original,
        everything: _Searcher,
        long_only: _Searcher,
        token: str,
    ) -> None:
        f.seek(0)
        for n in everything.search(f.read(header_end)):
            self.add(FindingKind.VALUE_IN_HEADER, token, n.tag)
        f.seek(header_end)
        head = f.read(4)
        pixel_len = 0
        if orig.pixel_length and len(head) == 4:
            tag = int.from_bytes(head[:2], "little") << 16 | int.from_bytes(head[2:], "little")
            tag_be = int.from_bytes(head[:2], "big") << 16 | int.from_bytes(head[2:], "big")
            if tag in PIXEL_TAGS or tag_be in PIXEL_TAGS:
                pixel_len = min(orig.pixel_length, size - header_end)
        if orig.pixel_length and not pixel_len and not self.pixel_rule:
            self.pixel_checked += 1
            self.add(FindingKind.PIXEL_DATA_DIFFERS, token)  # not where the original has it
        if pixel_len:
            same = True
            if self.pixel_rule:
                self.pixel_skipped += 1
            else:
                self.pixel_checked += 1
                same = pixel_len == orig.pixel_length and self._same_pixels(f, header_end, orig)
                if not same:
                    self.add(FindingKind.PIXEL_DATA_DIFFERS, token)
            # Original pixel bytes are random-looking: only long values are meaningful
            # there. Changed pixel bytes are not the original's: everything is searched.
            searcher = long_only if same else everything
            for n in searcher.search_stream(f, header_end, pixel_len):
                self.add(FindingKind.VALUE_IN_PIXEL_DATA, token, n.tag)
        rest = header_end + pixel_len
        if rest < size:
            for n in everything.search_stream(f, rest, size - rest):
                self.add(FindingKind.VALUE_IN_HEADER, token, n.tag)

    @staticmethod
    def _same_pixels(f: BinaryIO, at: int, orig: _Original) -> bool:
        fd = os.open(orig.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < orig.pixel_length:
                want = min(CHUNK, orig.pixel_length - done)
                f.seek(at + done)
                if f.read(want) != os.pread(fd, want, orig.pixel_offset + done):
                    return False
                done += want
            return True
        finally:
            os.close(fd)

    def _check_deflated(
        self, f: BinaryIO, orig: _Original, everything: _Searcher, token: str
    ) -> None:
        # The data set is one deflate stream: search it inflated, and compare pixel data
        # element by element, since nothing is at a fixed offset.
        f.seek(0)
        data = f.read()
        body_at = 144 + int.from_bytes(data[140:144], "little")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        plain = inflater.decompress(data[body_at:], MAX_INFLATED)
        for n in everything.search(data[:body_at] + plain):
            self.add(FindingKind.VALUE_IN_HEADER, token, n.tag)
        f.seek(0)
        served = dcmread(f, force=True)
        with open(orig.path, "rb") as src:
            original = dcmread(src, force=True)
        if "PixelData" in original:
            if self.pixel_rule:
                self.pixel_skipped += 1
                return
            self.pixel_checked += 1
            if served.get("PixelData") is None or served.PixelData != original.PixelData:
                self.add(FindingKind.PIXEL_DATA_DIFFERS, token)

    def _structural(self, values: _Values, served: Dataset, token: str) -> None:
        for tag, text in values.structural:
            if text in _DUMMIES:
                continue
            elem = _element(served, tag) if tag in served else None
            if elem is None or elem.VR == "SQ":
                continue
            if "\\".join(_texts(elem)) == text:
                self.add(FindingKind.VALUE_RETAINED, token, tag)

    # -- what the served bytes are, and what the profile keeps -----------------------------
    def _served(self, ds: Dataset, level: _Level, token: str, *, implicit: bool) -> None:
        """Judge every served element by what it is, not by its tag (the engine's
        :func:`~deidfs.deid.element_rules.distrust`), and note each identifier served
        because the profile keeps what PS3.15 Basic removes or replaces."""
        creators: dict[int, str] = {}
        for key in ds.keys():
            tag = int(key)
            raw = ds.get_item(key)
            if raw is None:
                continue
            group, number = tag >> 16, tag & 0xFFFF
            if group & 1:
                if number < 0x10:
                    continue  # outside any block: the search covers it
                if number <= 0xFF:
                    elem = _element(ds, key)
                    creators[(group << 8) | number] = " ".join(_texts(elem)) if elem else ""
                    continue
                self._served_private(ds, key, level, creators, token, implicit=implicit)
                continue
            if number == 0:
                continue  # group length: a number of bytes
            if level.verbatim is not None:
                decision = level.verbatim  # served as is, with the sequence around it
            else:
                decision = element_decision(
                    self.plan, tag, raw, level.scrub, level.places, level.parent
                )
                if decision is MISPLACED_GROUP:
                    self.add(FindingKind.VALUE_UNTRUSTED, token, tag, "misplaced")
                    continue
                why = distrust(tag, decision, raw, implicit=implicit)
                if why is not None:
                    self.add(FindingKind.VALUE_UNTRUSTED, token, tag, why)
                    continue
            basic = (
                _REMOVED
                if level.basic_drops
                else element_decision(
                    self.basic, tag, raw, level.basic_scrub, level.places, level.parent
                )
            )
            elem = _element(ds, key)
            if elem is None:
                continue
            if elem.VR == "SQ":
                if decision.op not in ITEMS_SERVED:
                    continue  # items served against the profile: the search covers them
                inner = level.inside(tag, decision, basic, self._source(tag, decision))
                for item in elem.value:
                    self._served(item, inner, token, implicit=implicit)
                continue
            if decision.op not in _KEPT_OPS or basic.op in _KEPT_OPS:
                continue  # not the original value, or one Basic serves as well
            if not _texts(elem) and not (isinstance(elem.value, bytes) and elem.value):
                continue  # no value: nothing identifying is served
            source = level.cause or level.verbatim_source or self._source(tag, decision)
            kind = direct_kind(tag)
            self._note_kept(tag, source, kind.value if kind is not None else "", token)

    def _served_private(
        self,
        ds: Dataset,
        key: Any,
        level: _Level,
        creators: dict[int, str],
        token: str,
        *,
        implicit: bool,
    ) -> None:
        tag = int(key)
        creator = creators.get((tag >> 16) << 8 | (tag & 0xFFFF) >> 8)
        decision = level.verbatim or self.plan.decide_private(tag, creator)
        if decision.op not in ITEMS_SERVED:
            return  # served against the profile: the search covers it
        elem = _element(ds, key)
        if elem is None:
            return
        source = level.cause or level.verbatim_source or self._source(tag, decision)
        if elem.VR == "SQ":
            # Basic removes every private attribute: whatever is inside is kept by this.
            inner = level.inside(tag, decision, _REMOVED, source)
            for item in elem.value:
                self._served(item, inner, token, implicit=implicit)
            return
        if not _texts(elem) and not (isinstance(elem.value, bytes) and elem.value):
            return
        # Table E.3.10-1 vouches for the safe private attributes Retain Safe Private keeps;
        # a private attribute kept by a rule or left untouched may hold anything.
        vouched = decision.source is Source.OPTION and level.verbatim is None
        self._note_kept(tag, source, "" if vouched else DirectKind.UNKNOWN.value, token)

    def _note_kept(self, tag: int, source: str, direct: str, token: str) -> None:
        entry = self.kept.get((tag, source))
        if entry is None:
            entry = self.kept[(tag, source)] = (direct, set())
        entry[1].add(token)

    def _source(self, tag: int, decision: Decision) -> str:
        """What in the profile makes ``decision``: a rule, disabled, an option."""
        if decision.source is Source.DEFAULT:
            # A default that differs from Basic's: an option changed it (Retain UIDs keeps
            # the UIDs the table does not list); which one, the engine's plans say.
            for option in sorted(self.plan.options, key=lambda o: o.value):
                plan = self._option_plans.get(option)
                if plan is None:
                    plan = self._option_plans[option] = compile_plan(
                        Profile(name=f"Basic+{option.value}", options=frozenset({option}))
                    )
                if plan.decide(tag).op is decision.op:
                    return f"option {option.value}"
        return decision.describe()

    def kept_identifiers(self) -> tuple[KeptIdentifier, ...]:
        accepted = self.plan.profile.accepted
        out = [
            KeptIdentifier(
                tag=format_tag(tag),
                keyword=keyword_of(tag),
                source=source,
                files=len(files),
                direct=direct,
                accepted=tag in accepted,
            )
            for (tag, source), (direct, files) in self.kept.items()
        ]
        return tuple(sorted(out, key=KeptIdentifier.sort_key))

    def _pair_uids(self, original: Dataset, served: Dataset, depth: int, token: str) -> None:
        for key in original.keys():
            tag = int(key)
            if tag >> 16 & 1 or tag >> 16 == 0x0002 or tag not in served:
                continue
            op = self.plan.decide(tag).op
            if op is Op.VERBATIM:
                continue
            o, s = _element(original, key), _element(served, key)
            if o is None or s is None:
                continue
            if o.VR == "SQ":
                if s.VR == "SQ" and len(o.value) == len(s.value):
                    for oi, si in zip(o.value, s.value, strict=True):
                        self._pair_uids(oi, si, depth + 1, token)
                continue
            if op is Op.KEEP:
                continue
            before, after = _uid_texts(o), _uid_texts(s)
            if len(before) != len(after):
                continue
            for a, b in zip(before, after, strict=True):
                if not a or a in _REGISTERED_UIDS:
                    continue
                self.uids_checked += 1
                if a == b:
                    self.add(FindingKind.UID_NOT_REMAPPED, token, tag)
                self.forward[a].setdefault(b, (tag, token))
                self.reverse[b].setdefault(a, (tag, token))
                if depth == 0 and tag in _DEFINING_TAGS:
                    self.definitions.setdefault(a, b)
                elif depth > 0:
                    self.references.append((a, b, tag, token))

    def finish_uids(self) -> int:
        # Which variant is the wrong one is not knowable: every variant's first place is named.
        for mapped in self.forward.values():
            if len(mapped) > 1:
                for tag, token in mapped.values():
                    self.add(FindingKind.UID_INCONSISTENT, token, tag)
        for sources in self.reverse.values():
            if len(sources) > 1:
                for tag, token in sources.values():
                    self.add(FindingKind.UID_COLLISION, token, tag)
        checked = 0
        for a, b, tag, token in self.references:
            target = self.definitions.get(a)
            if target is None:
                continue
            checked += 1
            if target != b:
                self.add(FindingKind.REFERENCE_UNRESOLVED, token, tag)
        return checked

    def check_other(self, path: Path, token: str, searcher: _Searcher) -> None:
        try:
            with open(path, "rb") as f:
                if is_manifest_name(path.name):
                    found = _search_manifest(f, searcher)
                else:
                    found = searcher.search_stream(f, 0, os.fstat(f.fileno()).st_size)
        except OSError:
            self.add(FindingKind.UNREADABLE, token)
            return
        for n in found:
            self.add(FindingKind.VALUE_IN_OTHER_FILE, token, n.tag)

    def other_searcher(self) -> _Searcher:
        kept = b"\x00".join(sorted(self.all_kept))
        small = len(kept) <= 1 << 20
        # A value of one file kept in another is not secret either; beyond a size where a
        # substring test of every value gets slow, only exact equality is exempted.
        return _Searcher(
            n
            for n in self.all_secret.values()
            if n.data not in self.all_kept and not (small and n.data in kept)
        )
