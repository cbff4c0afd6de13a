"""Which attributes are direct identifiers: what names a person, a record or a device.

A profile may keep, by a custom rule, an option or a disabled attribute, something PS3.15
Basic removes or replaces. Some of those are descriptions (Device Description, Patient's
Weight); others point at one patient, one record or one machine by themselves: names, IDs,
dates finer than a year, addresses, telephone numbers, account and serial numbers, UIDs
(the HIPAA Safe Harbor list, 45 CFR 164.514(b)(2), read for DICOM). ``deidfs verify`` fails
on a kept direct identifier unless the profile lists it as ``accepted``.

Judged from the data dictionary (VR and keyword), never from a value. Pure; no I/O.
"""

from __future__ import annotations

import re
from enum import Enum
from functools import cache

from deidfs.deid.dictionary import entry
from deidfs.deid.standard import e1_1_rows
from deidfs.deid.tags import keyword_of

__all__ = ["DirectKind", "direct_kind"]


class DirectKind(Enum):
    """What kind of direct identifier an attribute is."""

    NAME = "name"
    ID = "id"
    DATE = "date"
    ADDRESS = "address"
    PHONE = "phone"
    ACCOUNT = "account"
    SERIAL = "serial number"
    UID = "uid"
    #: a private attribute, or one neither the data dictionary nor Table E.1-1 names:
    #: nothing says what it holds, so it may hold anything
    UNKNOWN = "unknown"


_PHONE = ("Telephone", "Telecom")
_ID_ENDINGS = ("ID", "IDs", "Identifier", "Identifiers", "Number", "Numbers", "Locator")


@cache
def _table_keywords() -> dict[int, str]:
    """Keywords made of the names of Table E.1-1's exact rows, for attributes newer than
    the data dictionary (``Sex Parameters for Clinical Use Category Sequence``)."""
    return {
        row.pattern.value: re.sub(r"[^A-Za-z0-9]", "", row.name.title())
        for row in e1_1_rows()
        if row.pattern is not None and row.pattern.is_exact
    }


def direct_kind(tag: int) -> DirectKind | None:
    """The kind of direct identifier the attribute ``tag`` is, or None.

    UIDs (VR UI) and dates (DA, DT: finer than a year by their form) by VR; names (PN, or a
    keyword ending in Name), telephone numbers, addresses, account and serial numbers, IDs
    (keywords ending in ID, Identifier, Number; not Type Of ...) by keyword. An attribute
    the dictionary does not know is judged by its Table E.1-1 name; a private one, or one
    neither names, is :attr:`DirectKind.UNKNOWN` (callers decide: Table E.3.10-1 vouches
    for some).
    """
    if tag >> 16 & 1:
        return DirectKind.UNKNOWN
    try:
        vrs = {part.strip() for part in entry(tag)[0].split(" or ")}
        keyword = keyword_of(tag)
    except KeyError:
        vrs = set()
        keyword = _table_keywords().get(tag, "")
        if not keyword:
            return DirectKind.UNKNOWN
    if "UI" in vrs or keyword.endswith("UID"):
        return DirectKind.UID
    if "PN" in vrs or keyword.endswith(("Name", "Names")):
        return DirectKind.NAME
    if any(word in keyword for word in _PHONE):
        return DirectKind.PHONE
    if "Address" in keyword:
        return DirectKind.ADDRESS
    if "Account" in keyword:
        return DirectKind.ACCOUNT
    if "SerialNumber" in keyword:
        return DirectKind.SERIAL
    if keyword.endswith(_ID_ENDINGS) and not keyword.startswith("TypeOf"):
        return DirectKind.ID  # Type of Patient ID is a code (TEXT, RFID...), not an ID
    if vrs & {"DA", "DT"} or (not vrs and keyword.endswith(("Date", "DateTime"))):
        return DirectKind.DATE
    return None
