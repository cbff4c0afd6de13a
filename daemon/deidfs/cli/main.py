"""``deidfs`` entry point: global options and subcommand dispatch.

Each subcommand lives in its own module with ``register(subparsers)``, which adds a parser
whose ``func`` default takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from deidfs import __version__
from deidfs.cli import admin_cmd, anonymize_cmd, config_cmd, describe_cmd, report_cmd, run_cmd
from deidfs.errors import DeidfsError
from deidfs.logs import setup_logging

EPILOG = """exit codes:
  0 success, 1 failure, 2 usage error, 66 input missing, 69 daemon unavailable,
  73 cannot create output, 75 temporary failure, 77 permission denied, 78 bad configuration
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deidfs",
        description="DICOM folders served as a read-only, de-identified FUSE mount.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deidfs {__version__}")
    parser.add_argument(
        "--config",
        help="configuration file (default: $DEIDFS_CONFIG or /etc/deidfs/deidfs.toml)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DEIDFS_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (anonymize_cmd, describe_cmd, config_cmd, run_cmd, report_cmd, admin_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
