"""Helpers shared by subcommands."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from deidfs.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config
from deidfs.deid.profiles import BUILTIN_PROFILES, Profile


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
