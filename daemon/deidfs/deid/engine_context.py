"""What the engine knows of one instance while it walks it.

:class:`_Context` holds the plan, the pseudonymizer, the instance's top-level data set and
encoding, where its IOD places the attributes Table E.1-1 removes, and the counts and notes
of the report; it derives, on first use, the patient's key and token, the date shift and the
pattern of the instance's identifying values that cleaning removes from free text
(:func:`_phi_pattern`). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from deidfs.deid.engine_values import PATIENT_ID, PATIENT_NAME, _plain, _raw_value, _values
from deidfs.deid.plan import Op, Plan
from deidfs.deid.pseudonym import Pseudonymizer


@dataclass
class _Context:
    plan: Plan
    pseudo: Pseudonymizer
    root: Dataset
    charset: str | MutableSequence[str] | None
    implicit: bool
    little: bool
    #: Where this instance's IOD requires the attributes Table E.1-1 removes (its SOP Class's
    #: :func:`~deidfs.deid.attribute_types.placements`).
    places: Mapping[tuple[int, int], int]
    counts: Counter[str] = field(default_factory=Counter)
    notes: set[str] = field(default_factory=set)
    _patient_key: str | None = None
    _phi: re.Pattern[str] | None = None
    _phi_done: bool = False

    # -- per-instance derived values, computed on first use ---------------------------------
    @property
    def patient_key(self) -> str:
        if self._patient_key is None:
            key = _plain(_raw_value(self.root, PATIENT_ID, self.charset))
            if not key:
                key = "name:" + _plain(_raw_value(self.root, PATIENT_NAME, self.charset))
            self._patient_key = key
        return self._patient_key

    @property
    def patient_token(self) -> str:
        return self.pseudo.token(self.patient_key, "patient")

    def shift_days(self) -> int:
        return self.pseudo.date_shift_days(self.patient_key)

    def phi_pattern(self) -> re.Pattern[str] | None:
        """A pattern of the identifying values of this instance, for cleaning free text."""
        if not self._phi_done:
            self._phi_done = True
            self._phi = _phi_pattern(self.root, self.plan, self.charset)
        return self._phi


def _phi_pattern(root: Dataset, plan: Plan, charset: Any) -> re.Pattern[str] | None:
    """Identifying strings of this instance: values of name, ID, date and address-like
    attributes that the plan does not keep. Used to clean free text (the C action)."""
    found: set[str] = set()
    for tag in root.keys():
        if tag >> 16 & 1 or tag >> 16 == 0x0002:
            continue
        decision = plan.decide(int(tag))
        if decision.op in (Op.KEEP, Op.VERBATIM, Op.CLEAN):
            continue  # kept, or itself being cleaned: a descriptor, not an identifier
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr not in ("PN", "LO", "SH", "DA", "LT", "ST"):
            continue
        for v in _values(_raw_value(root, int(tag), charset)):
            text = str(v).strip()
            parts = [text]
            if vr == "PN":
                parts += re.split(r"[\^=\s]+", text)
            if vr == "DA" and len(text) == 8 and text.isdigit():
                y, m, d = text[:4], text[4:6], text[6:]
                parts += [f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]
            found.update(p for p in parts if len(p) >= 3)
    if not found:
        return None
    alternatives = sorted(found, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alternatives), re.IGNORECASE)
