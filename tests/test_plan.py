"""Compiled plans: precedence, every option against the table data, stable digests."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import resources
from typing import Any

import pytest

from deidfs.deid.plan import (
    FOLLOWERS,
    TYPE1_DUMMY_TAGS,
    Op,
    Source,
    compile_plan,
    describe,
    resolve_op,
)
from deidfs.deid.profiles import BASIC, HIPAA, PIXEL, DateModification, Mask, Profile, Rect, Rule
from deidfs.deid.standard import Action, Option
from deidfs.deid.tags import parse_tag

TABLE_OPTIONS = [o for o in Option if o is not Option.CLEAN_PIXEL_DATA]


def _table() -> list[dict[str, Any]]:
    """Table E.1-1 read straight from the package data, not through deidfs.deid.standard."""
    text = resources.files("deidfs.deid").joinpath("data", "ps3.15-2026d-table-E.1-1.json")
    rows: list[dict[str, Any]] = json.loads(text.read_text(encoding="utf-8"))["rows"]
    return rows


def _exact_rows() -> list[tuple[int, dict[str, Any]]]:
    return [
        (parse_tag(r["tag"]), r)
        for r in _table()
        if "x" not in r["tag"].lower() and "gggg" not in r["tag"]
    ]


def _sample_tag(pattern: str) -> int:
    """A concrete tag matching a repeating-group pattern such as ``(60xx,3000)``."""
    return parse_tag(pattern.replace("xx", "02").replace("02xx", "0200"))


EXPECTED_OPS = {
    "X": Op.REMOVE,
    "Z": Op.EMPTY,
    "D": Op.DUMMY,
    "U": Op.UID,
    "K": Op.KEEP,
    "C": Op.CLEAN,
    "X/Z": Op.REMOVE,  # where Type 3; emptied where the IOD requires it (Decision.at)
    "X/Z/U*": Op.KEEP,
}


def _expected_op(code: str, tag: int) -> Op:
    """PS3.15 code -> operation where the attribute is Type 3: the combined codes take D for
    Type 1 attributes."""
    if code in EXPECTED_OPS:
        return EXPECTED_OPS[code]
    if tag in TYPE1_DUMMY_TAGS:
        return Op.DUMMY
    return {"Z/D": Op.EMPTY, "X/D": Op.REMOVE, "X/Z/D": Op.REMOVE}[code]


def test_basic_follows_the_basic_column() -> None:
    plan = compile_plan(BASIC)
    # Responsible Person Role, Clinical Trial Protocol Ethics Committee Name (PS3.3 1C).
    assert set(FOLLOWERS) == {0x00102298, 0x00120081}
    for tag, row in _exact_rows():
        d = plan.decide(tag)
        if tag in FOLLOWERS:
            assert (d.op, d.source) == (Op.REMOVE, Source.DEFAULT), row  # see FOLLOWERS
            continue
        assert d.source is Source.BASIC, row
        assert d.action.value == row["basic_profile"], row
        assert d.op is _expected_op(row["basic_profile"], tag), row


def test_combined_codes_keep_type1_attributes_valid() -> None:
    plan = compile_plan(BASIC)
    # Content Date is Z/D and Type 1 in SR and enhanced images: a dummy keeps them valid.
    assert plan.decide(0x00080023).op is Op.DUMMY
    # Patient ID is Z/D: a dummy (the keyed token) so viewers still group patients.
    assert plan.decide(0x00100020).op is Op.DUMMY
    # Institution Name is X/Z/D: removed where it is Type 3 (the General Equipment Module),
    # emptied where Type 2 (items of Author Identification Sequence, for one).
    institution = plan.decide(0x00080080)
    assert institution.op is Op.REMOVE
    assert institution.at(None).op is Op.REMOVE
    assert institution.at(2).op is Op.EMPTY
    assert institution.at(1).op is Op.DUMMY
    for code in ("Z/D", "X/D", "X/Z/D"):
        assert resolve_op(Action(code), 0x00080023) is Op.DUMMY


@pytest.mark.parametrize("option", TABLE_OPTIONS, ids=lambda o: o.value)
def test_option_changes_exactly_its_column(option: Option) -> None:
    basic = compile_plan(BASIC)
    plan = compile_plan(BASIC.derive("O", options=frozenset({option})))
    changed = 0
    for tag, row in _exact_rows():
        cell = row["options"].get(option.value)
        d = plan.decide(tag)
        if tag in FOLLOWERS:
            assert d == basic.decide(tag), row  # removed with its leader's value, whatever
            continue
        if cell is None:
            assert d == basic.decide(tag), row
            continue
        changed += 1
        assert d.source is Source.OPTION, row
        assert d.option is option, row
        assert d.action.value == cell, row
        assert d.op is _expected_op(cell, tag), row
        assert d != basic.decide(tag)
    for row in _table():
        if "x" in row["tag"].lower() and "gggg" not in row["tag"]:
            tag = _sample_tag(row["tag"])
            cell = row["options"].get(option.value)
            expected = cell if cell is not None else row["basic_profile"]
            assert plan.decide(tag).action.value == expected, row
    expected_count = sum(
        1 for t, r in _exact_rows() if option.value in r["options"] and t not in FOLLOWERS
    )
    assert changed == expected_count


def test_clean_pixel_data_changes_no_attribute() -> None:
    basic = compile_plan(BASIC)
    plan = compile_plan(BASIC.derive("O", options=frozenset({Option.CLEAN_PIXEL_DATA})))
    for tag, _row in _exact_rows():
        assert plan.decide(tag) == basic.decide(tag)


def test_safe_private_needs_option_creator_and_listing() -> None:
    basic = compile_plan(BASIC)
    safe = compile_plan(BASIC.derive("S", options=frozenset({Option.RETAIN_SAFE_PRIVATE})))
    listed = 0x00191023  # (0019,xx23) GEMS_ACQU_01 Table Speed, in block 0x10
    assert basic.decide_private(listed, "GEMS_ACQU_01").op is Op.REMOVE
    assert safe.decide_private(listed, "GEMS_ACQU_01").op in (Op.KEEP, Op.VERBATIM)
    assert safe.decide_private(0x00191123, "GEMS_ACQU_01 ").op in (Op.KEEP, Op.VERBATIM)
    assert safe.decide_private(listed, "OTHER_VENDOR").op is Op.REMOVE
    assert safe.decide_private(listed, None).op is Op.REMOVE
    assert safe.decide_private(0x00191022, "GEMS_ACQU_01").op is Op.REMOVE


def test_precedence_custom_disabled_option_basic_default() -> None:
    desc = 0x0008103E  # Series Description: basic X, Clean Descriptors C
    date = 0x00080020  # Study Date: basic Z, Full Dates K
    unlisted = 0x00280010  # Rows: not in the table
    options = frozenset({Option.CLEAN_DESCRIPTORS, Option.RETAIN_LONGITUDINAL_FULL_DATES})
    p = BASIC.derive(
        "P",
        options=options,
        disabled=frozenset({desc, date}),
        rules=(Rule.parse("(0008,103E)", "empty"), Rule.parse("Rows", "remove")),
    )
    plan = compile_plan(p)
    # custom > disabled
    assert plan.decide(desc).source is Source.CUSTOM
    assert plan.decide(desc).op is Op.EMPTY
    # disabled > option
    assert plan.decide(date).source is Source.DISABLED
    assert plan.decide(date).op is Op.VERBATIM
    # custom > default
    assert plan.decide(unlisted).source is Source.CUSTOM
    assert plan.decide(unlisted).op is Op.REMOVE
    # option > basic
    no_disabled = compile_plan(dataclasses.replace(p, disabled=frozenset(), rules=()))
    assert no_disabled.decide(desc).source is Source.OPTION
    assert no_disabled.decide(desc).op is Op.CLEAN
    assert no_disabled.decide(date).op is Op.KEEP
    # basic > default: Patient's Name is PN, which the default would also empty, but the
    # table decides it; Rows is not listed, so the default keeps it.
    basic = compile_plan(BASIC)
    assert basic.decide(0x00100010).source is Source.BASIC
    assert basic.decide(unlisted).source is Source.DEFAULT
    assert basic.decide(unlisted).op is Op.KEEP


def test_custom_keep_is_verbatim_and_letters_resolve() -> None:
    p = BASIC.derive(
        "P",
        rules=(
            Rule.parse("PatientName", "keep"),
            Rule.parse("PatientID", "Z/D"),
            Rule.parse("StudyDate", "shift"),
            Rule.parse("AccessionNumber", "pseudonymize"),
            Rule.parse("SeriesDescription", "dummy"),
        ),
    )
    plan = compile_plan(p)
    assert plan.decide(0x00100010).op is Op.VERBATIM
    assert plan.decide(0x00100020).op is Op.DUMMY
    assert plan.decide(0x00080020).op is Op.SHIFT
    assert plan.decide(0x00080050).op is Op.PSEUDONYM
    assert plan.decide(0x0008103E).op is Op.DUMMY
    assert all(plan.decide(r.tag).note == r.note for r in p.rules)


def test_defaults_for_unlisted_attributes() -> None:
    plan = compile_plan(BASIC)
    assert plan.decide(0x00080000).op is Op.REMOVE  # group length
    assert plan.decide(0x00280000).op is Op.REMOVE
    # Unlisted UIDs are replaced, registered ones (SOP classes) kept: see test_engine.
    assert plan.decide(0x00081150).op is Op.UID
    assert plan.decide(0x00280010).op is Op.KEEP  # Rows
    assert plan.decide(0xFFFCFFFC).op is Op.REMOVE  # Data Set Trailing Padding
    assert plan.decide(0x00091234 & 0xFFFEFFFF).op is Op.REMOVE  # unknown public tag
    assert plan.decide(0x50000010).op is Op.REMOVE  # curve group
    assert plan.decide(0x60000010).op is Op.REMOVE  # rest of an overlay group
    uids = compile_plan(BASIC.derive("U", options=frozenset({Option.RETAIN_UIDS})))
    assert uids.decide(0x00081150).op is Op.KEEP


def test_overlay_group_goes_when_overlay_data_cannot_be_kept() -> None:
    """Overlay Data is binary: Clean Graphics (C) cannot clean it, so it goes, and with it
    the rest of its overlay group (PS3.3 C.9.2: Overlay Data is Type 1 in the module)."""
    plan = compile_plan(BASIC.derive("G", options=frozenset({Option.CLEAN_GRAPHICS})))
    assert plan.decide(0x60003000).op is Op.CLEAN  # the engine removes binary C values
    assert plan.decide(0x60000010).op is Op.REMOVE  # Overlay Rows
    assert plan.decide(0x60004000).op in (Op.REMOVE, Op.CLEAN)
    kept = compile_plan(BASIC.derive("K", rules=(Rule.parse("(6000,3000)", "keep"),)))
    assert kept.decide(0x60003000).op is Op.VERBATIM


def test_describe_lists_every_row_and_custom_extras() -> None:
    p = BASIC.derive("P", rules=(Rule.parse("Rows", "remove", "no sizes"),))
    rows = list(describe(compile_plan(p)))
    # The extras: Responsible Person Role, removed with Responsible Person, and the rule.
    assert len(rows) == len(_table()) + 2
    assert rows[-2].tag == "(0010,2298)"
    assert rows[-2].decision.op is Op.REMOVE
    assert rows[-2].decision.note == "follows Responsible Person"
    assert rows[-1].tag == "(0028,0010)"
    assert rows[-1].decision.source is Source.CUSTOM
    assert rows[-1].name == "Rows"


def test_responsible_person_role_follows_responsible_person() -> None:
    kept = BASIC.derive("K", rules=(Rule.parse("ResponsiblePerson", "keep"),))
    assert compile_plan(kept).decide(0x00102298).op is Op.KEEP
    role = BASIC.derive("R", rules=(Rule.parse("ResponsiblePersonRole", "keep"),))
    assert compile_plan(role).decide(0x00102298).op is Op.VERBATIM


def _digest_variants() -> list[Profile]:
    base = BASIC.derive("Nominal")
    return [
        base,
        dataclasses.replace(base, name="Nominal2"),
        dataclasses.replace(base, options=frozenset({Option.RETAIN_UIDS})),
        dataclasses.replace(base, options=frozenset({Option.CLEAN_DESCRIPTORS})),
        dataclasses.replace(base, disabled=frozenset({0x0008103E})),
        dataclasses.replace(base, disabled=frozenset({0x00081030})),
        dataclasses.replace(base, rules=(Rule.parse("(0008,103E)", "keep"),)),
        dataclasses.replace(base, rules=(Rule.parse("(0008,103E)", "empty"),)),
        dataclasses.replace(base, rules=(Rule.parse("(0008,1030)", "keep"),)),
        dataclasses.replace(base, apply_masks=True),
        dataclasses.replace(base, masks=(Mask(rects=(Rect(0, 0, 5, 5),)),)),
        dataclasses.replace(base, masks=(Mask(rects=(Rect(0, 0, 5, 6),)),)),
        dataclasses.replace(base, date_modification=DateModification.YEAR),
        dataclasses.replace(base, max_age=89),
        dataclasses.replace(base, max_age=90),
        HIPAA,
        PIXEL,
        BASIC,
    ]


def test_digest_differs_when_any_setting_changes() -> None:
    digests = [compile_plan(p).digest for p in _digest_variants()]
    assert len(set(digests)) == len(digests)
    assert all(len(d) == 64 for d in digests)


def test_digest_ignores_what_does_not_change_output() -> None:
    base = BASIC.derive("Nominal", rules=(Rule.parse("(0008,103E)", "keep"),))
    same = [
        dataclasses.replace(base, comment="edited"),
        dataclasses.replace(base, rules=(Rule.parse("SeriesDescription", "K", "a note"),)),
    ]
    for p in same:
        assert compile_plan(p).digest == compile_plan(base).digest


def test_digest_ignores_rule_order() -> None:
    a = Rule.parse("(0008,103E)", "keep")
    b = Rule.parse("(0008,1030)", "remove")
    one = compile_plan(BASIC.derive("N", rules=(a, b))).digest
    two = compile_plan(BASIC.derive("N", rules=(b, a))).digest
    assert one == two


def test_digest_is_stable_across_processes() -> None:
    code = (
        "from deidfs.deid.plan import compile_plan\n"
        "from deidfs.deid.profiles import BUILTIN_PROFILES\n"
        "for n in sorted(BUILTIN_PROFILES):\n"
        "    print(n, compile_plan(BUILTIN_PROFILES[n]).digest)\n"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        ).stdout
        for seed in ("0", "1", "random")
    }
    assert len(outs) == 1
    here = "".join(
        f"{n} {compile_plan(p).digest}\n"
        for n, p in sorted({p.name: p for p in (BASIC, HIPAA, PIXEL)}.items())
    )
    assert outs == {here}
