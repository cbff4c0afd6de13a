"""``deidfs folder ...``: list the watched folders, add one bound to a profile, bind it to
another profile, or stop serving it.

Originals are never changed: removing a folder only stops serving it. Edits go through
:func:`deidfs.cli.admin_common.run_edit`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

from deidfs.cli.admin_common import (
    action,
    group,
    load_config_file,
    option_parents,
    print_json,
    run_edit,
)
from deidfs.config import edit_folders
from deidfs.config.model import WatchMode
from deidfs.deid.layout import Layout


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``folder`` with its subcommands to ``sub``."""
    edit_opts, json_opt = option_parents()
    actions = group(
        sub,
        "folder",
        "list, add and remove watched folders and bind them to profiles",
        "Watched folders of the configuration, each served under <mountpoint>/<ID>.\n"
        "Originals are never changed: removing a folder only stops serving it.",
    )
    add = functools.partial(action, actions)

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


# --------------------------------------------------------------------------------------------
# folder ...


def folder_list(args: argparse.Namespace) -> int:
    """``deidfs folder list``."""
    config = load_config_file(args)
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
        print_json(rows)
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
    code = run_edit(args, edit, f"folder {args.id!r} added")
    if not os.path.isdir(path):
        print(f"note: {path} is not a directory (yet)", file=sys.stderr)
    return code


def folder_set_profile(args: argparse.Namespace) -> int:
    """``deidfs folder set-profile ID PROFILE``."""
    edit = edit_folders.set_folder_profile(args.id, args.profile)
    return run_edit(args, edit, f"folder {args.id!r} now uses profile {args.profile!r}")


def folder_remove(args: argparse.Namespace) -> int:
    """``deidfs folder remove ID``."""
    return run_edit(args, edit_folders.remove_folder(args.id), f"folder {args.id!r} removed")
