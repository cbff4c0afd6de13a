"""The deidfs configuration: TOML at /etc/deidfs/deidfs.toml, parsed into immutable objects.

(Contract: the dataclasses below are fixed; ``load_config`` fills them.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from deidfs.deid.profiles import BUILTIN_PROFILES, Profile
from deidfs.render import Layout

DEFAULT_CONFIG_PATH = Path("/etc/deidfs/deidfs.toml")
CONFIG_ENV = "DEIDFS_CONFIG"


class WatchMode(Enum):
    """How a folder is watched."""

    AUTO = "auto"  #: inotify where it works, polling on network file systems
    INOTIFY = "inotify"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table."""

    mountpoint: Path = Path("/srv/deidfs")
    export_dir: Path = Path("/var/lib/deidfs/export")
    state_dir: Path = Path("/var/lib/deidfs")
    metrics_address: str = "127.0.0.1:9464"  #: "" disables the metrics endpoint
    control_socket: Path = Path("/run/deidfs/control.sock")
    allow_other: bool = False
    settle_seconds: float = 2.0
    reconcile_seconds: float = 300.0  #: periodic full rescan of every folder; 0 disables
    poll_seconds: float = 5.0  #: interval of the polling observer
    cache_mib: int = 256  #: bound of the in-memory header cache
    workers: int = 2  #: indexing threads


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """One ``[folders.<id>]`` table: a watched folder bound to a profile."""

    id: str
    path: Path
    profile: str = "Nominal"
    layout: Layout = Layout.DICOM
    watch: WatchMode = WatchMode.AUTO


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration. ``profiles`` includes the built-ins."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    folders: Mapping[str, FolderConfig] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=lambda: dict(BUILTIN_PROFILES))
    source: Path | None = None  #: the file it was read from
    sha256: str = ""  #: digest of the file's bytes, shown by ``status``


def load_config(path: Path) -> Config:
    """Read and validate the TOML configuration at ``path``."""
    raise NotImplementedError("being written")
