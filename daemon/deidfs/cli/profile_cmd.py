"""``deidfs profile ...``: list, show, add, copy, edit and delete confidentiality profiles,
and export or import a profile's custom rules.

Reads (``list``, ``show``, ``rules-export``) load the configuration as the daemon does; edits
go through :func:`deidfs.cli.admin_common.run_edit`. The argument types of ``profile edit``
(``--option``, ``--rule``, a tag) are here, their errors usage errors (exit 2).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deidfs.cli.admin_common import (
    UsageError,
    action,
    config_file,
    group,
    load_config_file,
    option_parents,
    print_json,
    run_edit,
)
from deidfs.cli.common import described_json, mask_json, mask_text
from deidfs.config import edit as config_edit
from deidfs.config import edit_profiles
from deidfs.config.edit_profiles import ProfileChanges
from deidfs.config.load import load_config
from deidfs.config.model import Config
from deidfs.deid.plan import compile_plan, describe
from deidfs.deid.profiles import Profile, Rule, rules_from_json
from deidfs.deid.profiles import rules_to_json as rules_json
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, keyword_of, parse_tag
from deidfs.errors import NotFound, ProfileError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``profile`` with its subcommands to ``sub``."""
    edit_opts, json_opt = option_parents()
    actions = group(
        sub,
        "profile",
        "list, show and change confidentiality profiles",
        "Confidentiality profiles of the configuration. Built-in profiles (Basic, HIPAA,\n"
        "+Pixel) are read-only: copy one to change it.",
    )
    add = functools.partial(action, actions)

    p = add("list", "list the profiles, built-ins included, and the folders using each", json_opt)
    p.set_defaults(func=profile_list)

    p = add("show", "show a profile: settings, rules, masks and every attribute's action", json_opt)
    p.add_argument("name", help="profile name")
    p.set_defaults(func=profile_show)

    p = add("add", "add a profile", edit_opts)
    p.add_argument("name", help="name of the new profile")
    p.add_argument("--base", default="Basic", help="profile it inherits from (default: Basic)")
    p.add_argument("--comment", default="", help="what the profile is for")
    p.set_defaults(func=profile_add)

    p = add("copy", "copy a profile (a copy of a built-in has its settings written out)", edit_opts)
    p.add_argument("source", help="profile to copy, built-in or not")
    p.add_argument("name", help="name of the new profile")
    p.add_argument("--comment", help="comment of the copy (default: the source's)")
    p.set_defaults(func=profile_copy)

    p = add("edit", "change a profile's settings, options, attributes and rules", edit_opts)
    p.add_argument("name", help="profile to change")
    p.add_argument("--comment", help="new comment")
    on = p.add_mutually_exclusive_group()
    on.add_argument(
        "--enable", dest="enabled", action="store_const", const=True, help="enable the profile"
    )
    on.add_argument(
        "--disable",
        dest="enabled",
        action="store_const",
        const=False,
        help="disable it (kept as a template: no folder may use it)",
    )
    masks = p.add_mutually_exclusive_group()
    masks.add_argument(
        "--apply-masks",
        dest="apply_masks",
        action="store_const",
        const=True,
        help="black out the rectangles of the profile's matching masks",
    )
    masks.add_argument(
        "--no-apply-masks",
        dest="apply_masks",
        action="store_const",
        const=False,
        help="do not apply masks",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=_option_arg,
        metavar="+X|-X",
        help="turn a PS3.15 option on (+X) or off (write --option=-X); repeatable. Options: "
        + ", ".join(o.value for o in Option),
    )
    p.add_argument(
        "--disable-attr",
        action="append",
        default=[],
        type=_tag_arg,
        metavar="TAG",
        help="leave this attribute untouched; TAG as (0008,103E), 0008103E or a keyword",
    )
    p.add_argument(
        "--enable-attr",
        action="append",
        default=[],
        type=_tag_arg,
        metavar="TAG",
        help="handle this attribute by the profile again",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        type=_rule_arg,
        metavar="TAG=ACT",
        help="add or replace a custom rule; ACT: keep, remove, empty, dummy, clean, "
        "pseudonymize, shift or a PS3.15 code (X, Z, D, K, C, U, Z/D, ...)",
    )
    p.add_argument("--note", help="reason recorded with the rules this command adds")
    p.add_argument(
        "--remove-rule",
        action="append",
        default=[],
        type=_tag_arg,
        metavar="TAG",
        help="remove the custom rule for TAG",
    )
    p.set_defaults(func=profile_edit)

    p = add("delete", "delete a profile (refused while a folder or profile uses it)", edit_opts)
    p.add_argument("name", help="profile to delete")
    p.set_defaults(func=profile_delete)

    p = add("rules-export", "write a profile's own custom rules as a JSON array")
    p.add_argument("name", help="profile")
    p.add_argument("file", nargs="?", help="output file (default: standard output)")
    p.set_defaults(func=profile_rules_export)

    p = add("rules-import", "replace a profile's custom rules by those of a JSON file", edit_opts)
    p.add_argument("name", help="profile")
    p.add_argument("file", help='JSON array of {"id", "act", "note"?} objects ("-": stdin)')
    p.set_defaults(func=profile_rules_import)


