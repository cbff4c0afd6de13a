"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from deidfs.config.load import load_config
from deidfs.config.model import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config
from deidfs.deid.plan import DescribedRow
from deidfs.deid.profiles import BUILTIN_PROFILES, Mask, Profile
from deidfs.errors import ConfigError


def config_path(arg: str | None) -> Path | None:
    """The config file named by ``--config``, ``$DEIDFS_CONFIG`` or the default, if present."""
    if arg:
        return Path(arg)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def required_config(arg: str | None, missing: str) -> Config:
    """The configuration ``--config``, ``$DEIDFS_CONFIG`` or the default names.

    Raises
    ------
    ConfigError
        There is none: ``missing`` says what needs it, then where it can come from.
    """
    path = config_path(arg)
    if path is None:
        raise ConfigError(
            f"{missing}: give --config, set ${CONFIG_ENV} or create {DEFAULT_CONFIG_PATH}"
        )
    return load_config(path)


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


def mask_text(mask: Mask) -> str:
    """One line for a mask: its criteria, its rectangles and whether it is disabled."""
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


# --------------------------------------------------------------------------------------------
# profile ...


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


def _cluster_address(text: str) -> object:
    """An argparse type: ``--cluster``'s value
    (:func:`deidfs.export.cluster_config.parse_address`)."""
    from deidfs.export.cluster_config import (  # noqa: PLC0415  (only when the option is given)
        parse_address,
    )

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cluster_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--cluster`` and its options, as ``anonymize`` and ``export`` share them; returns
    the group (a command adds its own)."""
    group = p.add_argument_group(
        "on a Dask cluster (install the cluster extra: pip install 'deidfs[cluster]')"
    )
    group.add_argument(
        "--cluster",
        type=_cluster_address,
        metavar="ADDRESS",
        help="run on dask.distributed: local:N (a cluster of N worker processes on this "
        "machine) or a scheduler's tcp://HOST:PORT or tls://HOST:PORT",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="files per task at most (default 256); a directory with fewer files is never split",
    )
    group.add_argument(
        "--allow-plain-key",
        action="store_true",
        help="send the pseudonym key in the task over a plain tcp:// scheduler (refused "
        "without: give --key-file on shared storage or use tls://)",
    )
    group.add_argument("--tls-ca-file", metavar="FILE", help="tls://: the CA certificate (PEM)")
    group.add_argument("--tls-cert", metavar="FILE", help="tls://: this client's certificate")
    group.add_argument("--tls-key", metavar="FILE", help="tls://: this client's private key")
    return group


def cluster_usage_error(args: argparse.Namespace, command: str) -> str | None:
    """Why the options of ``args`` do not go together with ``--cluster`` (or its options
    without it), or None."""
    if args.cluster is None:
        for name in ("batch_size", "tls_ca_file", "tls_cert", "tls_key"):
            if getattr(args, name, None):
                return f"--{name.replace('_', '-')} needs --cluster"
        if getattr(args, "allow_plain_key", False):
            return "--allow-plain-key needs --cluster"
        return None
    if getattr(args, "workers", None):
        return "--workers cannot be used with --cluster (the cluster has its workers)"
    if getattr(args, "to_destination", None) is not None:
        return f"deidfs {command} --to-destination cannot run on a cluster"
    if getattr(args, "via_daemon", False):
        return "--via-daemon cannot be used with --cluster"
    return None
