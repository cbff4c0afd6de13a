"""What the ``deidfs profile|folder|destination ...`` commands share: their epilog (exit
codes), the usage error, the ``--dry-run``/``--lock-timeout`` and ``--json`` options, the
parser of a command group, and the plumbing of an edit.

Reads load the configuration as the daemon does. Edits go through :mod:`deidfs.config.edit`:
under ``<config>.lock``, comments and layout kept, the whole result validated before an
atomic write, the change printed as a unified diff. A running daemon watches the file and
picks the change up by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deidfs.cli.common import config_path
from deidfs.config import edit as config_edit
from deidfs.config.edit import Edit
from deidfs.config.load import load_config, parse_config
from deidfs.config.model import DEFAULT_CONFIG_PATH, Config
from deidfs.errors import DeidfsError

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


def option_parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parents of the commands that edit (``--dry-run``, ``--lock-timeout``) and of
    those that list or show (``--json``)."""
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
    return edit_opts, json_opt


def group(
    sub: argparse._SubParsersAction[Any], name: str, help_text: str, description: str
) -> argparse._SubParsersAction[Any]:
    """Add the command group ``name`` to ``sub``; its actions are added to what it returns."""
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


def action(
    actions: argparse._SubParsersAction[Any],
    name: str,
    help_text: str,
    *parents: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """Add the action ``name`` to a group's ``actions``; its description is ``help_text``
    as a sentence."""
    p: argparse.ArgumentParser = actions.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        parents=list(parents),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


# --------------------------------------------------------------------------------------------
# Shared plumbing


def config_file(args: argparse.Namespace) -> Path:
    """The configuration file the command reads or edits."""
    return config_path(getattr(args, "config", None)) or DEFAULT_CONFIG_PATH


def load_config_file(args: argparse.Namespace) -> Config:
    """The configuration, loaded as the daemon loads it."""
    return load_config(config_file(args))


def run_edit(args: argparse.Namespace, edit: Edit, what: str) -> int:
    """Apply ``edit`` to the configuration file (or only print it: ``--dry-run``)."""
    path = config_file(args)
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


def print_json(doc: object) -> None:
    """``doc`` as ``--json`` prints it."""
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
