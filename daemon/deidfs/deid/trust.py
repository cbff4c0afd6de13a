"""Whether an element's bytes can be the attribute its tag names (PS3.5 6.2, PS3.6).

A profile decides by tag: Rows is kept, Performing Physician's Name is removed. But a tag
number is only two bytes of the file, and an attacker (or a broken writer) can put any
value under any tag: Patient's Name under Image Type, an institution under Modality, a
study description under Spatial Resolution. Kept on the tag's word, the value travels.

:func:`doubt` judges an element by what is there: in an explicit VR encoding its VR must
be one the dictionary allows for the tag; its length must hold whole values, no more of
them than the tag's VM; its characters must lie inside its VR's repertoire (CS upper case,
digits, space and underscore; DS, IS numbers; AS, DA, DT, TM, UI their forms); where the
standard enumerates the values (Patient's Sex, Burned In Annotation...) or defines a closed
set of terms (Modality), the value must be one of them. An element that fails is not the
attribute the profile meant to keep: the engine removes it, or withholds the file when the
attribute is one the IOD and the pixel data cannot do without (:data:`STRUCTURAL`).

Free-text VRs (LO, SH, PN, LT, ST, UT, UC, UR) have no repertoire to check: a profile that
keeps one keeps text, and their control-byte check lives in
:func:`deidfs.deid.dictionary.text_is_clean`.

Pure: bytes in, a reason out. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Final

from deidfs.deid.dictionary import VALUE_SIZES, entry, length_fits

__all__ = [
    "ENUMERATED",
    "REASONS",
    "STRUCTURAL",
    "ValueCheck",
    "allowed_vrs",
    "doubt",
    "value_check",
]

#: What :func:`doubt` returns, and what each means.
REASONS: Final = {
    "vr": "its VR is not one the data dictionary allows for its tag",
    "length": "its length does not hold whole values, or holds more values than its VM",
    "repertoire": "its characters are outside its VR's repertoire or form",
    "enumerated": "its value is not one of the values the standard defines for it",
}

#: Attributes a served file cannot lose: the IOD's identity and what pixel data means
#: (PS3.3 C.7.6.3, C.12.1). One that fails :func:`doubt` withholds the file.
STRUCTURAL: Final = frozenset(
    {
        0x00080005,  # Specific Character Set: how every kept text is read
        0x00080016,  # SOP Class UID
        0x00080018,  # SOP Instance UID
        0x00080060,  # Modality
        0x0020000D,  # Study Instance UID
        0x0020000E,  # Series Instance UID
        0x00280002,  # Samples per Pixel
        0x00280004,  # Photometric Interpretation
        0x00280006,  # Planar Configuration
        0x00280008,  # Number of Frames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # Bits Allocated
        0x00280101,  # Bits Stored
        0x00280102,  # High Bit
        0x00280103,  # Pixel Representation
    }
)

#: Modality's Defined Terms, current and retired (PS3.3 C.7.3.1.1.1, 2024b). The standard
#: lets an implementation extend them, but a modality is a short code: a value outside this
#: list is far likelier a misplaced name than a new modality, and Modality is structural.
_MODALITIES: Final = frozenset(
    """
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID
    GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF
    OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD
    RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL
    XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
    """.split()  # noqa: SIM905 - the list reads as the standard prints it
)

#: Attributes whose values PS3.3 enumerates (or closes, as Modality), by tag.
ENUMERATED: Final[dict[int, frozenset[str]]] = {
    0x00080060: _MODALITIES,
    0x00080068: frozenset({"FOR PRESENTATION", "FOR PROCESSING"}),  # Presentation Intent
    0x00100040: frozenset({"M", "F", "O"}),  # Patient's Sex
    0x00102203: frozenset({"ALTERED", "UNALTERED"}),  # Patient's Sex Neutered
    0x00200060: frozenset({"R", "L"}),  # Laterality
    0x00200062: frozenset({"R", "L", "U", "B"}),  # Image Laterality
    0x00280004: frozenset(
        {
            "MONOCHROME1",
            "MONOCHROME2",
            "PALETTE COLOR",
            "RGB",
            "HSV",
            "ARGB",
            "CMYK",
            "YBR_FULL",
            "YBR_FULL_422",
            "YBR_PARTIAL_422",
            "YBR_PARTIAL_420",
            "YBR_ICT",
            "YBR_RCT",
            "XYB",
        }
    ),
    0x00280301: frozenset({"YES", "NO"}),  # Burned In Annotation
    0x00280302: frozenset({"YES", "NO"}),  # Recognizable Visual Features
    0x00282110: frozenset({"00", "01"}),  # Lossy Image Compression
}

#: One value of each VR with a form (PS3.5 Table 6.2-1), padding stripped. Empty values
#: are always allowed (Type 2 attributes and empty components of a multi-valued one).
_FORMS: Final = {
    "AE": re.compile(rb"[\x20-\x5b\x5d-\x7e]{0,16}"),
    "AS": re.compile(rb"(?:\d{3}[DWMY])?"),
    "CS": re.compile(rb"[A-Z0-9 _]{0,16}"),
    "DA": re.compile(rb"(?:\d{8}|\d{4}\.\d{2}\.\d{2})?"),
    "DS": re.compile(rb" *(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)? *"),
    "DT": re.compile(
        rb"(?:\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?"
        rb"(?:[+-]\d{4})?)?"
    ),
    "IS": re.compile(rb" *(?:[+-]?\d+)? *"),
    "TM": re.compile(
        rb"(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?|\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)?"
    ),
    "UI": re.compile(rb"[0-9.]{0,64}"),
}
#: Bytes per value of the binary VRs whose values are arrays (OB: any length).
_UNITS: Final = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8, "OB": 1, "UN": 1}
_PAD: Final = b" \x00"


@cache
def allowed_vrs(tag: int) -> frozenset[str]:
    """The VRs the data dictionary allows for a public ``tag`` ("US or SS" is both); empty
    for private and unknown tags, which :func:`doubt` does not judge by VR."""
    try:
        vr = entry(tag)[0]
    except KeyError:
        return frozenset()
    return frozenset(part.strip() for part in vr.split(" or ") if part.strip())


@cache
def _max_values(tag: int) -> int | None:
    """The most values the dictionary's VM allows for ``tag``, or None (any number)."""
    try:
        vm = entry(tag)[1]
    except KeyError:
        return None
    most = vm.rpartition("-")[2]
    return int(most) if most.isdigit() else None


