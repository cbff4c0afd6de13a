"""Edits of ``[profiles.<name>]`` tables: add, copy, delete, edit settings, replace rules.

What ``deidfs profile ...`` changes: each function returns an
:data:`~deidfs.config.edit.Edit` for :func:`~deidfs.config.edit.edit_config`. Settings are
written only where they differ from what the base profile gives, lists (``options``,
``disabled``, ``rules``) are edited in place so kept entries keep their comments, and
:func:`own_rules` reads the custom rules a profile defines itself (``rules-export``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import (
    AoT,
    Array,
    InlineTable,
    Item,
    Null,
    Table,
)
from tomlkit.toml_document import TOMLDocument

from deidfs.config.edit import Edit, EditContext, TablePath
from deidfs.config.edit_tree import (
    append_table,
    find_table,
    has_table,
    inline,
    new_table,
    remove_table,
    set_key,
    string_array,
)
from deidfs.deid.profiles import (
    ACT_WORDS,
    BUILTIN_PROFILES,
    Profile,
    Rule,
    parse_act,
    rules_from_json,
)
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.errors import ConfigError, NotFound, ProfileError


def _rule_pairs(rule: Rule) -> list[tuple[str, str]]:
    return list(rule.to_json().items())


def _rules_array(rules: Sequence[Rule]) -> Array:
    arr = tomlkit.array()
    for rule in rules:
        arr.append(inline(_rule_pairs(rule)))
    arr.multiline(True)
    return arr


# --------------------------------------------------------------------------------------------
# Reading a profile table as written


def _profile_table(doc: TOMLDocument, name: str) -> Table | InlineTable:
    if name in BUILTIN_PROFILES:
        raise ConfigError(
            f"{name!r} is a built-in profile and cannot be changed; copy it first "
            f"(deidfs profile copy {name} NEW)"
        )
    try:
        _, item = find_table(doc, "profiles", name)
    except KeyError:
        raise NotFound(f"no profile named {name!r} in the configuration") from None
    if not isinstance(item, Table | InlineTable):
        raise ConfigError(f"profiles.{name} is not a table", key=f"profiles.{name}")
    return item


def own_rules(doc: TOMLDocument, name: str, config_dir: Path) -> tuple[Rule, ...]:
    """The custom rules profile ``name`` defines itself (``rules`` or ``rules_file``).

    Inherited rules are not included: these are what ``rules-export`` saves and
    ``rules-import`` replaces. A built-in profile has none.
    """
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name].rules
    table = _profile_table(doc, name)
    data = table.unwrap()
    if "rules_file" in data:
        rules_path = config_dir / str(data["rules_file"])
        try:
            return rules_from_json(rules_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read rules file {rules_path}: {exc.strerror}",
                key=f"profiles.{name}.rules_file",
            ) from None
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError("rules must be an array", key=f"profiles.{name}.rules")
    out = []
    for item in rules:
        if not isinstance(item, dict):
            raise ConfigError("rules must be tables", key=f"profiles.{name}.rules")
        out.append(
            Rule.parse(str(item.get("id", "")), str(item.get("act", "")), item.get("note", ""))
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Profile edits


def _check_new_name(doc: TOMLDocument, name: str) -> None:
    if any(b.casefold() == name.casefold() for b in BUILTIN_PROFILES):
        raise ConfigError(f"{name!r} is the name of a built-in profile; choose another name")
    if has_table(doc, "profiles", name):
        raise ConfigError(f"a profile named {name!r} already exists")
    try:
        Profile(name=name)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None


def add_profile(name: str, base: str = "Basic", comment: str = "") -> Edit:
    """Edit: add ``[profiles.<name>]`` with ``base`` and ``comment``."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _check_new_name(doc, name)
        if not has_table(doc, "profiles", base) and base not in BUILTIN_PROFILES:
            raise NotFound(f"no profile named {base!r} to use as base")
        pairs: list[tuple[str, Any]] = [("base", base)]
        if comment:
            pairs.append(("comment", comment))
        append_table(doc, "profiles", name, new_table(pairs))
        return [("profiles", name)]

    return edit


