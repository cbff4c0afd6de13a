"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from deidfs.config.model import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from deidfs.deid.plan import DescribedRow
from deidfs.deid.profiles import BUILTIN_PROFILES, Mask, Profile


def config_path(arg: str | None) -> Path | None:
    """The config file named by ``--config``, ``$DEIDFS_CONFIG`` or the default, if present."""
    if arg:
        return Path(arg)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_profiles(arg: str | None) -> Mapping[str, Profile]:
    """Profiles of the configuration (built-ins included), or the built-ins alone."""
    path = config_path(arg)
    if path is None:
        return dict(BUILTIN_PROFILES)
    return load_config(path).profiles


def mask_json(mask: Mask) -> dict[str, object]:
    """A mask as ``profile show --json`` and ``describe-profile --json`` print it."""
    return {
        "modality": mask.modality,
        "manufacturer": mask.manufacturer,
        "model": mask.model,
        "rows": mask.rows,
        "columns": mask.columns,
        "enabled": mask.enabled,
        "rects": [[r.left, r.top, r.width, r.height] for r in mask.rects],
    }


def described_json(row: DescribedRow) -> dict[str, object]:
    """One attribute's decision, as the ``--json`` outputs print it."""
    d = row.decision
    return {
        "tag": row.tag,
        "name": row.name,
        "action": d.action.value,
        "op": d.op.value,
        "source": d.source.value,
        "option": d.option.value if d.option else None,
        "note": d.note,
    }


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_writer_options(p: argparse.ArgumentParser) -> None:
    """``--workers``, ``--no-fsync`` and ``--quiet``, as the commands that write views share
    them (``anonymize``, ``export``)."""
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"worker processes (default: the number of CPUs, {os.cpu_count() or 1} here)",
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not wait for files to reach the disk before they appear (faster; after a "
        "machine crash, files may be empty under their final names)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, no summary, no per-file refusal lines (failures and errors "
        "still shown)",
    )
