"""Profiles, custom rule acts and the rules JSON format (DESIGN "Custom rules")."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deidfs.deid.plan import Op, Source, compile_plan
from deidfs.deid.profiles import (
    BASIC,
    BUILTIN_PROFILES,
    HIPAA,
    PIXEL,
    DateModification,
    Mask,
    Profile,
    Rect,
    Rule,
    parse_act,
    rules_from_json,
    rules_to_json,
)
from deidfs.deid.standard import Action, Option
from deidfs.errors import ProfileError


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("keep", Action.KEEP),
        ("remove", Action.REMOVE),
        ("empty", Action.EMPTY),
        ("dummy", Action.DUMMY),
        ("pseudonymize", Action.PSEUDONYMIZE),
        ("shift", Action.SHIFT),
        ("Keep", Action.KEEP),
        ("REMOVE", Action.REMOVE),
        ("K", Action.KEEP),
        ("X", Action.REMOVE),
        ("Z", Action.EMPTY),
        ("D", Action.DUMMY),
        ("C", Action.CLEAN),
        ("U", Action.UID),
        ("Z/D", Action.EMPTY_OR_DUMMY),
        ("X/Z", Action.REMOVE_OR_EMPTY),
        ("X/D", Action.REMOVE_OR_DUMMY),
        ("X/Z/D", Action.REMOVE_OR_EMPTY_OR_DUMMY),
        ("X/Z/U*", Action.REMOVE_OR_EMPTY_OR_UIDS),
        ("x/z/u*", Action.REMOVE_OR_EMPTY_OR_UIDS),
    ],
)
def test_acts(text: str, action: Action) -> None:
    assert parse_act(text) is action


@pytest.mark.parametrize("text", ["", "delete", "Y", "X/Y", "keep it", "U*"])
def test_bad_act_lists_the_choices(text: str) -> None:
    with pytest.raises(ProfileError, match="unknown act") as info:
        parse_act(text)
    assert "keep" in str(info.value)
    assert "X/Z/D" in str(info.value)


RULES = [
    {"id": "(0008,103E)", "act": "remove"},
    {"id": "(0008,103e)", "act": "keep", "note": "series names are curated here"},
    {"id": "0010,1010", "act": "K"},
    {"id": "00081030", "act": "clean"},
    {"id": "0008.0080", "act": "dummy"},
    {"id": "PatientID", "act": "pseudonymize", "note": "Überweisung: stable IDs ✓"},
    {"id": "StudyDate", "act": "shift"},
    {"id": "(0020,000D)", "act": "U"},
    {"id": "(0008,0050)", "act": "Z/D"},
]


def _distinct(rules: list[dict[str, str]]) -> list[dict[str, str]]:
    """RULES names (0008,103E) twice on purpose for the duplicate test; drop one here."""
    return [r for r in rules if r["id"] != "(0008,103e)"]


def test_load_then_save_writes_exactly_the_array() -> None:
    array = _distinct(RULES)
    text = json.dumps(array, indent=4, ensure_ascii=True)
    saved = rules_to_json(rules_from_json(text))
    assert json.loads(saved) == array
    assert saved.endswith("\n")
    # Non-ASCII notes are written as text, not escapes, and survive a second round.
    assert "Überweisung" in saved
    assert rules_to_json(rules_from_json(saved)) == saved


def test_loaded_rules_carry_tag_and_act() -> None:
    rules = rules_from_json(json.dumps(_distinct(RULES)))
    by_tag = {r.tag: r for r in rules}
    assert by_tag[0x0008103E].act is Action.REMOVE
    assert by_tag[0x00101010].act is Action.KEEP
    assert by_tag[0x00100020].act is Action.PSEUDONYMIZE
    assert by_tag[0x00100020].note.startswith("Überweisung")
    assert by_tag[0x00080020].act is Action.SHIFT
    assert by_tag[0x00080050].act is Action.EMPTY_OR_DUMMY


def test_rule_without_source_text_saves_canonical_form() -> None:
    rule = Rule(0x0008103E, Action.REMOVE)
    assert rule.to_json() == {"id": "(0008,103E)", "act": "X"}
    assert Rule.parse("SeriesDescription", "remove", "why").to_json() == {
        "id": "SeriesDescription",
        "act": "remove",
        "note": "why",
    }


def test_loading_replaces_the_profiles_rules() -> None:
    before = BASIC.derive(
        "Site",
        rules=rules_from_json('[{"id": "(0008,1030)", "act": "keep"}]'),
    )
    loaded = rules_from_json('[{"id": "(0008,103E)", "act": "keep"}]')
    after = dataclasses.replace(before, rules=loaded)
    assert after.rules == loaded
    plan = compile_plan(after)
    assert plan.decide(0x0008103E).source is Source.CUSTOM
    # The earlier rule is gone: Study Description is back to its table action.
    assert plan.decide(0x00081030).source is Source.BASIC
    assert plan.decide(0x00081030).op is Op.REMOVE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON: line 1"),
        ('{"id": "(0008,103E)", "act": "remove"}', "JSON array"),
        ("[1]", "rule #1: not an object"),
        ('[{"id": "(0008,103E)"}]', 'rule #1: "id" and "act" must be strings'),
        ('[{"id": 524350, "act": "remove"}]', 'rule #1: "id" and "act" must be strings'),
        ('[{"id": "(0008,103E)", "act": "remove", "why": "x"}]', "rule #1: unknown key(s) ['why']"),
        ('[{"id": "(0008,103E)", "act": "remove", "note": 3}]', 'rule #1: "note" must be'),
        (
            '[{"id": "(0008,103E)", "act": "keep"}, {"id": "(0008,10ZE)", "act": "keep"}]',
            "rule #2: not a DICOM tag",
        ),
        ('[{"id": "SeriesDescriptio", "act": "keep"}]', "rule #1: unknown DICOM keyword"),
        ('[{"id": "(0008,103E)", "act": "erase"}]', "rule #1: unknown act 'erase'"),
        (
            '[{"id": "(0008,103E)", "act": "keep"}, {"id": "SeriesDescription", "act": "X"}]',
            "rule #2: a second rule for (0008,103E)",
        ),
    ],
)
def test_rules_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        rules_from_json(text)
    assert message in str(info.value)


def test_profile_rejects_duplicate_rules() -> None:
    rules = (Rule.parse("(0008,103E)", "keep"), Rule.parse("0008103e", "remove"))
    with pytest.raises(ProfileError, match="two custom rules for"):
        Profile("P", rules=rules)


def test_profile_validation() -> None:
    with pytest.raises(ProfileError, match="exclude each other"):
        Profile(
            "P",
            options=frozenset(
                {
                    Option.RETAIN_LONGITUDINAL_FULL_DATES,
                    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
                }
            ),
        )
    for bad in ("", "  ", "a/b"):
        with pytest.raises(ProfileError, match="invalid profile name"):
            Profile(bad)
    with pytest.raises(ProfileError, match="max_age"):
        Profile("P", max_age=0)
    with pytest.raises(ProfileError):
        Rect(0, 0, 0, 5)
    with pytest.raises(ProfileError):
        Mask(rects=())


def test_profiles_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASIC.name = "Other"  # type: ignore[misc]


def test_builtins() -> None:
    assert set(BUILTIN_PROFILES) == {"Basic", "HIPAA", "+Pixel"}
    assert all(p.builtin for p in BUILTIN_PROFILES.values())
    assert BASIC.options == frozenset()
    assert not BASIC.rules
    assert not BASIC.disabled
    assert not any(p.accepted for p in BUILTIN_PROFILES.values())  # nothing kept on purpose
    assert HIPAA.options == {
        Option.RETAIN_PATIENT_CHARACTERISTICS,
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
    }
    assert HIPAA.date_modification is DateModification.YEAR
    assert HIPAA.max_age == 89
    assert Option.CLEAN_PIXEL_DATA in PIXEL.options
    assert PIXEL.apply_masks
    nominal = BASIC.derive("Nominal")
    assert nominal.base == "Basic"
    assert not nominal.builtin
    assert nominal.options == BASIC.options


def test_mask_matching() -> None:
    mask = Mask(rects=(Rect(0, 0, 10, 10),), modality="US", rows=480)
    assert mask.matches("us ", "ACME", "X", 480, 640)
    assert not mask.matches("CT", "ACME", "X", 480, 640)
    assert not mask.matches("US", "ACME", "X", 512, 640)
    assert not dataclasses.replace(mask, enabled=False).matches("US", "", "", 480, None)


_TAG_FORMS = st.sampled_from(
    [
        lambda t: f"({t >> 16:04X},{t & 0xFFFF:04X})",
        lambda t: f"({t >> 16:04x},{t & 0xFFFF:04x})",
        lambda t: f"{t:08X}",
        lambda t: f"{t >> 16:04X},{t & 0xFFFF:04X}",
        lambda t: f"{t >> 16:04X}.{t & 0xFFFF:04X}",
    ]
)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFFFFFF),
            _TAG_FORMS,
            st.sampled_from(["keep", "remove", "empty", "dummy", "X/Z/D", "K", "shift"]),
            st.text(max_size=20),
        ),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_rules_json_round_trip_property(
    items: list[tuple[int, object, str, str]],
) -> None:
    array = []
    for tag, form, act, note in items:
        entry = {"id": form(tag), "act": act}  # type: ignore[operator]
        if note:
            entry["note"] = note
        array.append(entry)
    rules = rules_from_json(json.dumps(array))
    assert [r.tag for r in rules] == [t for t, *_ in items]
    assert json.loads(rules_to_json(rules)) == array
