"""``deidfs describe-profile NAME``: every attribute's resulting action and its source."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from deidfs.cli.common import described_json, load_profiles, mask_json, mask_text
from deidfs.deid.plan import compile_plan, describe
from deidfs.deid.standard import Option
from deidfs.errors import NotFound


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "describe-profile",
        help="print every attribute's action under a profile and where it comes from",
        description=(
            "Print, for every attribute of PS3.15 Table E.1-1 and every custom rule, the "
            "action the profile applies and its source: basic profile, option, disabled "
            "or custom rule."
        ),
    )
    p.add_argument("name", help="profile name (built-in: Basic, HIPAA, +Pixel)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.config)
    profile = profiles.get(args.name)
    if profile is None:
        raise NotFound(f"no profile named {args.name!r} (have: {', '.join(sorted(profiles))})")
    plan = compile_plan(profile)
    rows = list(describe(plan))
    if args.json:
        doc = {
            "profile": profile.name,
            "base": profile.base,
            "digest": plan.digest,
            "options": sorted(o.value for o in profile.options),
            "apply_masks": profile.apply_masks,
            "masks": [mask_json(m) for m in profile.masks],
            "attributes": [described_json(r) for r in rows],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    opts = ", ".join(sorted(o.value for o in profile.options)) or "none"
    print(f"profile {profile.name}  (base {profile.base or '-'}, digest {plan.digest[:16]})")
    print(f"options: {opts}")
    if profile.date_modification.value != "shift" or profile.max_age is not None:
        print(f"dates: {profile.date_modification.value}; max age: {profile.max_age}")
    applied = profile.apply_masks or Option.CLEAN_PIXEL_DATA in plan.options
    print(
        f"masks: {len(profile.masks)}, "
        + ("applied" if applied else "not applied (apply_masks off, no clean_pixel_data)")
    )
    for mask in profile.masks:
        print(f"mask: {mask_text(mask)}")
    print()
    print(f"{'tag':<14}{'action':<8}{'does':<13}{'source':<46}name")
    for r in rows:
        d = r.decision
        source = d.describe() + (f" ({d.note})" if d.note else "")
        print(f"{r.tag:<14}{d.action.value:<8}{d.op.value:<13}{source:<46} {r.name}")
    return 0
