"""pydicom's warnings: sorted into bounded categories from their templates, counted, the
first of each category logged with a file token and never with pydicom's text."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest

from conftest import sample_file
from deidfs.ops.logs import (
    OTHER_CATEGORY,
    WARNING_CATEGORIES,
    LibraryWarnings,
    ThirdPartyRedactor,
    source_token,
    warning_category,
)


@pytest.fixture
def tally() -> Iterator[tuple[LibraryWarnings, io.StringIO]]:
    """A tally on the pydicom logger, and what deidfs' own log lines say meanwhile."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ThirdPartyRedactor())
    own = logging.getLogger("deidfs.ops.logs")
    own.addHandler(handler)
    saved = own.level
    own.setLevel(logging.INFO)
    t = LibraryWarnings()
    t.install()
    try:
        yield t, out
    finally:
        t.uninstall()
        own.removeHandler(handler)
        own.setLevel(saved)


def _read(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the twins of the log records counted
        ds = pydicom.dcmread(sample_file(name), stop_before_pixels=True)
        for _ in ds.iterall():
            pass


def test_real_pydicom_warnings_are_counted_by_category(
    tally: tuple[LibraryWarnings, io.StringIO],
) -> None:
    t, out = tally
    with source_token("TOKENBADVR01"):
        _read("badVR.dcm")
    with source_token("TOKENRTDOSE1"):
        _read("rtdose.dcm")
    with source_token("TOKENSCRGB01"):
        _read("SC_rgb_jpeg.dcm")
    counts = t.counts()
    assert set(counts) == {"invalid_value", "vr_encoding_mismatch"}
    assert counts["invalid_value"] >= 3  # two in badVR, one in rtdose
    assert counts["vr_encoding_mismatch"] == 1
    lines = out.getvalue().splitlines()
    # One line per category, naming the file being read when it first came.
    assert len(lines) == 2
    assert "category=invalid_value" in lines[0]
    assert "file=TOKENBADVR01;" in lines[0]
    assert "category=vr_encoding_mismatch" in lines[1]
    assert "file=TOKENSCRGB01;" in lines[1]
    text = out.getvalue()
    # pydicom's text quotes values ('1A', a UID): none of it is written.
    assert "1A" not in text
    assert "1.2.123.456" not in text
    assert "Invalid value" not in text
    assert t.summary().startswith("invalid_value ")


def test_outside_a_source_the_token_is_a_dash(tally: tuple[LibraryWarnings, io.StringIO]) -> None:
    t, out = tally
    logging.getLogger("pydicom").warning("Unknown DICOM tag (0009,0010) - setting VR to 'UN'")
    assert t.counts() == {"unknown_tag": 1}
    assert "file=-;" in out.getvalue()


def test_the_warnings_twin_of_a_counted_record_is_dropped() -> None:
    redactor = ThirdPartyRedactor()
    t = LibraryWarnings()
    message = "Invalid value for VR IS: '1A'."
    t.emit(logging.LogRecord("pydicom", logging.WARNING, "x", 1, message, None, None))
    twin = logging.LogRecord(
        "py.warnings",
        logging.WARNING,
        "x",
        1,
        "%s",
        (f"valuerep.py:1: UserWarning: {message}",),
        None,
    )
    assert redactor.filter(twin) is False
    other = logging.LogRecord(
        "py.warnings", logging.WARNING, "x", 1, "%s", ("numpy.py:1: DeprecationWarning: x",), None
    )
    assert redactor.filter(other) is True
    assert "details withheld" in other.getMessage()


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("Invalid value for VR UI: '1.2.3.4x'. Please see <...>", "invalid_value"),
        ('Value "12345678901234567" is not valid for elements with a VR of DS', "invalid_value"),
        (
            "The value length (70) exceeds the maximum length of 64 allowed for VR LO.",
            "value_too_long",
        ),
        (
            "Expected explicit VR, but found implicit VR - using implicit VR for reading",
            "vr_encoding_mismatch",
        ),
        ("Unknown VR '0x0102' assuming implicit VR encoding", "unknown_vr"),
        (
            "VR lookup failed for the raw element with tag (0011,0010) - setting VR to 'UN'",
            "unknown_vr",
        ),
        ("Expected sequence item with tag (FFFE,E000) at file position 0x1A", "bad_item"),
        (
            "End of file reached before delimiter (FFFE,E0DD) found in file /data/DOE^JOHN/x.dcm",
            "premature_end",
        ),
        ("Unknown encoding 'ISO_IR 999' - using default encoding instead", "character_set"),
        (
            "Failed to decode byte string with encodings: iso8859 - using replacement characters",
            "character_set",
        ),
        ("a message pydicom does not have", OTHER_CATEGORY),
    ],
)
def test_categories_come_from_the_template(message: str, category: str) -> None:
    assert warning_category(message) == category
    assert category in WARNING_CATEGORIES