def _explicit_pairs(profile: Profile, comment: str | None) -> list[tuple[str, Any]]:
    """Every setting of a resolved profile, written out (for a copy of a built-in)."""
    pairs: list[tuple[str, Any]] = [
        ("base", "Basic"),
        ("comment", profile.comment if comment is None else comment),
        ("enabled", profile.enabled),
        ("apply_masks", profile.apply_masks),
        ("options", string_array(sorted(o.value for o in profile.options))),
        ("date_modification", profile.date_modification.value),
    ]
    if profile.max_age is not None:
        pairs.append(("max_age", profile.max_age))
    if profile.disabled:
        pairs.append(("disabled", string_array([format_tag(t) for t in sorted(profile.disabled)])))
    if profile.rules:
        pairs.append(("rules", _rules_array(profile.rules)))
    if profile.accepted:
        pairs.append(("accepted", string_array([format_tag(t) for t in sorted(profile.accepted)])))
    return pairs


def _mask_tables(profile: Profile) -> list[Table]:
    out = []
    for mask in profile.masks:
        t = tomlkit.table()
        for key in ("modality", "manufacturer", "model", "rows", "columns"):
            value = getattr(mask, key)
            if value is not None:
                t.append(key, value)
        if not mask.enabled:
            t.append("enabled", False)
        rects = tomlkit.array()
        for r in mask.rects:
            rects.append([r.left, r.top, r.width, r.height])
        t.append("rects", rects)
        out.append(t)
    return out


def copy_profile(source: str, name: str, comment: str | None = None) -> Edit:
    """Edit: add ``[profiles.<name>]`` as a copy of ``source``.

    A copy of a built-in has all its settings written out, so each can be edited; a copy of
    a configured profile repeats its keys as written (same base, same inheritance).
    """

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _check_new_name(doc, name)
        builtin = BUILTIN_PROFILES.get(source)
        if builtin is not None:
            table = new_table(_explicit_pairs(builtin, comment), _mask_tables(builtin))
        else:
            src = _profile_table(doc, source)
            pairs: list[tuple[str, Any]] = []
            masks: list[Table] = []
            for key, value in src.value.body:
                if key is None or isinstance(value, Null):
                    continue
                if isinstance(value, AoT) and key.key == "masks":
                    masks = [_plain_table(t) for t in value.body]
                    continue
                pairs.append((key.key, _copy_item(value)))
            if comment is not None:
                pairs = [(k, v) for k, v in pairs if k != "comment"]
                pairs.insert(1 if pairs and pairs[0][0] == "base" else 0, ("comment", comment))
            table = new_table(pairs, masks)
        append_table(doc, "profiles", name, table)
        return [("profiles", name)]

    return edit


def _copy_item(value: Item) -> Item:
    """A copy of a value with its inline comment, on a line of its own."""
    item = copy.deepcopy(value)
    item.trivia.indent = ""
    if "\n" not in item.trivia.trail:
        item.trivia.trail = "\n"
    return item


def _plain_table(source: Table) -> Table:
    t = tomlkit.table()
    for key, value in source.value.body:
        if key is None or isinstance(value, Null):
            continue
        t.append(key.key, _copy_item(value))
    return t


