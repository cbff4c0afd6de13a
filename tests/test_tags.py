"""Tag syntax of profiles and custom rules (DESIGN: every accepted form names one tag)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deidfs.deid.tags import (
    format_tag,
    is_private,
    is_private_creator,
    keyword_of,
    parse_tag,
)
from deidfs.errors import ProfileError


@pytest.mark.parametrize(
    "text",
    [
        "(0008,103E)",
        "(0008,103e)",
        "0008103E",
        "0008103e",
        "0008,103E",
        "0008.103E",
        "(0008.103E)",
        " (0008,103E) ",
        "SeriesDescription",
    ],
)
def test_every_form_names_series_description(text: str) -> None:
    assert parse_tag(text) == 0x0008103E


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "(0008,103G)",
        "0008103",
        "00081003E",
        "0008-103E",
        "0x0008103E",
        "SeriesDescriptio",
        "seriesdescription",
        "Series Description",
        "(gggg,eeee)",
        "(50xx,xxxx)",
        "1234",
    ],
)
def test_bad_tags_raise_profile_error(text: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_tag(text)
    message = str(info.value)
    assert "tag" in message or "keyword" in message


def test_one_sided_parenthesis_is_a_tolerated_slip() -> None:
    # The eight hex digits are unambiguous; rejecting the slip would only annoy the admin.
    assert parse_tag("(0008,103E") == 0x0008103E
    assert parse_tag("0008,103E)") == 0x0008103E


def test_keywords_resolve_through_the_dictionary() -> None:
    assert parse_tag("PatientName") == 0x00100010
    assert parse_tag("SOPInstanceUID") == 0x00080018
    assert keyword_of(0x00100010) == "PatientName"
    assert keyword_of(0x00191023) == ""


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_format_parse_round_trip(tag: int) -> None:
    text = format_tag(tag)
    assert text == text.upper() or "x" not in text
    assert parse_tag(text) == tag
    assert parse_tag(text.lower()) == tag
    assert parse_tag(text.strip("()").replace(",", "")) == tag
    assert parse_tag(text.strip("()").replace(",", ".")) == tag


def test_private_predicates() -> None:
    assert is_private(0x00190010)
    assert is_private_creator(0x00190010)
    assert is_private(0x00191023)
    assert not is_private_creator(0x00191023)
    assert not is_private(0x00100010)
    assert not is_private_creator(0x00080010)
    assert is_private(0x00090001)
    assert not is_private_creator(0x00090001)
