"""What an export takes: the sources of a folder and the selection among them.

:func:`walk_sources` lists the files the watcher takes (no dotfile, no partial transfer, no
symbolic link). A :class:`Selection` (study, patient, accession, path) becomes a
:class:`Matcher` (:func:`make_matcher`) that tests the identifiers a view serves
(:func:`served_ids`, read from the rendered header by a small walker of its elements, without
pydicom) and its paths, so a selection by a pseudonymized value matches what the mount shows.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from deidfs.errors import NotFound
from deidfs.view.render import (
    DEFLATED,
    View,
)

#: Transfers in progress (dcm4che ``.part``, RSNA CTP ``.partial``), as the watcher skips them.
IGNORED_SUFFIXES = (".part", ".partial")


#: Bound of one selector value; a longer one cannot be an identifier or a path we serve.
MAX_SELECTOR_CHARS = 4096

STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
PATIENT_ID = 0x00100020
ACCESSION_NUMBER = 0x00080050
_SELECTOR_TAGS = {"study": STUDY_INSTANCE_UID, "patient": PATIENT_ID, "accession": ACCESSION_NUMBER}
_ID_TAGS = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID, PATIENT_ID)


def is_ignored_name(name: str) -> bool:
    """Names the watcher never takes: dotfiles and partial transfers."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def walk_sources(root: str) -> tuple[list[tuple[str, str]], int]:
    """The files the watcher takes under the directory ``root``, sorted by path.

    Skipped (and counted): dotfiles and everything in dot-directories, ``*.part`` and
    ``*.partial``, symbolic links (never followed), special files, unreadable directories.

    Returns
    -------
    tuple
        [(absolute path, path relative to ``root`` with ``/``)], and how many were skipped.
    """
    found: list[tuple[str, str]] = []
    skipped = 0
    stack = [(root, "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            skipped += 1
            continue
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            try:
                if is_ignored_name(name) or entry.is_symlink():
                    skipped += 1
                elif entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.path, f"{rel}{name}/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append((entry.path, rel + name))
                else:
                    skipped += 1
            except OSError:
                skipped += 1
        stack.extend(reversed(subdirs))
    return found, skipped


# -- identifiers and selection ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServedIds:
    """The de-identified identifiers of a view, as the mount serves them (never originals,
    unless the profile keeps them)."""

    StudyInstanceUID: str = ""
    SeriesInstanceUID: str = ""
    SOPInstanceUID: str = ""
    PatientID: str = ""


def _values(f: BinaryIO, tags: Iterable[int]) -> dict[int, str]:
    """The text of ``tags`` at the top level of the DICOM file ``f`` ("" when absent)."""
    from pydicom.filereader import read_partial  # noqa: PLC0415  (selection by value only)

    wanted = list(tags)
    last = max(wanted)
    f.seek(0)
    try:
        # Parsed only up to the last tag wanted: a fraction of a header.
        ds = read_partial(
            f, stop_when=lambda tag, vr, length: tag > last, force=True, specific_tags=wanted
        )
        out = {}
        for tag in wanted:
            elem = ds.get(tag)
            value = "" if elem is None or elem.value is None else str(elem.value)
            out[tag] = value.strip(" \x00")
        return out
    except Exception:  # pydicom raises many types; an unreadable value matches nothing
        return dict.fromkeys(wanted, "")


_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_ENCODINGS = {
    "1.2.840.10008.1.2": (True, "<"),  # implicit VR little endian
    "1.2.840.10008.1.2.1": (False, "<"),
    "1.2.840.10008.1.2.2": (False, ">"),
}


class _Malformed(Exception):
    """The header cannot be walked here (pydicom is asked instead)."""


#: Per byte order: (group, element, 32-bit length) and (group, element, VR, 16-bit length).
_HEADS = {
    e: (struct.Struct(e + "HHL").unpack_from, struct.Struct(e + "HH2sH").unpack_from)
    for e in ("<", ">")
}
_LENGTH32 = {e: struct.Struct(e + "L").unpack_from for e in ("<", ">")}


def _element(buf: bytes, pos: int, implicit: bool, e: str) -> tuple[int, int, int]:
    """(tag, value offset, length) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Malformed
    unpack32, unpack16 = _HEADS[e]
    group, elem, length = unpack32(buf, pos)
    if implicit or group == 0xFFFE:  # items and delimiters have no VR
        return group << 16 | elem, pos + 8, length
    group, elem, vr, length = unpack16(buf, pos)
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Malformed
        length = _LENGTH32[e](buf, pos + 8)[0]
        if vr == b"UN" and length == _UNDEFINED:
            raise _Malformed  # its items are implicit VR (PS3.5 6.2.2): pydicom knows
        return group << 16 | elem, pos + 12, length
    return group << 16 | elem, pos + 8, length


def _skip_items(buf: bytes, pos: int, implicit: bool, e: str, depth: int) -> int:
    """Offset past the sequence delimiter of an undefined-length sequence at ``pos``."""
    if depth > 64:
        raise _Malformed
    while True:
        tag, at, length = _element(buf, pos, True, e)
        if tag == _SEQUENCE_END:
            return at
        if tag != _ITEM:
            raise _Malformed
        if length != _UNDEFINED:
            pos = at + length
            continue
        pos = at  # an undefined-length item: its elements up to the item delimiter
        while True:
            tag, at, length = _element(buf, pos, implicit, e)
            if tag == _ITEM_END:
                pos = at
                break
            pos = (
                _skip_items(buf, at, implicit, e, depth + 1)
                if length == _UNDEFINED
                else at + length
            )


def _walk_values(buf: bytes, wanted: Iterable[int]) -> dict[int, str]:
    """The top-level values of ``wanted`` in a Part 10 header deidfs wrote, without pydicom.

    Raises
    ------
    _Malformed
        A structure or a transfer syntax this walker does not take (pydicom does).
    """
    wanted = frozenset(wanted)
    last = max(wanted)
    if buf[128:132] != b"DICM":
        raise _Malformed
    tag, at, length = _element(buf, 132, False, "<")
    if tag != 0x00020000 or length != 4:
        raise _Malformed
    start = at + 4 + struct.unpack_from("<L", buf, at)[0]
    pos, syntax = at + 4, ""
    while pos < start:
        tag, at, length = _element(buf, pos, False, "<")
        if tag == 0x00020010:
            syntax = buf[at : at + length].decode("ascii").strip(" \x00")
        pos = at + length
    if not syntax or syntax == DEFLATED:
        raise _Malformed  # one compressed stream: pydicom inflates it
    # Every other transfer syntax (the encapsulated ones too) is explicit VR little endian.
    implicit, e = _ENCODINGS.get(syntax, (False, "<"))
    out = dict.fromkeys(wanted, "")
    pos = start
    while pos < len(buf):
        tag, at, length = _element(buf, pos, implicit, e)
        if tag > last:
            break
        if length == _UNDEFINED:
            pos = _skip_items(buf, at, implicit, e, 0)
            continue
        if tag in wanted:
            raw = buf[at : at + length]
            if not raw.isascii():
                raise _Malformed  # a character set to decode: pydicom's job
            out[tag] = raw.decode("ascii").strip(" \x00")
        pos = at + length
    return out


def served_values(view: View, tags: Iterable[int]) -> dict[int, str]:
    """The text of ``tags`` (file meta or top level) in ``view``'s header ("" when absent)."""
    return _values(io.BytesIO(view.header), tags)


def served_ids(view: View) -> ServedIds:
    """The identifiers in ``view``'s header."""
    try:
        values = _walk_values(view.header, _ID_TAGS)
    except (_Malformed, struct.error, UnicodeDecodeError):
        values = _values(io.BytesIO(view.header), _ID_TAGS)
    return ServedIds(
        StudyInstanceUID=values[STUDY_INSTANCE_UID],
        SeriesInstanceUID=values[SERIES_INSTANCE_UID],
        SOPInstanceUID=values[SOP_INSTANCE_UID],
        PatientID=values[PATIENT_ID],
    )


@dataclass(frozen=True, slots=True)
class Selection:
    """Which files of a folder an export takes; all empty: the whole folder.

    Values of one kind are ORed, kinds are ANDed: ``study=(A, B), patient=(P,)`` takes the
    files of study A or B that belong to patient P. ``study``, ``patient`` and ``accession``
    match the original StudyInstanceUID, PatientID and AccessionNumber, or the de-identified
    ones the mount serves. ``path`` matches a file or a directory: relative paths against
    the path of the source in its folder or the path of its view under the mount's folder;
    absolute paths under the folder's directory or under ``<mountpoint>/<folder>``.
    """

    study: tuple[str, ...] = ()
    patient: tuple[str, ...] = ()
    accession: tuple[str, ...] = ()
    path: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """No selector at all: the whole folder."""
        return not (self.study or self.patient or self.accession or self.path)

    def kinds(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(kind, values) of every kind given."""
        for kind in ("study", "patient", "accession", "path"):
            values: tuple[str, ...] = getattr(self, kind)
            if values:
                yield kind, values


@dataclass(frozen=True, slots=True)
class PathRule:
    """A ``path`` selector resolved: ``rel`` ("." for everything) against the source path in
    its folder (``source``) and/or the view path under the mount's folder (``served``)."""

    rel: PurePosixPath
    source: bool
    served: bool

    def matches(self, source_rel: PurePosixPath, served_rel: PurePosixPath) -> bool:
        """Whether the file, or a directory above it, is the selected path."""
        if str(self.rel) == ".":
            return True
        return (self.source and _at_or_under(source_rel, self.rel)) or (
            self.served and _at_or_under(served_rel, self.rel)
        )


def _at_or_under(path: PurePosixPath, top: PurePosixPath) -> bool:
    return path == top or top in path.parents


@dataclass(frozen=True, slots=True)
class Matcher:
    """A :class:`Selection` ready to match files, in the worker processes of a scan."""

    study: tuple[str, ...]
    patient: tuple[str, ...]
    accession: tuple[str, ...]
    paths: tuple[PathRule, ...]

    @property
    def needs_values(self) -> bool:
        """Whether the identifiers in the headers are needed (not only paths)."""
        return bool(self.study or self.patient or self.accession)

    def match(
        self,
        source_rel: PurePosixPath,
        served_rel: PurePosixPath,
        original: Mapping[int, str],
        served: Mapping[int, str],
    ) -> frozenset[tuple[str, int]]:
        """The selectors, as (kind, position), that this file matches."""
        hits: set[tuple[str, int]] = set()
        for kind, tag in _SELECTOR_TAGS.items():
            mine = {original.get(tag, ""), served.get(tag, "")} - {""}
            for n, value in enumerate(getattr(self, kind)):
                if value in mine:
                    hits.add((kind, n))
        for n, rule in enumerate(self.paths):
            if rule.matches(source_rel, served_rel):
                hits.add(("path", n))
        return frozenset(hits)


def _clean_value(kind: str, n: int, value: str) -> str:
    text = value.strip(" \x00")
    if not text or len(text) > MAX_SELECTOR_CHARS or "\x00" in text:
        raise NotFound(f"--{kind} #{n + 1} is empty or not an identifier")
    return text


def make_matcher(selection: Selection, folder_root: Path, mount_root: Path) -> Matcher:
    """Resolve ``selection`` for the folder at ``folder_root`` served at ``mount_root``.

    Raises
    ------
    NotFound
        A path that is neither in the folder nor in its mount, or leaves them with ``..``;
        an empty value. Messages name the selector by position, never by value.
    """
    rules: list[PathRule] = []
    for n, text in enumerate(selection.path):
        if not text or len(text) > MAX_SELECTOR_CHARS or "\x00" in text:
            raise NotFound(f"--path #{n + 1} is empty or not a path")
        if os.path.isabs(text):
            norm = os.path.normpath(text)
            rule = None
            for base, is_source in ((folder_root, True), (mount_root, False)):
                rel = os.path.relpath(norm, base)
                if rel != ".." and not rel.startswith("../"):
                    rule = PathRule(PurePosixPath(rel), is_source, not is_source)
                    break
            if rule is None:
                raise NotFound(f"--path #{n + 1} is neither in the folder nor in its mount")
            rules.append(rule)
            continue
        rel = os.path.normpath(text)
        if rel == ".." or rel.startswith("../"):
            raise NotFound(f"--path #{n + 1} leaves the folder")
        rules.append(PathRule(PurePosixPath(rel), True, True))

    def clean(kind: str) -> tuple[str, ...]:
        values: tuple[str, ...] = getattr(selection, kind)
        return tuple(_clean_value(kind, n, v) for n, v in enumerate(values))

    return Matcher(clean("study"), clean("patient"), clean("accession"), tuple(rules))