def delete_profile(name: str) -> Edit:
    """Edit: delete ``[profiles.<name>]``; refused while a folder or profile builds on it."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _profile_table(doc, name)
        used = context.folders_using(name)
        if used:
            raise ConfigError(
                f"profile {name!r} is used by folder(s) {', '.join(used)}; bind them to "
                "another profile first (deidfs folder set-profile ID PROFILE)"
            )
        derived = context.derived_from(name)
        if derived:
            raise ConfigError(
                f"profile {name!r} is the base of {', '.join(derived)}; change their base first"
            )
        remove_table(doc, "profiles", name)
        return [("profiles", name)]

    return edit


def normalize_option(text: str) -> Option:
    """An option from its value or a close spelling (``retain-uids``, ``Retain UIDs``)."""
    key = text.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return Option(key)
    except ValueError:
        names = ", ".join(o.value for o in Option)
        raise ProfileError(f"unknown option {text!r}; options are: {names}") from None


def normalize_act(text: str) -> str:
    """A rule act as stored: words in lower case, PS3.15 codes in upper case."""
    act = parse_act(text)
    word = text.strip().lower()
    return word if word in ACT_WORDS else act.value


@dataclass(frozen=True, slots=True)
class ProfileChanges:
    """What ``deidfs profile edit`` changes; ``None`` and empty mean "leave as is"."""

    comment: str | None = None
    enabled: bool | None = None
    apply_masks: bool | None = None
    options: tuple[tuple[bool, Option], ...] = ()  #: (turn on?, option), in order
    disable: tuple[int, ...] = ()
    enable: tuple[int, ...] = ()
    rules: tuple[Rule, ...] = ()
    remove_rules: tuple[int, ...] = ()
    note: str | None = None  #: note for the rules added by this edit


def _entries(table: Table | InlineTable, key: str) -> list[str]:
    value = table.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be an array of strings")
    return [str(v) for v in value]


def _update_list(table: Table | InlineTable, key: str, wanted: list[str]) -> None:
    """Make array ``key`` hold ``wanted`` (kept entries first), editing it in place.

    Entries that stay keep their place and their comments; new ones are appended; an
    array left empty is removed with its key.
    """
    current = table.get(key)
    if not isinstance(current, Array):
        if wanted:
            set_key(table, key, string_array(wanted))
        return
    old = [str(v) for v in current]
    if old == wanted:
        return
    # Append first, remove last: tomlkit keeps the array's layout while it has items.
    have = set(old)
    for v in wanted:
        if v not in have:
            current.append(v)
            have.add(v)
    for i in reversed(range(len(old))):
        if old[i] not in wanted:
            del current[i]
    _drop_if_empty(table, key)


def _drop_if_empty(table: Table | InlineTable, key: str) -> None:
    """Remove an array left empty, unless a comment goes with it (``key = []  # why``)."""
    value = table.get(key)
    if isinstance(value, Array | AoT) and not len(value):
        if isinstance(value, Array) and ("#" in value.as_string() or value.trivia.comment):
            return
        del table[key]


def _signed_tag(text: str) -> tuple[bool, int]:
    removing = text.startswith("-")
    return removing, parse_tag(text[1:] if removing else text)


def edit_profile(name: str, changes: ProfileChanges) -> Edit:
    """Edit: change settings of ``[profiles.<name>]`` (see :class:`ProfileChanges`)."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        table = _profile_table(doc, name)
        if changes.comment is not None:
            set_key(table, "comment", changes.comment)
        # Written only where they change something: enabled defaults to true, apply_masks
        # is inherited from the base.
        if changes.enabled is not None and ("enabled" in table or not changes.enabled):
            set_key(table, "enabled", changes.enabled)
        if changes.apply_masks is not None and (
            "apply_masks" in table or _base_of(table, context).apply_masks != changes.apply_masks
        ):
            set_key(table, "apply_masks", changes.apply_masks)
        if changes.options:
            _edit_options(table, name, changes.options, context)
        if changes.disable or changes.enable:
            _edit_disabled(table, name, changes, context)
        if changes.rules or changes.remove_rules:
            _edit_rules(table, name, changes)
        return [("profiles", name)]

    return edit


def _base_of(table: Table | InlineTable, context: EditContext) -> Profile:
    base = table.get("base")
    base_name = str(base) if base is not None else "Basic"
    return context.profile(base_name)


def _edit_options(
    table: Table | InlineTable,
    name: str,
    options: Sequence[tuple[bool, Option]],
    context: EditContext,
) -> None:
    entries = _entries(table, "options")
    inherited = _base_of(table, context).options
    for on, option in options:
        plus, minus = option.value, "-" + option.value
        entries = [e for e in entries if e.strip() not in (plus, minus)]
        if on and option not in inherited:
            entries.append(plus)
        elif not on and option in inherited:
            entries.append(minus)
    del name
    _update_list(table, "options", entries)


def _edit_disabled(
    table: Table | InlineTable, name: str, changes: ProfileChanges, context: EditContext
) -> None:
    entries = _entries(table, "disabled")
    inherited = _base_of(table, context).disabled
    for tag, disable in [
        *((t, True) for t in changes.disable),
        *((t, False) for t in changes.enable),
    ]:
        kept = []
        for e in entries:
            try:
                _, t = _signed_tag(e)
            except ProfileError:
                kept.append(e)
                continue
            if t != tag:
                kept.append(e)
        entries = kept
        if disable and tag not in inherited:
            entries.append(format_tag(tag))
        elif not disable and tag in inherited:
            entries.append("-" + format_tag(tag))
    del name
    _update_list(table, "disabled", entries)


def _rule_tag(item: Any) -> int | None:
    try:
        return parse_tag(str(item.get("id", "")))
    except ProfileError:
        return None


def _edit_rules(table: Table | InlineTable, name: str, changes: ProfileChanges) -> None:
    if "rules_file" in table:
        raise ConfigError(
            f"profile {name!r} takes its rules from rules_file = {str(table['rules_file'])!r}: "
            "edit that JSON file, or replace it with deidfs profile rules-import"
        )
    current = table.get("rules")
    if current is None:
        current = tomlkit.array()
    if not isinstance(current, Array | AoT):
        raise ConfigError(f"profiles.{name}.rules must be an array of tables")
    for tag in changes.remove_rules:
        if not any(_rule_tag(item) == tag for item in current):
            raise NotFound(f"profile {name!r} has no custom rule for {format_tag(tag)}")
    if "rules" not in table:
        assert isinstance(current, Array)
        current.multiline(True)
        set_key(table, "rules", current)
        current = table["rules"]
    # Add and replace first, remove last: tomlkit keeps an array's layout (one rule per
    # line, trailing comma) when it still has an item to copy it from.
    for rule in changes.rules:
        found = [i for i, item in enumerate(current) if _rule_tag(item) == rule.tag]
        note = changes.note
        if note is None and found:
            note = str(current[found[0]].get("note", ""))
        pairs = _rule_pairs(
            Rule(rule.tag, rule.act, note or "", format_tag(rule.tag), rule.act_text)
        )
        if isinstance(current, AoT):
            if found:
                old = current[found[0]]
                for k in ("id", "act", "note"):
                    if k in old and k not in dict(pairs):
                        del old[k]
                for k, v in pairs:
                    set_key(old, k, v)
            else:
                t = tomlkit.table()
                for k, v in pairs:
                    t.append(k, v)
                current.append(t)
        elif found:
            current[found[0]] = inline(pairs)
        else:
            current.append(inline(pairs))
    gone = set(changes.remove_rules)
    for i in reversed(range(len(current))):
        if _rule_tag(current[i]) in gone:
            del current[i]
    _drop_if_empty(table, "rules")


def set_rules(name: str, rules: Sequence[Rule]) -> Edit:
    """Edit: replace the custom rules of ``[profiles.<name>]`` (``rules-import``).

    Each rule is written as the JSON gave it (``id``, ``act``, ``note``), so exporting them
    again gives the same JSON. A ``rules_file`` is replaced by the inline rules.
    """

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        table = _profile_table(doc, name)
        if "rules_file" in table:
            del table["rules_file"]
        current = table.get("rules")
        if isinstance(current, Array):
            # Append the new rules, then drop the old: the array keeps its layout.
            old = len(current)
            for rule in rules:
                current.append(inline(_rule_pairs(rule)))
            for i in reversed(range(old)):
                del current[i]
            _drop_if_empty(table, "rules")
        else:
            if current is not None:
                del table["rules"]
            if rules:
                set_key(table, "rules", _rules_array(rules))
        return [("profiles", name)]

    return edit
