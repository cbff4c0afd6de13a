"""Compile a profile into a plan: the decision for every tag, with where it came from.

Precedence (DESIGN): custom rule > disabled > option column > basic column > default.
When several enabled options name an action for one attribute, the more protective one wins
(C over K), so turning an option on never reveals what another option cleans.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache

from deidfs.deid import attribute_types
from deidfs.deid.dictionary import name_of, vr_of
from deidfs.deid.profiles import Profile
from deidfs.deid.standard import (
    Action,
    Option,
    StandardRow,
    TagPattern,
    e1_1_rows,
    safe_private_rows,
    table_digest_source,
)
from deidfs.deid.tags import format_tag, keyword_of

#: Bumped whenever the engine's output for the same input, plan and key changes, so
#: persisted indexes keyed by the plan digest are rebuilt.
ENGINE_VERSION = "4"


class Op(Enum):
    """What the engine does to one element."""

    KEEP = "keep"  #: keep; sequences are kept and the plan is applied inside their items
    VERBATIM = "verbatim"  #: keep exactly as is, sequences included (custom keep, disabled)
    REMOVE = "remove"
    EMPTY = "empty"
    DUMMY = "dummy"
    PSEUDONYM = "pseudonymize"
    UID = "uid"
    CLEAN = "clean"
    SHIFT = "shift"


class Source(Enum):
    """Where a decision comes from, as ``describe-profile`` prints it."""

    CUSTOM = "custom rule"
    DISABLED = "disabled"
    OPTION = "option"
    BASIC = "basic profile"
    GROUP = "group rule"
    PRIVATE = "private rule"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    """The resolved action for an attribute."""

    op: Op
    action: Action
    source: Source
    option: Option | None = None
    note: str = ""
    #: The operation where the instance's IOD makes the attribute Type 1/1C, or Type 2/2C,
    #: at the place it occurs (:mod:`deidfs.deid.attribute_types`); ``op`` applies elsewhere.
    #: None: ``op`` everywhere.
    if_type1: Op | None = None
    if_type2: Op | None = None

    @property
    def by_type(self) -> bool:
        """Whether the operation depends on where the attribute occurs (see :meth:`at`)."""
        return self.if_type1 is not None or self.if_type2 is not None

    def at(self, level: int | None) -> Decision:
        """This decision where the attribute is Type 1/1C (``level`` 1), Type 2/2C (2), or
        Type 3 or not in the IOD (None)."""
        op = self.if_type1 if level == 1 else self.if_type2 if level == 2 else None
        return Decision(op or self.op, self.action, self.source, self.option, self.note)

    def describe(self) -> str:
        where = self.source.value
        if self.option is not None:
            where = f"option {self.option.value}"
        return where


#: Attributes among the combined-code rows (Z/D, X/D, X/Z/D) that are Type 1 in a commonly
#: served IOD, so removing or emptying them would break it (PS3.3: Content Date/Time in SR
#: Document General and Enhanced images, Acquisition DateTime in Frame Content, Device
#: Serial Number in Enhanced General Equipment, Observation DateTime in SR content items).
#: Patient ID is here because DESIGN asks for a keyed dummy so viewers still group patients.
TYPE1_DUMMY_TAGS = frozenset(
    {
        0x00080023,  # Content Date
        0x00080033,  # Content Time
        0x0008002A,  # Acquisition DateTime
        0x00181000,  # Device Serial Number
        0x0040A032,  # Observation DateTime
        0x00100020,  # Patient ID
        # X/D rows that are Type 2 in the RT IODs (RT General Plan, RT General Treatment
        # Record, RT Treatment Summary Record): X would break them and Z is not allowed.
        0x300A0006,  # RT Plan Date
        0x300A0007,  # RT Plan Time
        0x30080250,  # Treatment Date
        0x30080251,  # Treatment Time
        0x30080054,  # First Treatment Date
        0x30080056,  # Most Recent Treatment Date
    }
)

_DIRECT_OPS = {
    Action.KEEP: Op.KEEP,
    Action.REMOVE: Op.REMOVE,
    Action.EMPTY: Op.EMPTY,
    Action.DUMMY: Op.DUMMY,
    Action.CLEAN: Op.CLEAN,
    Action.UID: Op.UID,
    Action.PSEUDONYMIZE: Op.PSEUDONYM,
    Action.SHIFT: Op.SHIFT,
    # X/Z in a custom rule: emptied. Table rows decide by Type (_table_decision).
    Action.REMOVE_OR_EMPTY: Op.EMPTY,
    # X/Z/U*: keep the sequence and replace the UIDs in its items (their own rows are U),
    # so references still resolve inside the de-identified set.
    Action.REMOVE_OR_EMPTY_OR_UIDS: Op.KEEP,
}


def resolve_op(action: Action, tag: int) -> Op:
    """The concrete operation for a PS3.15 action code on ``tag`` (see :data:`TYPE1_DUMMY_TAGS`)."""
    op = _DIRECT_OPS.get(action)
    if op is not None:
        return op
    type1 = tag in TYPE1_DUMMY_TAGS
    if action is Action.EMPTY_OR_DUMMY:
        return Op.DUMMY if type1 else Op.EMPTY
    if action is Action.REMOVE_OR_DUMMY:
        return Op.DUMMY if type1 else Op.REMOVE
    if action is Action.REMOVE_OR_EMPTY_OR_DUMMY:
        return Op.DUMMY if type1 else Op.EMPTY
    raise AssertionError(action)  # pragma: no cover - every Action is handled above


@cache
def basic_dummies() -> frozenset[int]:
    """Attributes the Basic Profile gives a dummy value (D, or a combined code that resolves
    to D): an instance needs a value there (the engine keeps one where an option changes
    the value, as year-only dates do times of day)."""
    return frozenset(
        row.pattern.value
        for row in e1_1_rows()
        if row.pattern is not None
        and row.pattern.is_exact
        and resolve_op(row.basic, row.pattern.value) is Op.DUMMY
    )


_PROTECTIVE_ORDER = {Action.KEEP: 0, Action.CLEAN: 1}
_BY_TYPE_NOTES = {
    Action.REMOVE: "emptied where its IOD makes it Type 2",
    Action.REMOVE_OR_EMPTY: "emptied where its IOD requires it, else removed",
    Action.REMOVE_OR_EMPTY_OR_DUMMY: "dummy where Type 1, emptied where Type 2, else removed",
    Action.REMOVE_OR_DUMMY: "dummy where its IOD requires it, else removed",
}


def _table_decision(action: Action, tag: int, source: Source, option: Option | None) -> Decision:
    """A Table E.1-1 cell as a decision. X, X/Z, X/Z/D and X/D remove an attribute where it
    is Type 3, and take the least destructive action the code allows where the instance's
    IOD requires it (PS3.15 E.1.1; PS3.5 7.4): Z for Type 2/2C, D (or Z where D is not
    allowed) for Type 1/1C. A sequence is never emptied where it is Type 3 (zero items are
    not a Type 3 value); D on a sequence keeps its items, de-identified (the engine)."""
    op = resolve_op(action, tag)
    if action is Action.REMOVE_OR_EMPTY or (
        action is Action.REMOVE_OR_EMPTY_OR_DUMMY and op is Op.EMPTY
    ):
        op = Op.REMOVE
    if op is not Op.REMOVE or tag not in attribute_types.listed_tags():
        return Decision(op, action, source, option)
    type1: Op | None = None
    type2: Op | None = None
    if action is Action.REMOVE:
        type2 = Op.EMPTY  # Z keeps a Type 2/2C attribute valid and reveals no more than X
    elif action is Action.REMOVE_OR_EMPTY:
        type1 = type2 = Op.EMPTY
    elif action is Action.REMOVE_OR_EMPTY_OR_DUMMY:
        type1, type2 = Op.DUMMY, Op.EMPTY
    elif action is Action.REMOVE_OR_DUMMY:
        type1 = type2 = Op.DUMMY
    return Decision(op, action, source, option, _BY_TYPE_NOTES[action], type1, type2)


def _row_decision(row: StandardRow, tag: int, options: frozenset[Option]) -> Decision:
    chosen: tuple[Option, Action] | None = None
    for opt, act in row.options:
        if opt not in options:
            continue
        if chosen is None or _PROTECTIVE_ORDER.get(act, 2) > _PROTECTIVE_ORDER.get(chosen[1], 2):
            chosen = (opt, act)
    if chosen is not None:
        return _table_decision(chosen[1], tag, Source.OPTION, chosen[0])
    return _table_decision(row.basic, tag, Source.BASIC, None)


#: Type 1C attributes whose condition is another attribute's value (follower -> (leader,
#: note)): removed when the plan takes the leader's value away, or the instance would be
#: invalid (dciodvfy: "present when condition unsatisfied"). This comes before the table's
#: own action and its options (a D or K would keep the attribute where it may not be);
#: custom rules and disabled entries still win.
FOLLOWERS: Mapping[int, tuple[int, str]] = {
    # PS3.3 C.7.1.1 Patient Module: Responsible Person Role is required if, and only if,
    # Responsible Person is present and has a value.
    0x00102298: (0x00102297, "follows Responsible Person"),
    # PS3.3 C.7.1.3 Clinical Trial Subject Module: Clinical Trial Protocol Ethics Committee
    # Name is required if Clinical Trial Protocol Ethics Committee Approval Number is present.
    0x00120081: (0x00120082, "follows Clinical Trial Protocol Ethics Committee Approval Number"),
}

_REMOVE_GROUP_LENGTH = Decision(Op.REMOVE, Action.REMOVE, Source.DEFAULT, note="group length")
_REMOVE_UNKNOWN = Decision(
    Op.REMOVE, Action.REMOVE, Source.DEFAULT, note="not in the data dictionary"
)
_REMOVE_PADDING = Decision(
    Op.REMOVE, Action.REMOVE, Source.DEFAULT, note="padding and signatures are not served"
)
#: File meta elements (group 0002) found inside a data set, where a damaged file meta group
#: leaves them: the engine builds the file meta group anew, so none is carried from a source.
_REMOVE_FILE_META = Decision(
    Op.REMOVE, Action.REMOVE, Source.DEFAULT, note="file meta elements are never carried"
)
_KEEP_DEFAULT = Decision(Op.KEEP, Action.KEEP, Source.DEFAULT)
_UID_DEFAULT = Decision(
    Op.UID, Action.UID, Source.DEFAULT, note="instance UIDs the table does not list"
)
_EMPTY_PERSON = Decision(
    Op.EMPTY, Action.EMPTY, Source.DEFAULT, note="person names the table does not list"
)
_PRIVATE_REMOVE = Decision(Op.REMOVE, Action.REMOVE, Source.PRIVATE)
#: Kept (a listed private sequence is kept with the plan applied inside its items, like any
#: kept sequence: being listed says what the element means, not what its items may hold).
_PRIVATE_SAFE = Decision(
    Op.KEEP, Action.CLEAN, Source.OPTION, Option.RETAIN_SAFE_PRIVATE, "Table E.3.10-1"
)

#: Data Set Trailing Padding and Digital Signatures: never carried into a view.
_ALWAYS_REMOVED = frozenset({0xFFFCFFFC, 0xFFFAFFFA})


@dataclass(frozen=True)
class Plan:
    """A compiled profile. Pure data; :meth:`decide` is a few dictionary lookups."""

    profile: Profile
    digest: str
    exact: Mapping[int, Decision]
    patterns: tuple[tuple[TagPattern, Decision], ...]
    #: (group, element low byte, creator) -> the VR(s) Table E.3.10-1 lists, e.g. "OW/OB"
    safe_private: Mapping[tuple[int, int, str], str]

    @property
    def options(self) -> frozenset[Option]:
        return self.profile.options

    def decide(self, tag: int) -> Decision:
        """The decision for a public (even group) tag. Private tags: :meth:`decide_private`."""
        d = self.exact.get(tag)
        if d is not None:
            return d
        for pattern, decision in self.patterns:
            if pattern.matches(tag):
                return decision
        if tag & 0xFFFF == 0:
            return _REMOVE_GROUP_LENGTH
        if tag in _ALWAYS_REMOVED:
            return _REMOVE_PADDING
        if tag >> 16 == 0x0002:
            return _REMOVE_FILE_META
        try:
            vr = vr_of(tag)
        except KeyError:
            return _REMOVE_UNKNOWN
        if vr == "UI":
            return _KEEP_DEFAULT if Option.RETAIN_UIDS in self.options else _UID_DEFAULT
        if vr == "PN":
            return _EMPTY_PERSON
        return _KEEP_DEFAULT

    def safe_private_vrs(self, tag: int, creator: str) -> frozenset[str]:
        """The VRs Table E.3.10-1 lists for a safe private element (empty: any VR)."""
        vr = self.safe_private.get((tag >> 16, tag & 0xFF, creator.strip()), "")
        return frozenset(v.strip() for v in vr.split("/") if v.strip())

    def decide_private(self, tag: int, creator: str | None) -> Decision:
        """The decision for a private data element whose block belongs to ``creator``."""
        d = self.exact.get(tag)
        if d is not None:
            return d
        if (
            creator is not None
            and Option.RETAIN_SAFE_PRIVATE in self.options
            and (tag >> 16, tag & 0xFF, creator.strip()) in self.safe_private
        ):
            return _PRIVATE_SAFE
        return _PRIVATE_REMOVE


def _digest(profile: Profile) -> str:
    canonical = {
        "engine": ENGINE_VERSION,
        "tables": table_digest_source(),
        "name": profile.name,
        "options": sorted(o.value for o in profile.options),
        "disabled": sorted(profile.disabled),
        "rules": sorted((r.tag, r.act.value) for r in profile.rules),  # order is not output
        "apply_masks": profile.apply_masks,
        "masks": [
            [m.modality, m.manufacturer, m.model, m.rows, m.columns, m.enabled]
            + [[r.left, r.top, r.width, r.height] for r in m.rects]
            for m in profile.masks
        ],
        "date_modification": profile.date_modification.value,
        "max_age": profile.max_age,
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def compile_plan(profile: Profile) -> Plan:
    """Compile ``profile`` against PS3.15 Table E.1-1 into a :class:`Plan`."""
    exact: dict[int, Decision] = {}
    patterns: list[tuple[TagPattern, Decision]] = []
    for row in e1_1_rows():
        if row.pattern is None:
            continue  # the private-attributes row: Plan.decide_private
        decision = _row_decision(row, row.pattern.value, profile.options)
        if row.pattern.is_exact:
            exact[row.pattern.value] = decision
        else:
            patterns.append((row.pattern, decision))
    if not any(p.value == 0x60003000 and d.op in (Op.KEEP, Op.VERBATIM) for p, d in patterns):
        # Overlay Data removed (X, or C, which the engine cannot do on a bit plane and so
        # removes): the rest of its overlay group would describe a missing plane and may
        # carry a label, so the whole (60xx,xxxx) group goes with it.
        patterns.append(
            (
                TagPattern(0x60000000, 0xFF000000),
                Decision(Op.REMOVE, Action.REMOVE, Source.GROUP, note="overlay group"),
            )
        )
    for tag in profile.disabled:
        exact[tag] = Decision(Op.VERBATIM, Action.KEEP, Source.DISABLED)
    for rule in profile.rules:
        op = Op.VERBATIM if rule.act is Action.KEEP else resolve_op(rule.act, rule.tag)
        exact[rule.tag] = Decision(op, rule.act, Source.CUSTOM, note=rule.note)
    chosen = set(profile.disabled) | {rule.tag for rule in profile.rules}
    for tag, (on, note) in FOLLOWERS.items():
        if tag not in chosen and exact[on].op not in (Op.KEEP, Op.VERBATIM):
            exact[tag] = Decision(Op.REMOVE, Action.REMOVE, Source.DEFAULT, note=note)
    safe = {(r.group, r.element_low, r.creator): r.vr for r in safe_private_rows()}
    return Plan(
        profile=profile,
        digest=_digest(profile),
        exact=exact,
        patterns=tuple(patterns),
        safe_private=safe,
    )


@dataclass(frozen=True, slots=True)
class DescribedRow:
    """One line of ``describe-profile``."""

    tag: str
    name: str
    decision: Decision


def describe(plan: Plan) -> Iterator[DescribedRow]:
    """Every Table E.1-1 attribute's resulting action and its source, then custom extras."""
    listed: set[int] = set()
    for row in e1_1_rows():
        if row.pattern is None:
            d = Decision(
                Op.KEEP if Option.RETAIN_SAFE_PRIVATE in plan.options else Op.REMOVE,
                Action.CLEAN if Option.RETAIN_SAFE_PRIVATE in plan.options else Action.REMOVE,
                Source.OPTION if Option.RETAIN_SAFE_PRIVATE in plan.options else Source.BASIC,
                Option.RETAIN_SAFE_PRIVATE if Option.RETAIN_SAFE_PRIVATE in plan.options else None,
                "kept only when listed in Table E.3.10-1 for its private creator",
            )
            yield DescribedRow(row.tag_text, row.name, d)
            continue
        if row.pattern.is_exact:
            listed.add(row.pattern.value)
            yield DescribedRow(row.tag_text, row.name, plan.decide(row.pattern.value))
        else:
            yield DescribedRow(row.tag_text, row.name, plan.decide(row.pattern.value))
    for tag in sorted(set(plan.exact) - listed):
        name = keyword_of(tag)
        if not name:
            try:
                name = name_of(tag)
            except KeyError:
                name = "(private or unknown)"
        yield DescribedRow(format_tag(tag), name, plan.exact[tag])
