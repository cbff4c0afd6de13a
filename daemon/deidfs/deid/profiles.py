"""Confidentiality profiles: immutable settings, built-ins, custom rules and their JSON form.

A profile is what an admin edits: options (PS3.15 E.3), attributes it leaves untouched
(``disabled``), custom per-tag rules, pixel masks, and the identifiers it serves on purpose
(``accepted``). :func:`deidfs.deid.plan.compile_plan`
turns it into a :class:`~deidfs.deid.plan.Plan` with a stable digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from deidfs.deid.standard import Action, Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.errors import ProfileError

#: Custom rule acts in words, and the PS3.15 letters they stand for.
ACT_WORDS: dict[str, Action] = {
    "keep": Action.KEEP,
    "remove": Action.REMOVE,
    "empty": Action.EMPTY,
    "dummy": Action.DUMMY,
    "clean": Action.CLEAN,
    "pseudonymize": Action.PSEUDONYMIZE,
    "pseudonymise": Action.PSEUDONYMIZE,
    "shift": Action.SHIFT,
}


def parse_act(text: str) -> Action:
    """Parse a rule act: a word of :data:`ACT_WORDS` or a PS3.15 action code (``X``, ``Z/D``)."""
    s = text.strip()
    word = ACT_WORDS.get(s.lower())
    if word is not None:
        return word
    try:
        return Action(s.upper())
    except ValueError:
        pass
    allowed = ", ".join([*ACT_WORDS, *(a.value for a in Action if a.value.isupper())])
    raise ProfileError(f"unknown act {s!r} (one of: {allowed})")


class DateModification(Enum):
    """How Retain Longitudinal Temporal Information with Modified Dates modifies dates."""

    SHIFT = "shift"  #: shift by a keyed per-patient number of days; intervals survive
    #: keep the year only (HIPAA Safe Harbor); times of day are emptied, or midnight where the
    #: Basic Profile gives a dummy (Content Time, Time)
    YEAR = "year"


@dataclass(frozen=True, slots=True)
class Rule:
    """A custom per-tag rule: ``{"id": "(0008,103E)", "act": "remove", "note": "..."}``."""

    tag: int
    act: Action
    note: str = ""
    id_text: str = ""  #: the tag as the admin wrote it, written back unchanged
    act_text: str = ""  #: the act as the admin wrote it

    @classmethod
    def parse(cls, id_text: str, act_text: str, note: str = "") -> Rule:
        return cls(parse_tag(id_text), parse_act(act_text), note, id_text, act_text)

    def to_json(self) -> dict[str, str]:
        out = {"id": self.id_text or format_tag(self.tag), "act": self.act_text or self.act.value}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class Rect:
    """A mask rectangle in pixels, from the top-left corner of the frame."""

    left: int
    top: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if min(self.left, self.top) < 0 or min(self.width, self.height) <= 0:
            raise ProfileError("mask rectangle needs left, top >= 0 and width, height > 0")


@dataclass(frozen=True, slots=True)
class Mask:
    """A confidentiality mask: which images it fits, and the rectangles to black out."""

    rects: tuple[Rect, ...]
    modality: str | None = None
    manufacturer: str | None = None
    model: str | None = None  #: Manufacturer's Model Name
    rows: int | None = None
    columns: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.rects:
            raise ProfileError("a mask needs at least one rectangle")

    def matches(
        self,
        modality: str,
        manufacturer: str,
        model: str,
        rows: int | None,
        columns: int | None,
    ) -> bool:
        """True when every criterion the mask sets equals the image's (case-insensitive text)."""

        def same(want: str | None, have: str) -> bool:
            return want is None or want.strip().casefold() == have.strip().casefold()

        return (
            self.enabled
            and same(self.modality, modality)
            and same(self.manufacturer, manufacturer)
            and same(self.model, model)
            and (self.rows is None or self.rows == rows)
            and (self.columns is None or self.columns == columns)
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """An immutable confidentiality profile.

    Precedence when compiled: custom rule > disabled > option column > basic column >
    default for attributes Table E.1-1 does not list.
    """

    name: str
    base: str | None = None
    comment: str = ""
    enabled: bool = True
    apply_masks: bool = False
    options: frozenset[Option] = frozenset()
    disabled: frozenset[int] = frozenset()
    rules: tuple[Rule, ...] = ()
    masks: tuple[Mask, ...] = ()
    date_modification: DateModification = DateModification.SHIFT
    max_age: int | None = None  #: ages above are capped, birth dates of such patients emptied
    #: Identifiers this profile serves on purpose (a rule, option or disabled attribute keeps
    #: what PS3.15 Basic removes): ``deidfs verify`` lists them as accepted instead of failing.
    #: Changes nothing that is served, so it is not part of the plan digest.
    accepted: frozenset[int] = frozenset()
    builtin: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip() or "/" in self.name:
            raise ProfileError(f"invalid profile name {self.name!r}")
        if {
            Option.RETAIN_LONGITUDINAL_FULL_DATES,
            Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        } <= self.options:
            raise ProfileError(
                f"profile {self.name!r}: retain_longitudinal_full_dates and "
                "retain_longitudinal_modified_dates exclude each other"
            )
        seen: set[int] = set()
        for rule in self.rules:
            if rule.tag in seen:
                raise ProfileError(
                    f"profile {self.name!r}: two custom rules for {format_tag(rule.tag)}"
                )
            seen.add(rule.tag)
        if self.max_age is not None and not 0 < self.max_age < 150:
            raise ProfileError(f"profile {self.name!r}: max_age must be between 1 and 149")

    def derive(self, name: str, **changes: Any) -> Profile:
        """A new, editable profile based on this one."""
        return replace(self, name=name, base=self.name, builtin=False, **changes)


BASIC = Profile(
    name="Basic",
    comment="PS3.15 Basic Application Level Confidentiality Profile, no options",
    builtin=True,
)
HIPAA = Profile(
    name="HIPAA",
    base="Basic",
    comment=(
        "HIPAA Safe Harbor: Basic, patient characteristics kept, dates reduced to the year "
        "(times of day emptied, or midnight where required), ages over 89 shown as 090Y "
        "with birth dates emptied"
    ),
    options=frozenset(
        {Option.RETAIN_PATIENT_CHARACTERISTICS, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}
    ),
    date_modification=DateModification.YEAR,
    max_age=89,
    builtin=True,
)
PIXEL = Profile(
    name="+Pixel",
    base="Basic",
    comment="Basic plus Clean Pixel Data and confidentiality masks",
    options=frozenset({Option.CLEAN_PIXEL_DATA}),
    apply_masks=True,
    builtin=True,
)

BUILTIN_PROFILES: dict[str, Profile] = {p.name: p for p in (BASIC, HIPAA, PIXEL)}


def rules_from_json(text: str) -> tuple[Rule, ...]:
    """Parse the custom rules JSON: an array of ``{"id", "act", "note"?}`` objects."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"rules file is not JSON: line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise ProfileError('rules file must be a JSON array of {"id": ..., "act": ...} objects')
    rules = []
    first: dict[int, int] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ProfileError(f"rule #{i + 1}: not an object")
        unknown = set(item) - {"id", "act", "note"}
        if unknown:
            raise ProfileError(f"rule #{i + 1}: unknown key(s) {sorted(unknown)}")
        if not isinstance(item.get("id"), str) or not isinstance(item.get("act"), str):
            raise ProfileError(f'rule #{i + 1}: "id" and "act" must be strings')
        note = item.get("note", "")
        if not isinstance(note, str):
            raise ProfileError(f'rule #{i + 1}: "note" must be a string')
        try:
            rule = Rule.parse(item["id"], item["act"], note)
        except ProfileError as exc:
            raise ProfileError(f"rule #{i + 1}: {exc}") from exc
        if rule.tag in first:
            raise ProfileError(
                f"rule #{i + 1}: a second rule for {format_tag(rule.tag)} "
                f"(first: rule #{first[rule.tag]})"
            )
        first[rule.tag] = i + 1
        rules.append(rule)
    return tuple(rules)


def rules_to_json(rules: tuple[Rule, ...]) -> str:
    """Serialize rules as the JSON array :func:`rules_from_json` reads, ending in a newline."""
    return json.dumps([r.to_json() for r in rules], indent=2, ensure_ascii=False) + "\n"
