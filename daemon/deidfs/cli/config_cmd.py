"""``deidfs check-config [PATH]``: validate a configuration file, as ``nginx -t`` does."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from deidfs.cli.common import config_path
from deidfs.config.load import load_config
from deidfs.config.model import DEFAULT_CONFIG_PATH, ConfigInvalid
from deidfs.errors import ConfigError

EPILOG = """exit codes:
  0 valid, 66 file missing or unreadable, 78 invalid (every problem is listed)
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``check-config`` to ``sub``."""
    p = sub.add_parser(
        "check-config",
        help="validate the configuration file",
        description=(
            "Parse and validate a deidfs configuration file without starting anything:\n"
            "TOML syntax, unknown keys, values, profiles and their inheritance, folders\n"
            "and their paths. Each problem is reported as FILE:LINE: KEY: MESSAGE."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="file to check (default: --config, $DEIDFS_CONFIG or /etc/deidfs/deidfs.toml)",
    )
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text for people, json for tools (default: text)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the configuration; exit 0 when valid, 78 when invalid, 66 when missing."""
    path = config_path(args.path or getattr(args, "config", None)) or DEFAULT_CONFIG_PATH
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigInvalid) else (exc,)
        if args.format == "json":
            _print_json({"ok": False, "path": str(path), "errors": [_error_doc(e) for e in errors]})
        else:
            for error in errors:
                print(f"{error}", file=sys.stderr)
            if len(errors) > 1:
                print(f"{len(errors)} problems", file=sys.stderr)
        return exc.exit_code
    if args.format == "json":
        _print_json(
            {
                "ok": True,
                "path": str(path),
                "sha256": config.sha256,
                "folders": list(config.folders),
                "profiles": list(config.profiles),
            }
        )
    else:
        folders = len(config.folders)
        profiles = len(config.profiles)
        print(
            f"ok: {folders} folder{'' if folders == 1 else 's'}, "
            f"{profiles} profile{'' if profiles == 1 else 's'} (sha256 {config.sha256})"
        )
    return os.EX_OK


def _error_doc(error: ConfigError) -> dict[str, Any]:
    return {"file": error.path, "line": error.line, "key": error.key, "message": error.reason}


def _print_json(doc: dict[str, Any]) -> None:
    json.dump(doc, sys.stdout, indent=2)
    print()
