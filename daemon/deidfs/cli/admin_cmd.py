"""``deidfs profile ...``, ``deidfs folder ...`` and ``deidfs destination ...``: manage
profiles, folders and destinations in the config.

Reads (``list``, ``show``, ``rules-export``) load the configuration as the daemon does.
Edits go through :mod:`deidfs.config.edit`: under ``<config>.lock``, comments and layout
kept, the whole result validated before an atomic write, the change printed as a unified
diff. A running daemon watches the file and picks the change up by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deidfs.cli.common import config_path, described_json, mask_json
from deidfs.config import edit as config_edit
from deidfs.config import edit_destinations, edit_folders, edit_profiles
from deidfs.config.edit import Edit
from deidfs.config.edit_profiles import ProfileChanges
from deidfs.config.load import load_config, parse_config
from deidfs.config.model import DEFAULT_CONFIG_PATH, Config, DestinationKind, WatchMode
from deidfs.deid.layout import Layout
from deidfs.deid.plan import compile_plan, describe
from deidfs.deid.profiles import Mask, Profile, Rule, rules_from_json
from deidfs.deid.profiles import rules_to_json as rules_json
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, keyword_of, parse_tag
from deidfs.errors import DeidfsError, NotFound, ProfileError

EPILOG = """exit codes:
  0 done (or nothing to change), 2 usage error,
  66 configuration file, input file, profile, folder or rule not found,
  75 another edit holds the configuration lock (try again), 77 permission denied,
  78 refused: the edit is not allowed or its result would be an invalid configuration
  (nothing is written)