# --------------------------------------------------------------------------------------------
# Argument types (errors here are usage errors, exit 2)


def _option_arg(text: str) -> tuple[bool, Option]:
    on = not text.startswith("-")
    try:
        return on, edit_profiles.normalize_option(text.lstrip("+-"))
    except ProfileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tag_arg(text: str) -> int:
    try:
        return parse_tag(text)
    except ProfileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rule_arg(text: str) -> Rule:
    tag_text, sep, act_text = text.partition("=")
    if not sep or not tag_text.strip() or not act_text.strip():
        raise argparse.ArgumentTypeError(f"expected TAG=ACT, got {text!r}")
    try:
        tag = parse_tag(tag_text)
        act = edit_profiles.normalize_act(act_text)
        return Rule.parse(format_tag(tag), act)
    except ProfileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Helpers


def _folders_using(config: Config) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for fid, folder in config.folders.items():
        out.setdefault(folder.profile, []).append(fid)
    return out


def _profile(config: Config, name: str) -> Profile:
    profile = config.profiles.get(name)
    if profile is None:
        raise NotFound(
            f"no profile named {name!r} (have: {', '.join(config.profiles)})",
        )
    return profile


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _tag_name(tag: int) -> str:
    return f"{format_tag(tag)} {keyword_of(tag) or '(private or unknown)'}"


def profile_list(args: argparse.Namespace) -> int:
    """``deidfs profile list``."""
    config = load_config_file(args)
    using = _folders_using(config)
    profiles = list(config.profiles.values())
    if args.json:
        print_json(
            [
                {
                    "name": p.name,
                    "builtin": p.builtin,
                    "base": p.base,
                    "enabled": p.enabled,
                    "comment": p.comment,
                    "folders": sorted(using.get(p.name, [])),
                }
                for p in profiles
            ]
        )
        return os.EX_OK
    width = max(len("NAME"), *(len(p.name) + 2 for p in profiles))
    print(f"{'NAME':<{width}}  {'BASE':<12} {'ENABLED':<8} {'FOLDERS':<20} COMMENT")
    for p in profiles:
        name = p.name + (" *" if p.builtin else "")
        folders = ", ".join(sorted(using.get(p.name, []))) or "-"
        print(
            f"{name:<{width}}  {p.base or '-':<12} {'yes' if p.enabled else 'no':<8} "
            f"{folders:<20} {_short(p.comment, 60)}"
        )
    print("* built-in, read-only: copy it to change it (deidfs profile copy NAME NEW)")
    return os.EX_OK


def profile_show(args: argparse.Namespace) -> int:
    """``deidfs profile show NAME``."""
    config = load_config_file(args)
    profile = _profile(config, args.name)
    plan = compile_plan(profile)
    rows = list(describe(plan))
    folders = sorted(_folders_using(config).get(profile.name, []))
    if args.json:
        print_json(_profile_doc(profile, plan.digest, folders, rows))
        return os.EX_OK
    kind = "built-in, read-only" if profile.builtin else "configured"
    print(f"profile {profile.name}  ({kind}; digest {plan.digest[:16]})")
    print(f"  base:         {profile.base or '-'}")
    print(f"  comment:      {profile.comment or '-'}")
    print(f"  enabled:      {'yes' if profile.enabled else 'no'}")
    print(f"  apply masks:  {'yes' if profile.apply_masks else 'no'}")
    print(f"  dates:        {profile.date_modification.value}")
    print(f"  max age:      {profile.max_age if profile.max_age is not None else 'no cap'}")
    print(f"  folders:      {', '.join(folders) or '-'}")
    options = sorted(o.value for o in profile.options)
    print(f"  options:      {', '.join(options) or 'none'}")
    off = sorted(set(Option) - profile.options, key=lambda o: o.value)
    print(f"  options off:  {', '.join(o.value for o in off) or 'none'}")
    print(f"  disabled attributes ({len(profile.disabled)}):")
    for tag in sorted(profile.disabled):
        print(f"    {_tag_name(tag)}")
    print(f"  accepted identifiers ({len(profile.accepted)}):")
    for tag in sorted(profile.accepted):
        print(f"    {_tag_name(tag)}")
    print(f"  custom rules ({len(profile.rules)}):")
    for rule in profile.rules:
        note = f"  # {rule.note}" if rule.note else ""
        print(f"    {_tag_name(rule.tag)}: {rule.act_text or rule.act.value}{note}")
    print(f"  masks ({len(profile.masks)}):")
    for mask in profile.masks:
        print(f"    {mask_text(mask)}")
    print()
    print(f"{'tag':<14}{'action':<8}{'does':<13}{'source':<46}name")
    for r in rows:
        d = r.decision
        source = d.describe() + (f" ({d.note})" if d.note else "")
        print(f"{r.tag:<14}{d.action.value:<8}{d.op.value:<13}{source:<46} {r.name}")
    return os.EX_OK


