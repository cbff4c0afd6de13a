"""The ``[profiles.<name>]`` tables: custom profiles derived from a base profile.

:class:`ProfileChecker` reads each table as written (a ``_ProfileSpec``: options, disabled
and accepted tags, rules or a rules file, masks, dates), and ``_Resolver`` derives the
profiles from their bases in dependency order, reporting unknown bases and cycles. A
profile that fails is named among the broken ones, so folders bound to it are not blamed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from deidfs.config.locate import Key
from deidfs.config.model import DEFAULT_BASE
from deidfs.config.tables import MISSING, Checks, Missing, Table, did_you_mean
from deidfs.deid.profiles import (
    BUILTIN_PROFILES,
    DateModification,
    Mask,
    Profile,
    Rect,
    Rule,
    parse_act,
    rules_from_json,
)
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.errors import ProfileError

_MAX_PROFILE_NAME = 64
_PROFILE_KEYS = (
    "base",
    "comment",
    "enabled",
    "apply_masks",
    "options",
    "disabled",
    "rules",
    "rules_file",
    "masks",
    "date_modification",
    "max_age",
    "accepted",
)
_RULE_KEYS = ("id", "act", "note")
_MASK_KEYS = ("modality", "manufacturer", "model", "rows", "columns", "enabled", "rects")
_RECT_KEYS = ("left", "top", "width", "height")


@dataclass(frozen=True, slots=True)
class _ProfileSpec:
    """One ``[profiles.<name>]`` table as written; ``None`` fields are inherited."""

    name: str
    base: str
    comment: str
    enabled: bool
    apply_masks: bool | None
    add_options: frozenset[Option]
    remove_options: frozenset[Option]
    add_disabled: frozenset[int]
    remove_disabled: frozenset[int]
    rules: tuple[Rule, ...]
    masks: tuple[Mask, ...] | None
    date_modification: DateModification | None
    max_age: int | Missing | None  #: 0 in the file means "no cap": ``None`` here
    add_accepted: frozenset[int] = frozenset()
    remove_accepted: frozenset[int] = frozenset()


class ProfileChecker(Checks):
    """Checks the ``[profiles.*]`` tables and resolves their inheritance."""

    def profiles(self, t: Table | None) -> tuple[dict[str, Profile], set[str]]:
        """Built-ins and config profiles; also the names of config profiles that failed."""
        result: dict[str, Profile] = dict(BUILTIN_PROFILES)
        broken: set[str] = set()
        if t is None:
            return result, broken
        specs: dict[str, _ProfileSpec] = {}
        for name, sub in t.subtables():
            spec = self.profile_spec(name, sub) if sub is not None else None
            if spec is None and name not in BUILTIN_PROFILES:
                broken.add(name)  # a rejected redefinition leaves the built-in in place
            if spec is not None:
                specs[name] = spec
        resolver = _Resolver(self, specs, broken)
        for name in specs:
            profile = resolver.resolve(name, ())
            if profile is not None:
                result[name] = profile
        return result, broken | resolver.failed

    def profile_spec(self, name: str, t: Table) -> _ProfileSpec | None:
        before = len(self.problems)
        builtin = [b for b in BUILTIN_PROFILES if b.casefold() == name.casefold()]
        if builtin:
            self.error(
                t.key,
                f"{builtin[0]!r} is a built-in profile and cannot be redefined; derive your "
                f"own instead, e.g. [profiles.My{builtin[0].lstrip('+')}] with "
                f'base = "{builtin[0]}"',
            )
        elif (
            not name.strip()
            or "/" in name
            or not name.isprintable()
            or len(name) > _MAX_PROFILE_NAME
        ):
            self.error(
                t.key,
                f"invalid profile name {name!r}: 1 to {_MAX_PROFILE_NAME} printable "
                "characters, no '/'",
            )
        t.check_keys(_PROFILE_KEYS)
        add_options, remove_options = self.options(t)
        add_disabled, remove_disabled = self.disabled(t)
        add_accepted, remove_accepted = self.tag_list(t, "accepted")
        rules = self.rules(t)
        masks = self.masks(t) if "masks" in t.data else None
        max_age: int | Missing | None = MISSING
        if "max_age" in t.data:
            age = t.integer("max_age", 0, minimum=0, maximum=149)
            max_age = age or None
        spec = _ProfileSpec(
            name=name,
            base=t.string("base", DEFAULT_BASE),
            comment=t.string("comment", ""),
            enabled=t.boolean("enabled", True),
            apply_masks=t.boolean("apply_masks", False) if "apply_masks" in t.data else None,
            add_options=add_options,
            remove_options=remove_options,
            add_disabled=add_disabled,
            remove_disabled=remove_disabled,
            rules=rules,
            masks=masks,
            date_modification=(
                t.choice("date_modification", DateModification, DateModification.SHIFT)
                if "date_modification" in t.data
                else None
            ),
            max_age=max_age,
            add_accepted=add_accepted,
            remove_accepted=remove_accepted,
        )
        return spec if len(self.problems) == before else None

    def options(self, t: Table) -> tuple[frozenset[Option], frozenset[Option]]:
        add: set[Option] = set()
        remove: set[Option] = set()
        names = [o.value for o in Option]
        for key, text in t.strings("options"):
            removing = text.startswith("-")
            name = text[1:] if removing else text
            try:
                option = Option(name)
            except ValueError:
                self.error(
                    key,
                    f"unknown option {name!r}{did_you_mean(name, names)}; options are: "
                    + ", ".join(names),
                )
                continue
            (remove if removing else add).add(option)
        for option in add & remove:
            self.error((*t.key, "options"), f"{option.value!r} is both added and removed")
        dates = {Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}
        if dates <= add:
            self.error(
                (*t.key, "options"),
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                "exclude each other",
            )
        return frozenset(add), frozenset(remove)

    def disabled(self, t: Table) -> tuple[frozenset[int], frozenset[int]]:
        return self.tag_list(t, "disabled")

    def tag_list(self, t: Table, name: str) -> tuple[frozenset[int], frozenset[int]]:
        """A list of tags (``disabled``, ``accepted``): those added to the base profile's,
        and those (written ``-TAG``) taken from it."""
        add: set[int] = set()
        remove: set[int] = set()
        for key, text in t.strings(name):
            removing = text.startswith("-")
            try:
                tag = parse_tag(text[1:] if removing else text)
            except ProfileError as exc:
                self.error(key, str(exc))
                continue
            (remove if removing else add).add(tag)
        for tag in add & remove:
            self.error((*t.key, name), f"{format_tag(tag)} is both added and removed")
        return frozenset(add), frozenset(remove)

    def rules(self, t: Table) -> tuple[Rule, ...]:
        if "rules" in t.data and "rules_file" in t.data:
            self.error(
                (*t.key, "rules_file"),
                "give either rules or rules_file, not both (rules_file replaces the rules)",
            )
            return ()
        if "rules_file" in t.data:
            return self.rules_file(t)
        rules: list[Rule] = []
        seen: dict[int, int] = {}
        for i, item in enumerate(t.tables("rules")):
            if item is None:
                continue
            item.check_keys(_RULE_KEYS)
            id_text = item.string("id", "", required=True)
            act_text = item.string("act", "", required=True)
            note = item.string("note", "")
            if not id_text or not act_text:
                continue
            try:
                tag = parse_tag(id_text)
            except ProfileError as exc:
                self.error((*item.key, "id"), str(exc))
                continue
            try:
                parse_act(act_text)
            except ProfileError as exc:
                self.error((*item.key, "act"), str(exc))
                continue
            if tag in seen:
                self.error(
                    (*item.key, "id"),
                    f"a second rule for {format_tag(tag)} (first: rules[{seen[tag]}])",
                )
                continue
            seen[tag] = i
            rules.append(Rule.parse(id_text, act_text, note))
        return tuple(rules)

    def rules_file(self, t: Table) -> tuple[Rule, ...]:
        path = t.optional_path("rules_file")
        if path is None:
            return ()
        key = (*t.key, "rules_file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.error(key, f"rules file {path} not found")
            return ()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.error(key, f"cannot read rules file {path}: {reason}")
            return ()
        try:
            return rules_from_json(text)
        except ProfileError as exc:
            self.error(key, f"rules file {path}: {exc}")
            return ()

    def masks(self, t: Table) -> tuple[Mask, ...]:
        masks: list[Mask] = []
        for item in t.tables("masks"):
            if item is None:
                continue
            before = len(self.problems)
            item.check_keys(_MASK_KEYS)
            rects = self.rects(item)
            modality = item.string("modality", "") or None
            manufacturer = item.string("manufacturer", "") or None
            model = item.string("model", "") or None
            rows = item.integer("rows", 0, minimum=1) if "rows" in item.data else None
            columns = item.integer("columns", 0, minimum=1) if "columns" in item.data else None
            enabled = item.boolean("enabled", True)
            if len(self.problems) > before:
                continue
            masks.append(
                Mask(
                    rects=rects,
                    modality=modality,
                    manufacturer=manufacturer,
                    model=model,
                    rows=rows,
                    columns=columns,
                    enabled=enabled,
                )
            )
        return tuple(masks)

    def rects(self, mask: Table) -> tuple[Rect, ...]:
        key = (*mask.key, "rects")
        raw = mask.data.get("rects", MISSING)
        if isinstance(raw, Missing):
            self.error(key, "missing rects: a mask needs rects = [[left, top, width, height], ...]")
            return ()
        if not isinstance(raw, list) or not raw:
            self.error(key, "expected a non-empty array of [left, top, width, height]")
            return ()
        rects: list[Rect] = []
        for i, item in enumerate(raw):
            ikey = (*key, i)
            if isinstance(item, dict):
                sub = Table(self.report, ikey, item)
                sub.check_keys(_RECT_KEYS)
                numbers: list[object] = [item.get(k, MISSING) for k in _RECT_KEYS]
            elif isinstance(item, list) and len(item) == 4:
                numbers = list(item)
            else:
                self.error(ikey, "expected [left, top, width, height] or a table of those")
                continue
            ints = [n for n in numbers if isinstance(n, int) and not isinstance(n, bool)]
            if len(ints) != len(_RECT_KEYS):
                self.error(ikey, "left, top, width and height must all be given as integers")
                continue
            left, top, width, height = ints
            try:
                rects.append(Rect(left, top, width, height))
            except ProfileError as exc:
                self.error(ikey, str(exc))
        return tuple(rects)


class _Resolver:
    """Resolves profile inheritance (``base``) in dependency order, detecting cycles."""

    def __init__(
        self, checker: Checks, specs: Mapping[str, _ProfileSpec], broken: Collection[str]
    ) -> None:
        self.checker = checker
        self.specs = specs
        self.broken = broken
        self.done: dict[str, Profile] = dict(BUILTIN_PROFILES)
        self.failed: set[str] = set()

    def resolve(self, name: str, chain: tuple[str, ...]) -> Profile | None:
        if name in self.done:
            return self.done[name]
        if name in self.failed:
            return None
        spec = self.specs[name]
        base_key: Key = ("profiles", name, "base")
        if spec.base in (*chain, name):
            loop = (*chain, name)
            cycle = " -> ".join([*loop[loop.index(spec.base) :], spec.base])
            self.checker.error(base_key, f"base profiles form a cycle: {cycle}")
            self.failed.add(name)
            return None
        if spec.base in self.broken:
            self.failed.add(name)  # the base's own errors are reported where it is defined
            return None
        if spec.base not in self.specs and spec.base not in self.done:
            known = [*BUILTIN_PROFILES, *(n for n in self.specs if n != name)]
            self.checker.error(
                base_key,
                f"unknown base profile {spec.base!r}{did_you_mean(spec.base, known)}; "
                "profiles are: " + ", ".join(known),
            )
            self.failed.add(name)
            return None
        base = self.resolve(spec.base, (*chain, name))
        if base is None:
            self.failed.add(name)
            return None
        profile = self.merge(spec, base)
        if profile is None:
            self.failed.add(name)
        else:
            self.done[name] = profile
        return profile

    def merge(self, spec: _ProfileSpec, base: Profile) -> Profile | None:
        """Derive ``spec`` from ``base``: unset fields inherited, lists added or removed."""
        own = {rule.tag for rule in spec.rules}
        rules = (*(r for r in base.rules if r.tag not in own), *spec.rules)
        options = (base.options | spec.add_options) - spec.remove_options
        try:
            return Profile(
                name=spec.name,
                base=base.name,
                comment=spec.comment,
                enabled=spec.enabled,
                apply_masks=base.apply_masks if spec.apply_masks is None else spec.apply_masks,
                options=options,
                disabled=(base.disabled | spec.add_disabled) - spec.remove_disabled,
                rules=rules,
                masks=base.masks if spec.masks is None else spec.masks,
                date_modification=(
                    base.date_modification
                    if spec.date_modification is None
                    else spec.date_modification
                ),
                max_age=base.max_age if isinstance(spec.max_age, Missing) else spec.max_age,
                accepted=(base.accepted | spec.add_accepted) - spec.remove_accepted,
            )
        except ProfileError as exc:
            # Only combinations across the inheritance chain get here (e.g. both longitudinal
            # date options, one inherited): say which profile the other came from.
            self.checker.error(
                ("profiles", spec.name, "options"), f"{exc} (after inheriting from {base.name!r})"
            )
            return None
