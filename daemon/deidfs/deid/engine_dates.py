"""Dates, times and ages as the engine modifies them.

The shift of DA and DT values by the patient's days into the past (keeping their precision),
the well-formed forms of DA, DT and TM (PS3.5 6.2; anything else is emptied, never half
modified), the Modified Dates option's shift or year-only form, and the check of a
patient's age against the profile's cap. Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pydicom.dataset import Dataset

from deidfs.deid.engine_context import _Context
from deidfs.deid.engine_values import PATIENT_AGE, PATIENT_BIRTH_DATE, _plain, _raw_value
from deidfs.deid.profiles import DateModification

_AGE = re.compile(r"^(\d{3})([DWMY])$")


_DATE_DIGITS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(.*)$")


#: Well-formed DA, DT and TM values (PS3.5 6.2). Anything else is emptied by the date
#: operations, never half-modified (a shifted year in front of the original "-03-15").
_WELL_FORMED = {
    "DA": re.compile(r"^\d{8}$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
}


def _shift_date_text(text: str, days: int) -> str | None:
    """Shift the date part of a DA or DT value by ``days`` into the past, keeping precision."""
    s = text.strip().replace(".", "") if len(text.strip()) == 10 else text.strip()
    m = _DATE_DIGITS.match(s)
    if m is None:
        return None
    year, month, day, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    try:
        base = dt.date(int(year), int(month or 1), int(day or 1))
        moved = base - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    out = f"{moved.year:04d}"
    if month is not None:
        out += f"{moved.month:02d}"
    if day is not None:
        out += f"{moved.day:02d}"
    return out + rest


def _well_formed(vr: str, text: str) -> str | None:
    """``text`` in its PS3.5 form, or None; ACR-NEMA ``2001.01.31`` and ``10:11:12`` are
    read as the dates and times they are (PS3.5 6.2, notes on DA and TM)."""
    if vr == "DA" and len(text) == 10 and text[4] == text[7] == ".":
        text = text.replace(".", "")
    elif vr == "TM" and ":" in text:
        text = text.replace(":", "")
    return text if _WELL_FORMED[vr].match(text) else None


def _modify_dates(vr: str, values: list[Any], ctx: _Context, *, shift: bool) -> list[str] | None:
    """Modified Dates: shift by the patient's days, or keep only the year (HIPAA)."""
    year_only = not shift and ctx.plan.profile.date_modification is DateModification.YEAR
    out: list[str] = []
    for v in values:
        text = _well_formed(vr, str(v).strip())
        if text is None:
            return None
        if vr == "TM":
            if year_only:
                return None
            out.append(text)
            continue
        if year_only:
            if len(text) < 4 or not text[:4].isdigit():
                return None
            out.append(text[:4] + "0101" if vr == "DA" else text[:4])
            continue
        moved = _shift_date_text(text, ctx.shift_days())
        if moved is None:
            return None
        out.append(moved)
    return out


def _age_over(root: Dataset, ctx: _Context, max_age: int) -> bool:
    text = _plain(_raw_value(root, PATIENT_AGE, ctx.charset))
    m = _AGE.match(text)
    if m and m.group(2) == "Y":
        return int(m.group(1)) > max_age
    birth = _plain(_raw_value(root, PATIENT_BIRTH_DATE, ctx.charset))
    ref = ""
    for tag in (0x00080020, 0x00080023, 0x00080022):  # Study, Content, Acquisition Date
        ref = _plain(_raw_value(root, tag, ctx.charset))
        if ref:
            break
    if len(birth) >= 4 and birth[:4].isdigit() and len(ref) >= 4 and ref[:4].isdigit():
        return int(ref[:4]) - int(birth[:4]) > max_age
    return False
