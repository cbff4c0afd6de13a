"""``deidfs`` entry point: global options and subcommand dispatch.

Each subcommand lives in its own module with ``register(subparsers)``, which adds a parser
whose ``func`` default takes the parsed arguments and returns an exit code. A run imports only
the module of its subcommand (the daemon's modules cost a one-shot ``deidfs anonymize`` a good
part of its start-up); ``--help`` and anything unexpected import them all.

The global options (``--config``, ``--log-level``, ``--version``) are accepted before the
subcommand and after it, by every subcommand alike: :func:`build_parser` adds them to each
one once all are registered, so no module declares them itself.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from deidfs import __version__
from deidfs.errors import DeidfsError
from deidfs.ops.logs import setup_logging

#: Subcommand modules of :mod:`deidfs.cli`, in the order ``--help`` lists them.
MODULES = (
    "anonymize_cmd",
    "describe_cmd",
    "export_cmd",
    "mask_cmd",
    "config_cmd",
    "run_cmd",
    "ops_cmd",
    "report_cmd",
    "profile_cmd",
    "folder_cmd",
    "destination_cmd",
)
#: The module registering each subcommand (a name missing here only costs time: all load).
COMMANDS = {
    "anonymize": "anonymize_cmd",
    "describe-profile": "describe_cmd",
    "export": "export_cmd",
    "mask": "mask_cmd",
    "check-config": "config_cmd",
    "run": "run_cmd",
    "unmount": "run_cmd",
    "demo": "run_cmd",
    "status": "ops_cmd",
    "reload": "ops_cmd",
    "withheld": "ops_cmd",
    "report": "report_cmd",
    "verify": "report_cmd",
    "profile": "profile_cmd",
    "folder": "folder_cmd",
    "destination": "destination_cmd",
}
_GLOBAL_OPTIONS_WITH_VALUE = ("--config", "--log-level")

EPILOG = """exit codes:
  0 success, 1 failure, 2 usage error, 66 input missing, 69 daemon unavailable,
  73 cannot create output, 75 temporary failure, 77 permission denied, 78 bad configuration
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just the subcommands of that module."""
    parser = argparse.ArgumentParser(
        prog="deidfs",
        description="DICOM folders served as a read-only, de-identified FUSE mount.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES if only is None else (only,):
        importlib.import_module(f"deidfs.cli.{name}").register(sub)
    _spread_global_options(parser)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--version``, ``--config`` and ``--log-level`` on ``parser``.

    Below the top, each default is SUPPRESS: an option not given after the subcommand leaves
    the value given before it (or the top's default) in place.
    """
    group: argparse.ArgumentParser | argparse._ArgumentGroup = parser
    if not top:
        group = parser.add_argument_group("global options (also accepted before the command)")
    have = parser._option_string_actions
    if "--version" not in have:
        group.add_argument("--version", action="version", version=f"deidfs {__version__}")
    if "--config" not in have:  # a subcommand may say what it reads the file for
        group.add_argument(
            "--config",
            default=None if top else argparse.SUPPRESS,
            help="configuration file (default: $DEIDFS_CONFIG or /etc/deidfs/deidfs.toml)",
        )
    if "--log-level" not in have:
        group.add_argument(
            "--log-level",
            default=os.environ.get("DEIDFS_LOG_LEVEL", "info") if top else argparse.SUPPRESS,
            choices=["debug", "info", "warning", "error"],
            help="log level (default: info)",
        )


def _spread_global_options(parser: argparse.ArgumentParser) -> None:
    """Every subcommand, at any depth (``profile show``), accepts the global options too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            done: set[int] = set()
            for child in action.choices.values():
                if id(child) not in done:  # an alias names the same parser
                    done.add(id(child))
                    _add_global_options(child, top=False)
                    _spread_global_options(child)


def command_module(argv: Sequence[str]) -> str | None:
    """The module of the subcommand ``argv`` names, when that is plain: its first argument
    that is neither a global option nor an option's value. None (all modules) otherwise."""
    at = 0
    while at < len(argv):
        arg = argv[at]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            at += 2
        elif arg.startswith(tuple(f"{option}=" for option in _GLOBAL_OPTIONS_WITH_VALUE)):
            at += 1
        elif arg.startswith("-"):
            return None  # --help, --version, an abbreviation: the whole parser
        else:
            return COMMANDS.get(arg)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:
        print(f"deidfs {__version__}")  # without loading every subcommand
        return 0
    parser = build_parser(command_module(argv))
    args = parser.parse_args(argv)
    setup_logging(getattr(logging, args.log_level.upper()))
    try:
        code: int = args.func(args)
    except DeidfsError as exc:
        print(f"deidfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("deidfs: interrupted", file=sys.stderr)
        return 130
    return code