Every edit prints the change as a unified diff; --dry-run prints it and writes nothing.
A running daemon watches the configuration file and applies a valid change by itself.
"""


class UsageError(DeidfsError):
    """A command line that cannot mean anything (exit 2, as argparse's own errors)."""

    exit_code = 2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``profile`` and ``folder`` with their subcommands to ``sub``."""
    edit_opts = argparse.ArgumentParser(add_help=False)
    edit_opts.add_argument(
        "--dry-run", action="store_true", help="print the change as a diff, write nothing"
    )
    edit_opts.add_argument(
        "--lock-timeout",
        type=float,
        default=config_edit.LOCK_TIMEOUT,
        metavar="SECONDS",
        help="wait this long for another edit's lock (default: %(default)s)",
    )
    json_opt = argparse.ArgumentParser(add_help=False)
    json_opt.add_argument("--json", action="store_true", help="machine-readable output")
    _register_profile(sub, edit_opts, json_opt)
    _register_folder(sub, edit_opts, json_opt)
    _register_destination(sub, edit_opts, json_opt)


def _group(
    sub: argparse._SubParsersAction[Any], name: str, help_text: str, description: str
) -> argparse._SubParsersAction[Any]:
    p = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions: argparse._SubParsersAction[Any] = p.add_subparsers(
        dest=f"{name}_command", required=True, metavar="ACTION"
    )
    return actions


def _register_profile(
    sub: argparse._SubParsersAction[Any],
    edit_opts: argparse.ArgumentParser,
    json_opt: argparse.ArgumentParser,
) -> None:
    actions = _group(
        sub,
        "profile",
        "list, show and change confidentiality profiles",
        "Confidentiality profiles of the configuration. Built-in profiles (Basic, HIPAA,\n"
        "+Pixel) are read-only: copy one to change it.",
    )

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=list(parents),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

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


def _register_folder(
    sub: argparse._SubParsersAction[Any],
    edit_opts: argparse.ArgumentParser,
    json_opt: argparse.ArgumentParser,
) -> None:
    actions = _group(
        sub,
        "folder",
        "list, add and remove watched folders and bind them to profiles",
        "Watched folders of the configuration, each served under <mountpoint>/<ID>.\n"
        "Originals are never changed: removing a folder only stops serving it.",
    )

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=list(parents),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("list", "list the folders with their profiles", json_opt)
    p.set_defaults(func=folder_list)

    p = add("add", "add a folder bound to a profile", edit_opts)
    p.add_argument("id", help="folder id: its directory name in the mount")
    p.add_argument("path", help="the folder of original DICOM files")
    p.add_argument("--profile", required=True, help="confidentiality profile of its views")
    p.add_argument(
        "--layout",
        choices=[m.value for m in Layout],
        help="how views are named (default: dicom)",
    )
    p.add_argument(
        "--watch",
        choices=[m.value for m in WatchMode],
        help="how changes are seen (default: auto)",
    )
    p.set_defaults(func=folder_add)

    p = add("set-profile", "bind a folder to another profile", edit_opts)
    p.add_argument("id", help="folder id")
    p.add_argument("profile", help="profile name")
    p.set_defaults(func=folder_set_profile)

    p = add("remove", "stop serving a folder (its originals are untouched)", edit_opts)
    p.add_argument("id", help="folder id")
    p.set_defaults(func=folder_remove)


def _register_destination(
    sub: argparse._SubParsersAction[Any],
    edit_opts: argparse.ArgumentParser,
    json_opt: argparse.ArgumentParser,
) -> None:
    actions = _group(
        sub,
        "destination",
        "list, add and remove the DICOM nodes exports are sent to",
        "Destinations of `deidfs export FOLDER --to-destination NAME`: DICOM nodes (C-STORE)\n"
        "and DICOMweb servers (STOW-RS). Credentials stay in their own files; retries,\n"
        "backoff_seconds, timeout_seconds and batch_size are edited in the TOML file.",
    )

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=list(parents),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("list", "list the destinations", json_opt)
    p.set_defaults(func=destination_list)

    p = add("add", "add a destination", edit_opts)
    p.add_argument("name", help="its name (--to-destination NAME; a metric label)")
    p.add_argument(
        "--kind", choices=[k.value for k in DestinationKind], default="dicom", help="default: dicom"
    )
    p.add_argument("--ae-title", help="dicom: our AE title (default: DEIDFS)")
    p.add_argument("--called-ae", help="dicom: the node's AE title")
    p.add_argument("--host", help="dicom: the node's host name or address")
    p.add_argument("--port", type=int, help="dicom: the node's port")
    p.add_argument("--tls", action="store_true", help="dicom: TLS (PS3.15 Annex B.1)")
    for name in ("ca-file", "cert-file", "key-file"):
        p.add_argument(f"--{name}", help=f"dicom with --tls: {name.replace('-', ' ')}")
    p.add_argument("--url", help="dicomweb: the STOW-RS base URL")
    p.add_argument("--token-file", help="dicomweb: a file holding a bearer token")
    p.add_argument("--basic-auth-file", help="dicomweb: a file holding user:password")
    p.set_defaults(func=destination_add)

    p = add("remove", "remove a destination (what was sent there stays there)", edit_opts)
    p.add_argument("name", help="destination name")
    p.set_defaults(func=destination_remove)


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
# Shared plumbing


def _path(args: argparse.Namespace) -> Path:
    return config_path(getattr(args, "config", None)) or DEFAULT_CONFIG_PATH


def _load(args: argparse.Namespace) -> Config:
    return load_config(_path(args))


def _run_edit(args: argparse.Namespace, edit: Edit, what: str) -> int:
    path = _path(args)
    result = config_edit.edit_config(
        path,
        edit,
        lambda text: parse_config(text, path),
        dry_run=args.dry_run,
        lock_timeout=args.lock_timeout,
    )
    if not result.changed:
        print(f"{path}: no change, nothing written", file=sys.stderr)
        return os.EX_OK
    sys.stdout.write(result.diff)
    sys.stdout.flush()
    if result.written:
        print(f"{path}: {what}", file=sys.stderr)
    else:
        print(f"{path}: dry run, nothing written ({what})", file=sys.stderr)
    return os.EX_OK


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


def _mask_text(mask: Mask) -> str:
    crit = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("modality", mask.modality),
            ("manufacturer", mask.manufacturer),
            ("model", mask.model),
            ("rows", mask.rows),
            ("columns", mask.columns),
        )
        if v is not None
    )
    rects = " ".join(f"[{r.left},{r.top} {r.width}x{r.height}]" for r in mask.rects)
    return f"{crit or 'any image'}: {rects}{'' if mask.enabled else ' (disabled)'}"


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------------------------
# profile ...


def profile_list(args: argparse.Namespace) -> int:
    """``deidfs profile list``."""
    config = _load(args)
    using = _folders_using(config)
    profiles = list(config.profiles.values())
    if args.json:
        _print_json(
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
    config = _load(args)
    profile = _profile(config, args.name)
    plan = compile_plan(profile)
    rows = list(describe(plan))
    folders = sorted(_folders_using(config).get(profile.name, []))
    if args.json:
        _print_json(_profile_doc(profile, plan.digest, folders, rows))
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
        print(f"    {_mask_text(mask)}")
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
    return _run_edit(args, edit, f"profile {args.name!r} added")


def profile_copy(args: argparse.Namespace) -> int:
    """``deidfs profile copy SRC DST``."""
    edit = edit_profiles.copy_profile(args.source, args.name, args.comment)
    return _run_edit(args, edit, f"profile {args.source!r} copied to {args.name!r}")


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
    return _run_edit(
        args, edit_profiles.edit_profile(args.name, changes), f"profile {args.name!r} changed"
    )


def profile_delete(args: argparse.Namespace) -> int:
    """``deidfs profile delete NAME``."""
    return _run_edit(
        args, edit_profiles.delete_profile(args.name), f"profile {args.name!r} deleted"
    )


def profile_rules_export(args: argparse.Namespace) -> int:
    """``deidfs profile rules-export NAME [FILE]``: exactly ``rules_to_json`` of own rules."""
    path = _path(args)
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
    return _run_edit(
        args, edit, f"profile {args.name!r} now has {n} custom rule{'' if n == 1 else 's'}"
    )


# --------------------------------------------------------------------------------------------
# folder ...


def folder_list(args: argparse.Namespace) -> int:
    """``deidfs folder list``."""
    config = _load(args)
    rows = [
        {
            "id": f.id,
            "path": str(f.path),
            "profile": f.profile,
            "layout": f.layout.value,
            "watch": f.watch.value,
        }
        for f in config.folders.values()
    ]
    if args.json:
        _print_json(rows)
        return os.EX_OK
    if not rows:
        print("no folders (add one with: deidfs folder add ID PATH --profile NAME)")
        return os.EX_OK
    wid = max(len("ID"), *(len(r["id"]) for r in rows))
    wprof = max(len("PROFILE"), *(len(r["profile"]) for r in rows))
    print(f"{'ID':<{wid}}  {'PROFILE':<{wprof}}  {'LAYOUT':<7} {'WATCH':<8} PATH")
    for r in rows:
        print(
            f"{r['id']:<{wid}}  {r['profile']:<{wprof}}  {r['layout']:<7} {r['watch']:<8} "
            f"{r['path']}"
        )
    return os.EX_OK


def folder_add(args: argparse.Namespace) -> int:
    """``deidfs folder add ID PATH --profile P [--layout L] [--watch W]``."""
    # A relative PATH means relative to where the admin stands, not to the config file.
    path = os.path.normpath(os.path.abspath(args.path))
    edit = edit_folders.add_folder(args.id, path, args.profile, args.layout, args.watch)
    code = _run_edit(args, edit, f"folder {args.id!r} added")
    if not os.path.isdir(path):
        print(f"note: {path} is not a directory (yet)", file=sys.stderr)
    return code


def folder_set_profile(args: argparse.Namespace) -> int:
    """``deidfs folder set-profile ID PROFILE``."""
    edit = edit_folders.set_folder_profile(args.id, args.profile)
    return _run_edit(args, edit, f"folder {args.id!r} now uses profile {args.profile!r}")


def folder_remove(args: argparse.Namespace) -> int:
    """``deidfs folder remove ID``."""
    return _run_edit(args, edit_folders.remove_folder(args.id), f"folder {args.id!r} removed")


# --------------------------------------------------------------------------------------------
# destination ...


def destination_list(args: argparse.Namespace) -> int:
    """``deidfs destination list``."""
    config = _load(args)
    rows = []
    for d in config.destinations.values():
        if d.kind is DestinationKind.DICOM:
            address = f"{d.called_ae}@{d.host}:{d.port}" + (" (tls)" if d.tls else "")
        else:
            address = d.url
        rows.append(
            {"name": d.name, "kind": d.kind.value, "address": address, "ae_title": d.ae_title}
        )
    if args.json:
        _print_json(rows)
        return os.EX_OK
    if not rows:
        print("no destinations (add one with: deidfs destination add NAME --called-ae ...)")
        return os.EX_OK
    wid = max(len("NAME"), *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{wid}}  {'KIND':<8} ADDRESS")
    for r in rows:
        print(f"{r['name']:<{wid}}  {r['kind']:<8} {r['address']}")
    return os.EX_OK


def destination_add(args: argparse.Namespace) -> int:
    """``deidfs destination add NAME --kind dicom|dicomweb ...``."""
    kind = DestinationKind(args.kind)
    pairs: list[tuple[str, Any]] = [("kind", kind.value)]
    if kind is DestinationKind.DICOM:
        wanted: tuple[str, ...] = (
            "ae_title",
            "called_ae",
            "host",
            "port",
            "ca_file",
            "cert_file",
            "key_file",
        )
        others: tuple[str, ...] = ("url", "token_file", "basic_auth_file")
    else:
        wanted = ("url", "token_file", "basic_auth_file")
        others = ("ae_title", "called_ae", "host", "port", "ca_file", "cert_file", "key_file")
    given = [n for n in others if getattr(args, n) is not None]
    if given or (args.tls and kind is not DestinationKind.DICOM):
        flags = [f"--{n.replace('_', '-')}" for n in given] + (["--tls"] if args.tls else [])
        raise UsageError(f"{', '.join(flags)}: not for --kind {kind.value}")
    for name in wanted:
        value = getattr(args, name)
        if value is None:
            continue
        if name.endswith("_file"):
            value = os.path.normpath(os.path.abspath(value))
        pairs.append((name, value))
    if args.tls:  # after the address, before the files
        at = max(i for i, (n, _) in enumerate(pairs) if not n.endswith("_file")) + 1
        pairs.insert(at, ("tls", True))
    return _run_edit(
        args,
        edit_destinations.add_destination(args.name, pairs),
        f"destination {args.name!r} added",
    )


def destination_remove(args: argparse.Namespace) -> int:
    """``deidfs destination remove NAME``."""
    edit = edit_destinations.remove_destination(args.name)
    return _run_edit(args, edit, f"destination {args.name!r} removed")
