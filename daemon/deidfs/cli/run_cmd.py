"""``deidfs run``, ``deidfs unmount`` and ``deidfs demo``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from deidfs.cli.common import config_path
from deidfs.config.load import load_config


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``."""
    p = sub.add_parser(
        "run",
        help="serve the configured folders as a de-identified read-only mount (foreground)",
        description=(
            "Mount the configured folders, de-identified by their profiles, read-only at the "
            "configured mountpoint, and keep them up to date while files arrive, change and "
            "disappear. Runs in the foreground (systemd Type=notify); stop with SIGTERM or "
            "Ctrl-C, which unmounts cleanly. For an ad-hoc background run use "
            "`systemd-run --unit=deidfs-test deidfs run --config FILE`."
        ),
        epilog="exit codes: 0 stopped by a signal, 1 failure, 66 config missing, 78 bad config",
    )
    p.set_defaults(func=_run)

    u = sub.add_parser(
        "unmount",
        help="unmount the configured mountpoint (e.g. left stale by a killed daemon)",
        description=(
            "Unmount whatever is mounted at the configured mountpoint: `fusermount3 -u`, "
            "then a lazy `-uz` if it is busy. Nothing mounted is not an error."
        ),
    )
    u.set_defaults(func=_unmount)

    d = sub.add_parser(
        "demo",
        help="write a demo configuration and sample DICOM files into a directory",
        description=(
            "Write DIR/deidfs.toml (mountpoint DIR/mnt, state DIR/state, export DIR/export, "
            "folder 'samples' watching DIR/incoming with profile Nominal = Basic) and copy "
            "sample DICOM files from pydicom's test data into DIR/incoming. Existing files "
            "are kept. Then run: deidfs run --config DIR/deidfs.toml"
        ),
    )
    d.add_argument("--dir", default="demo", help="demo directory (default: ./demo)")
    d.set_defaults(func=_demo)


def _config(args: argparse.Namespace) -> Path | None:
    path = config_path(args.config)
    if path is None:
        print(
            "deidfs: no configuration: pass --config FILE or set $DEIDFS_CONFIG "
            "(default /etc/deidfs/deidfs.toml does not exist)",
            file=sys.stderr,
        )
    return path


def _run(args: argparse.Namespace) -> int:
    path = _config(args)
    if path is None:
        return os.EX_CONFIG
    config = load_config(path)  # ConfigError: printed by main with its exit code (78)
    from deidfs.service.core import run_service  # noqa: PLC0415  (keeps other commands light)

    return run_service(config)


def _unmount(args: argparse.Namespace) -> int:
    from deidfs.mount.lifecycle import fusermount, mounted_fstype  # noqa: PLC0415

    path = _config(args)
    if path is None:
        return os.EX_CONFIG
    mountpoint = load_config(path).daemon.mountpoint
    if mounted_fstype(mountpoint) is None:
        return 0
    if fusermount(mountpoint) or fusermount(mountpoint, lazy=True):
        print(f"unmounted {mountpoint}")
        return 0
    print(f"deidfs: cannot unmount {mountpoint}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    from deidfs.demo import write_demo  # noqa: PLC0415

    setup = write_demo(Path(args.dir))
    rel = os.path.relpath(setup.root)
    shown = rel if not rel.startswith("..") else str(setup.root)
    print(f"demo written to {shown}/")
    if setup.config_written:
        print(f"  {shown}/deidfs.toml      the configuration (folder 'samples', profile Nominal)")
    print(f"  {shown}/incoming/        {len(setup.copied)} new sample file(s); drop more here")
    print()
    print("start the daemon (as root; Ctrl-C unmounts and stops it):")
    print(f"  deidfs run --config {shown}/deidfs.toml")
    print()
    print("then, in another terminal:")
    print(f"  find {shown}/mnt -type f                 # de-identified views, no original names")
    print(f"  dcmdump $(find {shown}/mnt -name '*.dcm' | head -1) | head -40")
    print(f"  cp YOUR.dcm {shown}/incoming/            # appears within a few seconds")
    print(f"  ls -l --time-style=full-iso {shown}/mnt/samples/*/*/*/   # no real dates")
    print("the DICOMDIR and README.txt in incoming/ are withheld: they never appear.")
    return 0
