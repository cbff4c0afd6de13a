"""Reading what verify compares: served trees, original values, and a search for them.

Walks a served tree, reads a DICOM header, turns an element's values into the byte strings
searched for (text encodings, dates, person name components, binary values) and finds which
of many such strings occur in a served file or manifest, chunk by chunk. No judgement of
what should be served: that is :mod:`deidfs.evidence.verify`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary as _REGISTERED_UIDS  # type: ignore[attr-defined]

from deidfs.deid.attribute_types import TOP_LEVEL
from deidfs.deid.element_rules import distrust, element_decision
from deidfs.deid.plan import Decision, Op, Plan, Source
from deidfs.deid.profiles import DateModification
from deidfs.deid.standard import Action

log = logging.getLogger(__name__)

MIN_CHARS = 4  #: shorter values are not searched: they occur by chance
BOUNDED_BELOW = 8  #: all-digit values shorter than this must stand alone to count
#: all-digit values shorter than this (dates, numbers) must not continue a number on their
#: left: a pseudonymous UID's 39 digits hold a given 8-digit date by chance about once in
#: three million UIDs, and a search over many files and values would meet that.
LEFT_BOUNDED_BELOW = 16
MIN_BINARY_BYTES = 8  #: shortest binary value searched (unless it is printable text)
MAX_NEEDLE_BYTES = 256  #: a longer value is searched by its first bytes
CHUNK = 1 << 20
_NUMERIC_CHARS = frozenset(b"0123456789.")
_NUMERIC_TEXT = re.compile(r"^[0-9.+\- ]+$")
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "IS", "DS", "AT"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
#: Values the engine writes as dummies; an original equal to one proves nothing.
_DUMMIES = frozenset(
    {
        "ANONYMIZED",
        "000Y",
        "19000101",
        "19000101000000",
        "000000",
        "0",
        "0.0",
        "urn:deidfs:anonymized",
    }
)
#: File meta elements that carry no instance data: version, SOP class, transfer syntax, and
#: the writing software's Implementation Class UID and Version Name (the view has its own).
_META_SKIPPED = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020010, 0x00020012, 0x00020013})
_REMOVED = Decision(Op.REMOVE, Action.REMOVE, Source.PRIVATE)
#: What the engine does with an element its tag cannot be trusted to name.
_UNTRUSTED = Decision(Op.REMOVE, Action.REMOVE, Source.DEFAULT, note="untrusted")


@dataclass(frozen=True, slots=True)
class _Needle:
    data: bytes
    tag: int
    bounded: bool  #: all digits: must not be part of a longer number
    left_bounded: bool = False  #: all digits: must not continue a number on its left


class _Searcher:
    """Finds which of many byte strings occur in a buffer."""

    def __init__(self, needles: Iterable[_Needle]) -> None:
        self.needles = list(needles)
        self._by_prefix: dict[bytes, list[_Needle]] | None = None
        if len(self.needles) > 64:
            # Many needles (every value of a folder): one pass over the data, looking each
            # position's first bytes up, beats one scan of the data per needle.
            self._by_prefix = defaultdict(list)
            for n in self.needles:
                self._by_prefix[n.data[:MIN_CHARS]].append(n)

    @property
    def longest(self) -> int:
        return max((len(n.data) for n in self.needles), default=0)

    @staticmethod
    def _stands_alone(data: bytes, at: int, n: _Needle) -> bool:
        before = data[at - 1] if at > 0 else None
        if not n.bounded:
            return not (n.left_bounded and before in _NUMERIC_CHARS)
        end = at + len(n.data)
        after = data[end] if end < len(data) else None
        return before not in _NUMERIC_CHARS and after not in _NUMERIC_CHARS

    def search(self, data: bytes) -> list[_Needle]:
        if self._by_prefix is None:
            return [n for n in self.needles if self._occurs(data, n)]
        found: dict[bytes, _Needle] = {}
        index = self._by_prefix
        for at in range(len(data) - MIN_CHARS + 1):
            candidates = index.get(data[at : at + MIN_CHARS])
            if candidates is None:
                continue
            for n in candidates:
                if (
                    n.data not in found
                    and data.startswith(n.data, at)
                    and self._stands_alone(data, at, n)
                ):
                    found[n.data] = n
        return list(found.values())

    def _occurs(self, data: bytes, n: _Needle) -> bool:
        at = data.find(n.data)
        while at >= 0:
            if self._stands_alone(data, at, n):
                return True
            at = data.find(n.data, at + 1)
        return False

    def search_stream(self, f: BinaryIO, start: int, length: int) -> list[_Needle]:
        """Search ``length`` bytes of ``f`` from ``start``, chunk by chunk."""
        overlap = max(self.longest, 1)
        found: dict[bytes, _Needle] = {}
        pos, end, tail = start, start + length, b""
        while pos < end:
            f.seek(pos)
            chunk = f.read(min(CHUNK, end - pos))
            if not chunk:
                break
            for n in self.search(tail + chunk):
                found.setdefault(n.data, n)
            tail = (tail + chunk)[-overlap:]
            pos += len(chunk)
        return list(found.values())


# -- original values ------------------------------------------------------------------------
#: Manifest fields holding hashes of served bytes or of the plan: hex that holds any short
#: number by chance, and never an original value.
_MANIFEST_DIGESTS = ("sha256", "plan_digest")


def _search_manifest(f: BinaryIO, searcher: _Searcher) -> list[_Needle]:
    """Search an export manifest with its digest fields blanked.

    A 64-digit hex digest contains, sooner or later, any short number (a serial number
    ``9999``) between two letters; it proves nothing. Every other field, and any line that is
    not a JSON object, is searched as written.
    """
    found: dict[bytes, _Needle] = {}
    batch: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal size
        for n in searcher.search(b"\n".join(batch)):
            found.setdefault(n.data, n)
        batch.clear()
        size = 0

    for raw in f:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        line = raw
        if isinstance(record, dict):
            for key in _MANIFEST_DIGESTS:
                if isinstance(record.get(key), str):
                    record[key] = ""
            line = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape")
        batch.append(line)
        size += len(line)
        if size >= CHUNK:
            flush()
    flush()
    return list(found.values())


def _texts(elem: DataElement) -> list[str]:
    value: Any = elem.value
    items = list(value) if isinstance(value, list | MultiValue) else [value]
    out = []
    for v in items:
        if v is None:
            continue
        text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        text = text.strip(" \x00")
        if text:
            out.append(text)
    return out


def _encodings(text: str) -> set[bytes]:
    out = {text.encode("utf-8", "surrogateescape")}
    with contextlib.suppress(UnicodeEncodeError):
        out.add(text.encode("latin-1"))
    return out


def _element(ds: Dataset, key: Any) -> DataElement | None:
    """The element at ``key``; a value pydicom cannot decode is given as its raw bytes."""
    try:
        elem: DataElement = ds[key]
    except Exception as exc:  # pydicom raises many types on bad values
        log.debug("element %08X not decodable: %s", int(key), type(exc).__name__)
    else:
        return elem
    raw = ds.get_item(key)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        return DataElement(int(key), "UN", value)
    return None


class _Values:
    """The original values of one file, sorted into searched, kept and structurally checked."""

    def __init__(
        self,
        plan: Plan,
        *,
        implicit: bool = False,
        places: Mapping[tuple[int, int], int] | None = None,
    ) -> None:
        self.plan = plan
        self.implicit = implicit  #: the file's encoding: VRs are the dictionary's
        #: where the file's IOD requires attributes (X codes decide by it, as the engine)
        self.places = places
        self.year_only = plan.profile.date_modification is DateModification.YEAR
        self.secret: dict[bytes, _Needle] = {}
        self.kept: set[bytes] = set()
        #: top-level (tag, original text) pairs too short or numeric to search for
        self.structural: list[tuple[int, str]] = []

    # the element's value as search strings
    @staticmethod
    def _binary(elem: DataElement) -> bytes:
        """A binary (or UN) value worth searching for as is, else ``b""``."""
        raw = elem.value if isinstance(elem.value, bytes) else b""
        raw = raw.strip(b" \x00")[:MAX_NEEDLE_BYTES]
        printable = raw.isascii() and raw.decode("ascii").isprintable()
        if len(raw) < (MIN_CHARS if printable else MIN_BINARY_BYTES) or len(set(raw)) < 3:
            return b""  # short or nearly constant bytes occur anywhere by chance
        return raw

    def _candidates(self, elem: DataElement) -> list[str]:
        vr = str(elem.VR)
        if vr in _NUMERIC_VRS or vr in _BINARY_VRS or vr in ("SQ", "UN"):
            return []
        out = []
        for text in _texts(elem):
            out.append(text)
            if vr == "PN":
                out += [p.strip() for p in re.split(r"[\^=]", text)]
            elif vr == "DA" and len(text) == 8 and text.isdigit():
                out.append(f"{text[:4]}-{text[4:6]}-{text[6:]}")
        return out

    def _exempt(self, text: str, date_clean: bool) -> bool:
        """True for a value whose presence in the output would prove nothing."""
        if text in _DUMMIES or text in _REGISTERED_UIDS:
            return True
        # Year-only dates (HIPAA): a date whose year-only form is the date itself.
        return date_clean and self.year_only and (len(text) == 4 or text[4:8] == "0101")

    def _add_secret(self, elem: DataElement, tag: int, *, top: bool, date_clean: bool) -> None:
        if elem.VR in _BINARY_VRS or elem.VR == "UN":
            raw = self._binary(elem)
            if raw:
                self.secret.setdefault(raw, _Needle(raw, tag, bounded=False))
            return
        searched = False
        for text in self._candidates(elem):
            if len(text) < MIN_CHARS or self._exempt(text, date_clean):
                continue
            numeric = bool(_NUMERIC_TEXT.match(text))
            bounded = numeric and len(text) < BOUNDED_BELOW
            left = numeric and len(text) < LEFT_BOUNDED_BELOW
            for data in _encodings(text):
                needle = _Needle(data[:MAX_NEEDLE_BYTES], tag, bounded, left)
                self.secret.setdefault(needle.data, needle)
            searched = True
        if top and not searched and str(elem.VR) not in ("SQ", "UN", *_BINARY_VRS):
            text = "\\".join(_texts(elem))
            if text and not self._exempt(text, date_clean):
                self.structural.append((tag, text))

    def _add_kept(self, elem: DataElement) -> None:
        if elem.VR == "SQ":
            for item in elem.value:
                self.walk(item, inherited="keep")
            return
        if elem.VR in _BINARY_VRS or elem.VR == "UN":
            if isinstance(elem.value, bytes):
                self.kept.add(elem.value)
            return
        for text in self._candidates(elem):
            self.kept.update(_encodings(text))

    def walk(
        self,
        ds: Dataset,
        inherited: str = "",
        top: bool = False,
        scrub: Op | None = None,
        parent: int = TOP_LEVEL,
    ) -> None:
        """Sort every element of ``ds``.

        ``inherited`` says a kept or removed sequence encloses it; ``scrub`` that a D or C
        sequence does, whose text the table does not list is dummied or cleaned (see
        :mod:`deidfs.deid.engine`); ``parent`` is the tag of the sequence whose item it is.
        """
        creators: dict[int, str] = {}
        for key in ds.keys():
            tag = int(key)
            raw = ds.get_item(key)  # as read, before _element converts it
            elem = _element(ds, key)
            if elem is None or raw is None:
                continue
            group, number = tag >> 16, tag & 0xFFFF
            if inherited == "keep":
                self._add_kept(elem)
                continue
            if inherited == "secret":
                if elem.VR == "SQ":
                    for item in elem.value:
                        self.walk(item, inherited="secret")
                else:
                    self._add_secret(elem, tag, top=False, date_clean=False)
                continue
            if number == 0:
                continue  # group length
            if group & 1:
                if number < 0x10:  # outside any private block: always removed
                    self._add_secret(elem, tag, top=False, date_clean=False)
                    continue
                if number <= 0xFF:  # private creator: names a vendor block, not a person
                    creators[(group << 8) | number] = " ".join(_texts(elem))
                    continue
                creator = creators.get((group << 8) | number >> 8)
                decision = self.plan.decide_private(tag, creator)
                if decision.source is Source.OPTION and creator is not None:
                    vrs = self.plan.safe_private_vrs(tag, creator)
                    if vrs and elem.VR not in ("UN", *vrs):
                        decision = _REMOVED  # the table vouches for the VR it names only
            else:
                # The engine's own decision, and its judgement of what the bytes are: a
                # value kept by its tag's row that cannot be that attribute (a name under
                # Image Type, a description under a command element) is removed, so it is
                # searched for like any other removed value.
                decision = element_decision(self.plan, tag, raw, scrub, self.places, parent)
                if distrust(tag, decision, raw, implicit=self.implicit) is not None:
                    decision = _UNTRUSTED
            op = decision.op
            if op is Op.VERBATIM or (op is Op.KEEP and elem.VR != "SQ"):
                self._add_kept(elem)
            elif elem.VR == "SQ":
                # Kept, cleaned, dummied sequences keep their items, each attribute decided
                # by its own row; removed and emptied ones take every value inside with them.
                sub = "secret" if op in (Op.REMOVE, Op.EMPTY, Op.SHIFT) else ""
                inner = scrub
                if op in (Op.DUMMY, Op.CLEAN) and scrub is not Op.DUMMY:
                    inner = op  # D inside C scrubs harder, never softer
                for item in elem.value:
                    self.walk(item, inherited=sub, scrub=inner, parent=tag)
            elif op is Op.CLEAN and str(elem.VR) not in _DATE_VRS and str(elem.VR) != "UI":
                continue  # a cleaned descriptor keeps its non-identifying text
            elif op is Op.CLEAN and elem.VR == "TM" and not self.year_only:
                continue  # dates shift by whole days: the time of day stays as it was
            else:
                self._add_secret(elem, tag, top=top, date_clean=op is Op.CLEAN)

    def walk_meta(self, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        for key in meta.keys():
            if int(key) in _META_SKIPPED:
                continue
            elem = _element(meta, key)
            if elem is None:
                continue
            self._add_secret(elem, int(key), top=False, date_clean=False)

    def needles(self) -> list[_Needle]:
        """Secret values that no kept value of the file contains."""
        kept = b"\x00".join(sorted(self.kept))
        return [n for n in self.secret.values() if n.data not in kept]


def _implicit(ds: Dataset) -> bool:
    """Whether ``ds`` was read in an implicit VR encoding."""
    return bool(ds.original_encoding[0])


def _sop_class(ds: Dataset) -> str:
    """The SOP Class UID the engine decides by: the data set's, else the file meta's."""
    text = str(ds.get("SOPClassUID", "") or "").strip()
    meta = getattr(ds, "file_meta", None)
    if not text and meta is not None:
        text = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return text


def _read_header(f: BinaryIO) -> Dataset:
    f.seek(0)
    return dcmread(f, stop_before_pixels=True, force=True)


def _uid_texts(elem: DataElement) -> list[str]:
    return [t.rstrip("\x00").strip() for t in _texts(elem)] if elem.VR == "UI" else []


def _served_files(root: Path) -> Iterator[tuple[Path, PurePosixPath]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            yield path, PurePosixPath(path.relative_to(root).as_posix())


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False
