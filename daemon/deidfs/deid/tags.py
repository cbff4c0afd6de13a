"""Tag syntax accepted in profiles and custom rules.

Accepted forms (case-insensitive hex): ``(0008,103E)``, ``0008103E``, ``0008,103E``,
``0008.103E``, ``(0008.103E)`` and DICOM keywords such as ``SeriesDescription``.
"""

from __future__ import annotations

import re

from deidfs.deid.dictionary import keyword_for_tag, tag_for_keyword
from deidfs.errors import ProfileError

_HEX_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*[,.]?\s*([0-9A-Fa-f]{4})\s*\)?$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def parse_tag(text: str) -> int:
    """Return the 32-bit tag named by ``text``.

    Raises
    ------
    ProfileError
        When ``text`` is neither a hex tag in an accepted form nor a known DICOM keyword.
    """
    s = text.strip()
    m = _HEX_TAG.match(s)
    if m is not None:
        return (int(m.group(1), 16) << 16) | int(m.group(2), 16)
    if _KEYWORD.match(s):
        tag = tag_for_keyword(s)
        if tag is not None:
            return int(tag)
        raise ProfileError(f"unknown DICOM keyword {s!r}")
    raise ProfileError(f"not a DICOM tag: {s!r} (use (gggg,eeee), ggggeeee or a keyword)")


def format_tag(tag: int) -> str:
    """Format a tag the way PS3.15 tables print it: ``(0008,103E)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def keyword_of(tag: int) -> str:
    """The DICOM keyword of ``tag``, or ``""`` for private and unknown tags."""
    return keyword_for_tag(tag)


def is_private(tag: int) -> bool:
    """True for tags of odd groups (PS3.5 7.8), private creators included."""
    return bool((tag >> 16) & 1)


def is_private_creator(tag: int) -> bool:
    """True for ``(gggg,0010)``-``(gggg,00FF)`` in an odd group."""
    return is_private(tag) and 0x10 <= (tag & 0xFFFF) <= 0xFF
