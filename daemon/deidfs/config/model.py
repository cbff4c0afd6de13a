"""The deidfs configuration: TOML at /etc/deidfs/deidfs.toml, parsed into immutable objects.

The objects a configuration becomes, and the errors it fails with.
:func:`~deidfs.config.load.load_config` reads a file, :func:`~deidfs.config.load.parse_config`
a text. Both validate everything before returning, and fail with :class:`ConfigInvalid`, which
lists *every* problem found as a :class:`~deidfs.errors.ConfigError` with file, line and dotted
key (``/etc/deidfs/deidfs.toml:12: folders.ct.profle: unknown key``).

Schema (the annotated reference is ``etc/deidfs.toml``):

- ``[daemon]``: the fields of :class:`DaemonConfig`.
- ``[folders.<id>]``: ``path``, ``profile`` (default ``Nominal``), ``layout``, ``watch``.
- ``[destinations.<name>]``: where ``deidfs export --to-destination`` sends: ``kind =
  "dicom"`` (``ae_title``, ``called_ae``, ``host``, ``port``, ``tls``, ``ca_file``,
  ``cert_file``, ``key_file``) or ``kind = "dicomweb"`` (``url``, ``token_file`` or
  ``basic_auth_file``); both take ``timeout_seconds``, ``retries``, ``backoff_seconds``,
  ``batch_size``.
- ``[profiles.<name>]``: ``base`` (default ``Basic``), ``comment``, ``enabled``,
  ``apply_masks``, ``options``, ``disabled``, ``rules`` or ``rules_file``, ``masks``,
  ``date_modification``, ``max_age``, ``accepted``.

Relative paths are resolved against the directory of the configuration file. Unknown keys
are errors, so a typo never silently drops a setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from deidfs.deid.layout import Layout
from deidfs.deid.profiles import BUILTIN_PROFILES, Profile
from deidfs.errors import ConfigError

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
    cache_mib: int = 32  #: bound of the in-memory header cache
    workers: int = 2  #: indexing threads, each with a render process (at least 2)
    #: a source's render past this is abandoned and the source withheld (``parse_timeout``)
    parse_timeout_seconds: float = 60.0
    #: bound of a source's header (its elements before Pixel Data); past it: header_too_large
    max_header_mib: int = 256

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_mib * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """One ``[folders.<id>]`` table: a watched folder bound to a profile."""

    id: str
    path: Path
    profile: str = "Nominal"
    layout: Layout = Layout.DICOM
    watch: WatchMode = WatchMode.AUTO


class DestinationKind(Enum):
    """How a destination receives files."""

    DICOM = "dicom"  #: a DICOM node: C-STORE (PS3.4 Annex B) over an association
    DICOMWEB = "dicomweb"  #: a DICOMweb server: STOW-RS (PS3.18 10.5)


@dataclass(frozen=True, slots=True)
class Destination:
    """One ``[destinations.<name>]`` table: a node exports are sent to.

    ``kind`` says which fields matter: ``dicom`` the AE titles, ``host``, ``port`` and TLS
    files; ``dicomweb`` the ``url`` and one credentials file. A credentials file holds a
    bearer token (``token_file``) or ``user:password`` (``basic_auth_file``); its content
    is read when sending, never kept in the configuration.
    """

    name: str
    kind: DestinationKind
    ae_title: str = "DEIDFS"  #: our own AE title (Calling AE)
    called_ae: str = ""  #: the node's AE title
    host: str = ""
    port: int = 0
    tls: bool = False
    ca_file: Path | None = None  #: CA bundle that verifies the node (TLS)
    cert_file: Path | None = None  #: our client certificate (TLS, optional)
    key_file: Path | None = None  #: its private key
    url: str = ""  #: the STOW-RS base URL (``.../studies`` is appended)
    token_file: Path | None = None
    basic_auth_file: Path | None = None
    timeout_seconds: float = 30.0  #: connection, association and per-response timeout
    retries: int = 3  #: further attempts of a batch after a temporary failure
    backoff_seconds: float = 1.0  #: wait before the first retry, doubled for each next one
    batch_size: int = 64  #: files per association (per STOW-RS request: per study)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration. ``profiles`` includes the built-ins."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    folders: Mapping[str, FolderConfig] = field(default_factory=dict)
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=lambda: dict(BUILTIN_PROFILES))
    source: Path | None = None  #: the file it was read from
    sha256: str = ""  #: digest of the file's bytes, shown by ``status``


class ConfigInvalid(ConfigError):
    """The configuration has one or more problems; ``errors`` lists them all, top to bottom.

    ``path``, ``line``, ``key`` and ``reason`` are those of the first problem; ``str()`` gives
    every problem, one ``file:line: key: message`` per line.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigInvalid needs at least one error")
        first = errors[0]
        super().__init__(first.reason, path=first.path, line=first.line, key=first.key)
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        if len(errors) > 1:
            self.args = ("\n".join(str(e) for e in errors),)


class ConfigUnreadable(ConfigError):
    """The configuration file does not exist or cannot be read (EX_NOINPUT)."""

    exit_code = os.EX_NOINPUT


#: The profile a folder gets when it names none; the reference config defines it.
DEFAULT_PROFILE = "Nominal"
#: The base of a config profile that names none.
DEFAULT_BASE = "Basic"