def _judge_vr(tag: int, vr: str | None) -> str:
    """The VR the value is judged by: the file's, or the dictionary's for implicit VR and
    UN (whose bytes are the dictionary VR's implicit little endian encoding)."""
    if vr is not None and vr != "UN":
        return vr
    allowed = allowed_vrs(tag)
    if len(allowed) == 1:
        return next(iter(allowed))
    sizes = {VALUE_SIZES.get(one) for one in allowed}
    if len(sizes) == 1 and None not in sizes:
        return min(allowed)  # "US or SS": both two bytes a value, judged by length
    return vr or "UN"  # ambiguous ("US or SS", "OB or OW"): judged by length alone below


#: A check of one value's bytes ``data[start:end]``: True when it may be kept.
ValueCheck = Callable[[bytes, int, int], bool]


@cache
def value_check(tag: int, vr: str | None) -> ValueCheck | None:
    """The check :func:`doubt` makes of a value of ``tag`` read with ``vr`` (None: implicit
    VR), once the VR itself was found allowed; None when only the VR is judged (free text,
    sequences). Remembered: the fast path calls it for every kept element."""
    judged = _judge_vr(tag, vr)
    enumerated = ENUMERATED.get(tag)
    form = _FORMS.get(judged)
    most = _max_values(tag)
    if judged in VALUE_SIZES:

        def fixed(data: bytes, start: int, end: int) -> bool:
            return length_fits(tag, judged, end - start)

        return fixed
    unit = _UNITS.get(judged)
    if unit is not None:
        if unit == 1:
            return None

        def array(data: bytes, start: int, end: int) -> bool:
            return (end - start) % unit == 0

        return array
    if form is None and enumerated is None:
        return None
    fullmatch = form.fullmatch if form is not None else None

    def text(data: bytes, start: int, end: int) -> bool:
        value = data[start:end].rstrip(_PAD)
        if not value:
            return True
        values = value.split(b"\\")
        if most is not None and len(values) > most:
            return False
        for one in values:
            if fullmatch is not None and fullmatch(one) is None:
                return False
            if (
                enumerated is not None
                and one.strip(_PAD)
                and one.strip(_PAD).decode("ascii", "replace") not in enumerated
            ):
                return False
        return True

    return text


def doubt(tag: int, vr: str | None, value: bytes) -> str | None:
    """Why ``value`` (the raw bytes of a public element ``tag`` read with ``vr``; None for
    implicit VR) cannot be the attribute the dictionary says ``tag`` is, or None when it
    can. The reasons are the keys of :data:`REASONS`.

    Private and unknown tags are judged by nothing here (the private rules have their own
    VR table); sequences by their VR alone (their items are walked).
    """
    allowed = allowed_vrs(tag)
    if not allowed:
        return None
    if vr is not None and vr != "UN" and vr not in allowed:
        return "vr"
    check = value_check(tag, vr)
    if check is None or check(value, 0, len(value)):
        return None
    judged = _judge_vr(tag, vr)
    if judged in VALUE_SIZES or judged in _UNITS:
        return "length"
    most = _max_values(tag)
    if most is not None and value.rstrip(_PAD).count(b"\\") >= most:
        return "length"
    form = _FORMS.get(judged)
    if form is not None and any(
        form.fullmatch(one) is None for one in value.rstrip(_PAD).split(b"\\")
    ):
        return "repertoire"
    return "enumerated"