def _profile_doc(
    profile: Profile, digest: str, folders: Sequence[str], rows: Sequence[Any]
) -> Mapping[str, object]:
    return {
        "name": profile.name,
        "builtin": profile.builtin,
        "base": profile.base,
        "comment": profile.comment,
        "enabled": profile.enabled,
        "apply_masks": profile.apply_masks,
        "date_modification": profile.date_modification.value,
        "max_age": profile.max_age,
        "digest": digest,
        "folders": list(folders),
        "options": sorted(o.value for o in profile.options),
        "disabled": [format_tag(t) for t in sorted(profile.disabled)],
        "rules": json.loads(rules_json(profile.rules)),
        "accepted": [format_tag(t) for t in sorted(profile.accepted)],
        "masks": [mask_json(m) for m in profile.masks],
        "attributes": [described_json(r) for r in rows],
    }


def profile_add(args: argparse.Namespace) -> int:
    """``deidfs profile add NAME [--base B] [--comment C]``."""
    edit = edit_profiles.add_profile(args.name, args.base, args.comment)
    return run_edit(args, edit, f"profile {args.name!r} added")


def profile_copy(args: argparse.Namespace) -> int:
    """``deidfs profile copy SRC DST``."""
    edit = edit_profiles.copy_profile(args.source, args.name, args.comment)
    return run_edit(args, edit, f"profile {args.source!r} copied to {args.name!r}")


def profile_edit(args: argparse.Namespace) -> int:
    """``deidfs profile edit NAME ...``."""
    rules: list[Rule] = args.rule
    rule_tags = [r.tag for r in rules]
    for what, tags in (
        ("--rule", rule_tags),
        ("--disable-attr", args.disable_attr),
        ("--enable-attr", args.enable_attr),
        ("--remove-rule", args.remove_rule),
    ):
        dup = {t for t in tags if tags.count(t) > 1}
        if dup:
            raise UsageError(f"{what} names {format_tag(min(dup))} twice")
    both = set(rule_tags) & set(args.remove_rule)
    if both:
        raise UsageError(f"--rule and --remove-rule both name {format_tag(min(both))}")
    both = set(args.disable_attr) & set(args.enable_attr)
    if both:
        raise UsageError(f"--disable-attr and --enable-attr both name {format_tag(min(both))}")
    options = [o for _, o in args.option]
    dup_opts = {o for o in options if options.count(o) > 1}
    if dup_opts:
        raise UsageError(f"--option names {min(o.value for o in dup_opts)} twice")
    if args.note is not None and not rules:
        raise UsageError("--note goes with --rule")
    changes = ProfileChanges(
        comment=args.comment,
        enabled=args.enabled,
        apply_masks=args.apply_masks,
        options=tuple(args.option),
        disable=tuple(args.disable_attr),
        enable=tuple(args.enable_attr),
        rules=tuple(rules),
        remove_rules=tuple(args.remove_rule),
        note=args.note,
    )
    if changes == ProfileChanges():
        raise UsageError("nothing to change: give at least one option (see --help)")
    return run_edit(
        args, edit_profiles.edit_profile(args.name, changes), f"profile {args.name!r} changed"
    )


def profile_delete(args: argparse.Namespace) -> int:
    """``deidfs profile delete NAME``."""
    return run_edit(args, edit_profiles.delete_profile(args.name), f"profile {args.name!r} deleted")


def profile_rules_export(args: argparse.Namespace) -> int:
    """``deidfs profile rules-export NAME [FILE]``: exactly ``rules_to_json`` of own rules."""
    path = config_file(args)
    config = load_config(path)
    _profile(config, args.name)
    doc = config_edit.read_document(path)
    rules = edit_profiles.own_rules(doc, args.name, path.absolute().parent)
    text = rules_json(rules)
    if args.file is None or args.file == "-":
        sys.stdout.write(text)
        return os.EX_OK
    Path(args.file).write_text(text, encoding="utf-8")
    print(
        f"{args.file}: {len(rules)} rule{'' if len(rules) == 1 else 's'} of profile {args.name!r}",
        file=sys.stderr,
    )
    return os.EX_OK


def profile_rules_import(args: argparse.Namespace) -> int:
    """``deidfs profile rules-import NAME FILE``: replace the profile's own rules."""
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"{args.file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise NotFound(f"{args.file}: cannot read: {reason}") from None
    try:
        rules = rules_from_json(text)
    except ProfileError as exc:
        raise ProfileError(f"{args.file}: {exc}") from None
    edit = edit_profiles.set_rules(args.name, rules)
    n = len(rules)
    return run_edit(
        args, edit, f"profile {args.name!r} now has {n} custom rule{'' if n == 1 else 's'}"
    )
