"""The top-level values of one source that the fast path needs before it walks to them.

:class:`_TopLevel` keeps the raw top-level elements the checks, the file meta and the view's
name need (:data:`~deidfs.deid.fast_wire._ROOT_TAGS`) as the walk meets them, and reads
ahead when a decision needs one it has not reached: the patient's token (by Patient ID, else
Patient's Name), the SOP Class UID and with it where the IOD places the attributes Table
E.1-1 removes (engine_context._Context.places). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from deidfs.deid.attribute_types import placements
from deidfs.deid.fast_scan import _Scanner
from deidfs.deid.fast_values import _plain
from deidfs.deid.fast_wire import (
    _ROOT_TAGS,
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_DATA,
    SOP_CLASS_UID,
    Decline,
    NeedMore,
)
from deidfs.deid.pseudonym import TOKEN_LENGTH, Pseudonymizer


class _TopLevel:
    """One source's top-level values: those seen so far, and how far the walk has come."""

    def __init__(self, scan: _Scanner, size: int, pseudo: Pseudonymizer, media_class: str) -> None:
        self.scan = scan
        self.size = size
        self.pseudo = pseudo
        #: Top level: raw values of _ROOT_TAGS seen so far, and how far the walk has come.
        self.root: dict[int, tuple[str, bytes]] = {}
        self.root_done = 0  #: every top-level tag below this has been seen
        self.top_next = 0  #: offset of the next top-level element not yet walked
        self.top_end = 0
        self.token: str | None = None
        self.media_class = media_class  #: the file meta's Media Storage SOP Class UID
        self.top_start = 0  #: offset of the data set
        self._places: Mapping[tuple[int, int], int] | None = None

    def root_value(self, tag: int) -> tuple[str, bytes] | None:
        """The raw top-level element ``tag`` of the source, scanning ahead if not yet seen."""
        if tag >= self.root_done:
            pos = self.top_next
            while pos < self.top_end:
                found, vr, start, length = self.scan.header(pos)
                if found == PIXEL_DATA or not vr:
                    break
                end = self.scan.value_end(found, vr, start, length)
                if found in _ROOT_TAGS and found not in self.root:
                    self.root[found] = (vr, self.scan.data[start:end])
                if found >= tag:
                    break
                pos = end
        return self.root.get(tag)

    def patient_token(self) -> str:
        if self.token is None:
            found = self.root_value(PATIENT_ID)
            key = _plain(found[0], found[1]) if found is not None else ""
            if not key:
                found = self.root_value(PATIENT_NAME)
                key = "name:" + (_plain(found[0], found[1]) if found is not None else "")
            self.token = self.pseudo.token(key, "patient")
            if len(self.token) != TOKEN_LENGTH:
                raise Decline("token_length")
        return self.token

    def places(self) -> Mapping[tuple[int, int], int]:
        """engine_context._Context.places: by the SOP Class UID, or the file meta's when the
        data set has none."""
        if self._places is None:
            if self.root_done > SOP_CLASS_UID:
                sop = self.root.get(SOP_CLASS_UID)
            else:
                sop = self.sop_class_ahead()
            sop_class = _plain(sop[0], sop[1]) if sop is not None else ""
            self._places = placements(sop_class or self.media_class)
        return self._places

    def sop_class_ahead(self) -> tuple[str, bytes] | None:
        """SOP Class UID (VR, value), read ahead of the walk: Instance Creation Date, which
        comes before it, is decided by the IOD."""
        data = self.scan.data
        pos = self.top_start
        previous = -1
        while True:
            if pos >= len(data):
                if len(data) < self.size:
                    raise NeedMore(min(self.size, 2 * len(data)))
                return None
            tag, vr, start, length = self.scan.header(pos)
            if tag <= previous:
                raise Decline("element_order")
            previous = tag
            if tag > SOP_CLASS_UID:
                return None
            end = self.scan.value_end(tag, vr, start, length)
            if tag == SOP_CLASS_UID:
                return vr, data[start:end]
            pos = end
