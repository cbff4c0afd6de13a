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

import difflib
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

from deidfs.config.locate import Key, Locator, dotted
from deidfs.deid.layout import Layout
from deidfs.deid.profiles import (
    BUILTIN_PROFILES,
    DateModification,
    Mask,
    Profile,
    Rect,
    Rule,
    parse_act,
    rules_from_json,
)
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.errors import ConfigError, ProfileError

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

#: Folder ids become directory names in the mount: no "/", no leading dot or dash.
_FOLDER_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_MAX_PROFILE_NAME = 64
_MAX_WORKERS = 256

_DAEMON_KEYS = (
    "mountpoint",
    "export_dir",
    "state_dir",
    "metrics_address",
    "control_socket",
    "allow_other",
    "settle_seconds",
    "reconcile_seconds",
    "poll_seconds",
    "cache_mib",
    "workers",
    "max_header_mib",
    "parse_timeout_seconds",
)
_FOLDER_KEYS = ("path", "profile", "layout", "watch")
_PROFILE_KEYS = (
    "base",
    "comment",
    "enabled",
    "apply_masks",
    "options",
    "disabled",
    "rules",
    "rules_file",
    "masks",
    "date_modification",
    "max_age",
    "accepted",
)
_COMMON_DESTINATION_KEYS = ("kind", "timeout_seconds", "retries", "backoff_seconds", "batch_size")
_DESTINATION_KEYS = {
    DestinationKind.DICOM: (
        *_COMMON_DESTINATION_KEYS,
        "ae_title",
        "called_ae",
        "host",
        "port",
        "tls",
        "ca_file",
        "cert_file",
        "key_file",
    ),
    DestinationKind.DICOMWEB: (*_COMMON_DESTINATION_KEYS, "url", "token_file", "basic_auth_file"),
}
#: PS3.5 Table 6.2-1, AE: 16 characters of the Default Character Repertoire, no backslash,
#: no control character, not only spaces (leading and trailing spaces are not significant).
_AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")
_RULE_KEYS = ("id", "act", "note")
_MASK_KEYS = ("modality", "manufacturer", "model", "rows", "columns", "enabled", "rects")
_RECT_KEYS = ("left", "top", "width", "height")

_E = TypeVar("_E", bound=Enum)


# --------------------------------------------------------------------------------------------
# Validation


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    pool = list(choices)
    same_case = [c for c in pool if c.casefold() == word.casefold()]
    close = same_case or difflib.get_close_matches(word, pool, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


class _Missing:
    """Marks an absent key where ``None`` is a value of its own (``max_age``: no cap)."""


_MISSING = _Missing()


@dataclass(frozen=True, slots=True)
class _ProfileSpec:
    """One ``[profiles.<name>]`` table as written; ``None`` fields are inherited."""

    name: str
    base: str
    comment: str
    enabled: bool
    apply_masks: bool | None
    add_options: frozenset[Option]
    remove_options: frozenset[Option]
    add_disabled: frozenset[int]
    remove_disabled: frozenset[int]
    rules: tuple[Rule, ...]
    masks: tuple[Mask, ...] | None
    date_modification: DateModification | None
    max_age: int | _Missing | None  #: 0 in the file means "no cap": ``None`` here
    add_accepted: frozenset[int] = frozenset()
    remove_accepted: frozenset[int] = frozenset()


class _Checker:
    """Turns the plain document into a :class:`Config`, collecting problems by key."""

    def __init__(self, text: str, where: str, base_dir: Path) -> None:
        self.text = text
        self.where = where
        self.base_dir = base_dir
        self.problems: list[tuple[Key, str]] = []

    def error(self, key: Key, message: str) -> None:
        self.problems.append((key, message))

    def invalid(self) -> ConfigInvalid:
        lines = Locator(self.text)
        errors = [
            ConfigError(message, path=self.where, line=lines.line_of(key), key=dotted(key))
            for key, message in self.problems
        ]
        # Top to bottom, as an editor shows them; problems without a line come last.
        errors.sort(key=lambda e: e.line if e.line is not None else math.inf)
        return ConfigInvalid(errors)

    # -- whole document ----------------------------------------------------------------------

    def config(self, doc: Mapping[str, object]) -> Config:
        top = _Table(self, (), dict(doc))
        top.check_keys(("daemon", "folders", "profiles", "destinations"))
        daemon = self.daemon(top.table("daemon"))
        profiles, broken = self.profiles(top.table("profiles"))
        folders = self.folders(top.table("folders"), daemon, profiles, broken)
        destinations = self.destinations(top.table("destinations"))
        return Config(daemon=daemon, folders=folders, profiles=profiles, destinations=destinations)

    # -- [destinations.*] --------------------------------------------------------------------

    def destinations(self, t: _Table | None) -> dict[str, Destination]:
        out: dict[str, Destination] = {}
        if t is None:
            return out
        for name, sub in t.subtables():
            if sub is None:
                continue
            before = len(self.problems)
            if not _FOLDER_ID.match(name):
                self.error(
                    sub.key,
                    f"invalid destination name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . - "
                    "(not starting with '.' or '-')",
                )
            if "kind" not in sub.data:
                self.error((*sub.key, "kind"), 'missing kind ("dicom" or "dicomweb")')
                continue
            kind = sub.choice("kind", DestinationKind, DestinationKind.DICOM)
            if len(self.problems) != before:
                continue
            sub.check_keys(_DESTINATION_KEYS[kind])
            d = Destination(name=name, kind=kind)
            common = {
                "timeout_seconds": sub.number(
                    "timeout_seconds", d.timeout_seconds, minimum=0.0, exclusive=True
                ),
                "retries": sub.integer("retries", d.retries, minimum=0, maximum=100),
                "backoff_seconds": sub.number("backoff_seconds", d.backoff_seconds, minimum=0.0),
                "batch_size": sub.integer("batch_size", d.batch_size, minimum=1, maximum=10000),
            }
            if kind is DestinationKind.DICOM:
                dest = self.dicom_destination(sub, d, common)
            else:
                dest = self.dicomweb_destination(sub, d, common)
            if len(self.problems) == before:
                out[name] = dest
        return out

    def ae_title(self, t: _Table, name: str, default: str, *, required: bool) -> str:
        value = t.string(name, default, required=required)
        if (
            name in t.data
            and isinstance(t.data[name], str)
            and (not _AE_TITLE.match(value) or not value.strip())
        ):
            self.error(
                (*t.key, name),
                f"invalid AE title {value!r}: 1 to 16 printable ASCII characters, no "
                "backslash, not only spaces (PS3.5 Table 6.2-1)",
            )
        return value.strip()

    def dicom_destination(
        self, t: _Table, d: Destination, common: Mapping[str, float | int]
    ) -> Destination:
        host = t.string("host", "", required=True)
        if (
            "host" in t.data
            and isinstance(t.data["host"], str)
            and (not host.strip() or any(c.isspace() or not c.isprintable() for c in host))
        ):
            self.error((*t.key, "host"), f"expected a host name or address, got {host!r}")
        port = t.integer("port", 0, minimum=1, maximum=65535)
        if "port" not in t.data:
            self.error((*t.key, "port"), "missing port (the node's DICOM port, e.g. 104)")
        tls = t.boolean("tls", False)
        files = {n: t.optional_path(n) for n in ("ca_file", "cert_file", "key_file")}
        if not tls:
            for n in files:
                if n in t.data:
                    self.error((*t.key, n), f"{n} is used only with tls = true")
        if (files["cert_file"] is None) != (files["key_file"] is None):
            given, missing = (
                ("cert_file", "key_file")
                if files["key_file"] is None
                else ("key_file", "cert_file")
            )
            self.error((*t.key, given), f"{given} needs {missing} too (they go together)")
        return Destination(
            name=d.name,
            kind=d.kind,
            ae_title=self.ae_title(t, "ae_title", d.ae_title, required=False),
            called_ae=self.ae_title(t, "called_ae", "", required=True),
            host=host,
            port=port,
            tls=tls,
            ca_file=files["ca_file"],
            cert_file=files["cert_file"],
            key_file=files["key_file"],
            timeout_seconds=float(common["timeout_seconds"]),
            retries=int(common["retries"]),
            backoff_seconds=float(common["backoff_seconds"]),
            batch_size=int(common["batch_size"]),
        )

    def dicomweb_destination(
        self, t: _Table, d: Destination, common: Mapping[str, float | int]
    ) -> Destination:
        url = t.string("url", "", required=True)
        if "url" in t.data and isinstance(t.data["url"], str):
            m = re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", url)
            if m is None:
                self.error(
                    (*t.key, "url"),
                    f"expected an http:// or https:// URL without query (the STOW-RS base, "
                    f'e.g. "https://pacs.example.org/dicom-web"), got {url!r}',
                )
            elif "@" in url.split("/")[2]:
                self.error(
                    (*t.key, "url"),
                    "no credentials in the URL: put them in token_file or basic_auth_file",
                )
        token = t.optional_path("token_file")
        basic = t.optional_path("basic_auth_file")
        if token is not None and basic is not None:
            self.error((*t.key, "basic_auth_file"), "give token_file or basic_auth_file, not both")
        return Destination(
            name=d.name,
            kind=d.kind,
            url=url.rstrip("/"),
            token_file=token,
            basic_auth_file=basic,
            timeout_seconds=float(common["timeout_seconds"]),
            retries=int(common["retries"]),
            backoff_seconds=float(common["backoff_seconds"]),
            batch_size=int(common["batch_size"]),
        )

    # -- [daemon] --------------------------------------------------------------------------

    def daemon(self, t: _Table | None) -> DaemonConfig:
        d = DaemonConfig()
        if t is None:
            return d
        t.check_keys(_DAEMON_KEYS)
        out = DaemonConfig(
            mountpoint=t.path("mountpoint", d.mountpoint),
            export_dir=t.path("export_dir", d.export_dir),
            state_dir=t.path("state_dir", d.state_dir),
            metrics_address=self.metrics_address(t, d.metrics_address),
            control_socket=t.path("control_socket", d.control_socket),
            allow_other=t.boolean("allow_other", d.allow_other),
            settle_seconds=t.number("settle_seconds", d.settle_seconds, minimum=0.0),
            reconcile_seconds=t.number("reconcile_seconds", d.reconcile_seconds, minimum=0.0),
            poll_seconds=t.number("poll_seconds", d.poll_seconds, minimum=0.0, exclusive=True),
            cache_mib=t.integer("cache_mib", d.cache_mib, minimum=1),
            workers=t.integer("workers", d.workers, minimum=1, maximum=_MAX_WORKERS),
            max_header_mib=t.integer("max_header_mib", d.max_header_mib, minimum=1),
            parse_timeout_seconds=t.number(
                "parse_timeout_seconds", d.parse_timeout_seconds, minimum=0.0, exclusive=True
            ),
        )
        for name, other in (("export_dir", out.export_dir), ("state_dir", out.state_dir)):
            if _overlaps(out.mountpoint, other):
                at = "mountpoint" if "mountpoint" in t.data else name
                self.error(
                    (*t.key, at),
                    f"the mount point ({out.mountpoint}) must not be, contain or lie inside "
                    f"{name} ({other})",
                )
        return out

    def metrics_address(self, t: _Table, default: str) -> str:
        value = t.string("metrics_address", default)
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if (
            not sep
            or not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
            or (":" in host and not bracketed)
        ):
            self.error(
                (*t.key, "metrics_address"),
                f'expected "host:port" (e.g. "127.0.0.1:9464", "[::1]:9464") or "" to turn '
                f"metrics off, got {value!r}",
            )
            return default
        return value

    # -- [profiles.*] ----------------------------------------------------------------------

    def profiles(self, t: _Table | None) -> tuple[dict[str, Profile], set[str]]:
        """Built-ins and config profiles; also the names of config profiles that failed."""
        result: dict[str, Profile] = dict(BUILTIN_PROFILES)
        broken: set[str] = set()
        if t is None:
            return result, broken
        specs: dict[str, _ProfileSpec] = {}
        for name, sub in t.subtables():
            spec = self.profile_spec(name, sub) if sub is not None else None
            if spec is None and name not in BUILTIN_PROFILES:
                broken.add(name)  # a rejected redefinition leaves the built-in in place
            if spec is not None:
                specs[name] = spec
        resolver = _Resolver(self, specs, broken)
        for name in specs:
            profile = resolver.resolve(name, ())
            if profile is not None:
                result[name] = profile
        return result, broken | resolver.failed

    def profile_spec(self, name: str, t: _Table) -> _ProfileSpec | None:
        before = len(self.problems)
        builtin = [b for b in BUILTIN_PROFILES if b.casefold() == name.casefold()]
        if builtin:
            self.error(
                t.key,
                f"{builtin[0]!r} is a built-in profile and cannot be redefined; derive your "
                f"own instead, e.g. [profiles.My{builtin[0].lstrip('+')}] with "
                f'base = "{builtin[0]}"',
            )
        elif (
            not name.strip()
            or "/" in name
            or not name.isprintable()
            or len(name) > _MAX_PROFILE_NAME
        ):
            self.error(
                t.key,
                f"invalid profile name {name!r}: 1 to {_MAX_PROFILE_NAME} printable "
                "characters, no '/'",
            )
        t.check_keys(_PROFILE_KEYS)
        add_options, remove_options = self.options(t)
        add_disabled, remove_disabled = self.disabled(t)
        add_accepted, remove_accepted = self.tag_list(t, "accepted")
        rules = self.rules(t)
        masks = self.masks(t) if "masks" in t.data else None
        max_age: int | _Missing | None = _MISSING
        if "max_age" in t.data:
            age = t.integer("max_age", 0, minimum=0, maximum=149)
            max_age = age or None
        spec = _ProfileSpec(
            name=name,
            base=t.string("base", DEFAULT_BASE),
            comment=t.string("comment", ""),
            enabled=t.boolean("enabled", True),
            apply_masks=t.boolean("apply_masks", False) if "apply_masks" in t.data else None,
            add_options=add_options,
            remove_options=remove_options,
            add_disabled=add_disabled,
            remove_disabled=remove_disabled,
            rules=rules,
            masks=masks,
            date_modification=(
                t.choice("date_modification", DateModification, DateModification.SHIFT)
                if "date_modification" in t.data
                else None
            ),
            max_age=max_age,
            add_accepted=add_accepted,
            remove_accepted=remove_accepted,
        )
        return spec if len(self.problems) == before else None

    def options(self, t: _Table) -> tuple[frozenset[Option], frozenset[Option]]:
        add: set[Option] = set()
        remove: set[Option] = set()
        names = [o.value for o in Option]
        for key, text in t.strings("options"):
            removing = text.startswith("-")
            name = text[1:] if removing else text
            try:
                option = Option(name)
            except ValueError:
                self.error(
                    key,
                    f"unknown option {name!r}{_did_you_mean(name, names)}; options are: "
                    + ", ".join(names),
                )
                continue
            (remove if removing else add).add(option)
        for option in add & remove:
            self.error((*t.key, "options"), f"{option.value!r} is both added and removed")
        dates = {Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}
        if dates <= add:
            self.error(
                (*t.key, "options"),
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                "exclude each other",
            )
        return frozenset(add), frozenset(remove)

    def disabled(self, t: _Table) -> tuple[frozenset[int], frozenset[int]]:
        return self.tag_list(t, "disabled")

    def tag_list(self, t: _Table, name: str) -> tuple[frozenset[int], frozenset[int]]:
        """A list of tags (``disabled``, ``accepted``): those added to the base profile's,
        and those (written ``-TAG``) taken from it."""
        add: set[int] = set()
        remove: set[int] = set()
        for key, text in t.strings(name):
            removing = text.startswith("-")
            try:
                tag = parse_tag(text[1:] if removing else text)
            except ProfileError as exc:
                self.error(key, str(exc))
                continue
            (remove if removing else add).add(tag)
        for tag in add & remove:
            self.error((*t.key, name), f"{format_tag(tag)} is both added and removed")
        return frozenset(add), frozenset(remove)

    def rules(self, t: _Table) -> tuple[Rule, ...]:
        if "rules" in t.data and "rules_file" in t.data:
            self.error(
                (*t.key, "rules_file"),
                "give either rules or rules_file, not both (rules_file replaces the rules)",
            )
            return ()
        if "rules_file" in t.data:
            return self.rules_file(t)
        rules: list[Rule] = []
        seen: dict[int, int] = {}
        for i, item in enumerate(t.tables("rules")):
            if item is None:
                continue
            item.check_keys(_RULE_KEYS)
            id_text = item.string("id", "", required=True)
            act_text = item.string("act", "", required=True)
            note = item.string("note", "")
            if not id_text or not act_text:
                continue
            try:
                tag = parse_tag(id_text)
            except ProfileError as exc:
                self.error((*item.key, "id"), str(exc))
                continue
            try:
                parse_act(act_text)
            except ProfileError as exc:
                self.error((*item.key, "act"), str(exc))
                continue
            if tag in seen:
                self.error(
                    (*item.key, "id"),
                    f"a second rule for {format_tag(tag)} (first: rules[{seen[tag]}])",
                )
                continue
            seen[tag] = i
            rules.append(Rule.parse(id_text, act_text, note))
        return tuple(rules)

    def rules_file(self, t: _Table) -> tuple[Rule, ...]:
        path = t.optional_path("rules_file")
        if path is None:
            return ()
        key = (*t.key, "rules_file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.error(key, f"rules file {path} not found")
            return ()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.error(key, f"cannot read rules file {path}: {reason}")
            return ()
        try:
            return rules_from_json(text)
        except ProfileError as exc:
            self.error(key, f"rules file {path}: {exc}")
            return ()

    def masks(self, t: _Table) -> tuple[Mask, ...]:
        masks: list[Mask] = []
        for item in t.tables("masks"):
            if item is None:
                continue
            before = len(self.problems)
            item.check_keys(_MASK_KEYS)
            rects = self.rects(item)
            modality = item.string("modality", "") or None
            manufacturer = item.string("manufacturer", "") or None
            model = item.string("model", "") or None
            rows = item.integer("rows", 0, minimum=1) if "rows" in item.data else None
            columns = item.integer("columns", 0, minimum=1) if "columns" in item.data else None
            enabled = item.boolean("enabled", True)
            if len(self.problems) > before:
                continue
            masks.append(
                Mask(
                    rects=rects,
                    modality=modality,
                    manufacturer=manufacturer,
                    model=model,
                    rows=rows,
                    columns=columns,
                    enabled=enabled,
                )
            )
        return tuple(masks)

    def rects(self, mask: _Table) -> tuple[Rect, ...]:
        key = (*mask.key, "rects")
        raw = mask.data.get("rects", _MISSING)
        if isinstance(raw, _Missing):
            self.error(key, "missing rects: a mask needs rects = [[left, top, width, height], ...]")
            return ()
        if not isinstance(raw, list) or not raw:
            self.error(key, "expected a non-empty array of [left, top, width, height]")
            return ()
        rects: list[Rect] = []
        for i, item in enumerate(raw):
            ikey = (*key, i)
            if isinstance(item, dict):
                sub = _Table(self, ikey, item)
                sub.check_keys(_RECT_KEYS)
                numbers: list[object] = [item.get(k, _MISSING) for k in _RECT_KEYS]
            elif isinstance(item, list) and len(item) == 4:
                numbers = list(item)
            else:
                self.error(ikey, "expected [left, top, width, height] or a table of those")
                continue
            ints = [n for n in numbers if isinstance(n, int) and not isinstance(n, bool)]
            if len(ints) != len(_RECT_KEYS):
                self.error(ikey, "left, top, width and height must all be given as integers")
                continue
            left, top, width, height = ints
            try:
                rects.append(Rect(left, top, width, height))
            except ProfileError as exc:
                self.error(ikey, str(exc))
        return tuple(rects)

    # -- [folders.*] -----------------------------------------------------------------------

    def folders(
        self,
        t: _Table | None,
        daemon: DaemonConfig,
        profiles: Mapping[str, Profile],
        broken: Collection[str],
    ) -> dict[str, FolderConfig]:
        folders: dict[str, FolderConfig] = {}
        paths: dict[str, Path] = {}  # every folder's path, valid folder or not
        if t is None:
            return folders
        for fid, sub in t.subtables():
            if sub is None:
                continue
            before = len(self.problems)
            if not _FOLDER_ID.match(fid):
                self.error(
                    sub.key,
                    f"invalid folder id {fid!r}: it names a directory in the mount, so use "
                    "1 to 64 of A-Z a-z 0-9 _ . - (not starting with '.' or '-')",
                )
            sub.check_keys(_FOLDER_KEYS)
            path = sub.optional_path("path", required=True)
            profile = sub.string("profile", DEFAULT_PROFILE)
            layout = sub.choice("layout", Layout, Layout.DICOM)
            watch = sub.choice("watch", WatchMode, WatchMode.AUTO)
            self.folder_profile(sub, profile, profiles, broken)
            if path is not None:
                self.folder_path(sub, fid, path, daemon, paths)
                paths[fid] = path
            if len(self.problems) == before and path is not None:
                folders[fid] = FolderConfig(
                    id=fid, path=path, profile=profile, layout=layout, watch=watch
                )
        return folders

    def folder_profile(
        self, t: _Table, name: str, profiles: Mapping[str, Profile], broken: Collection[str]
    ) -> None:
        if name in broken:
            return  # its own errors are reported where it is defined
        profile = profiles.get(name)
        if profile is None and "profile" not in t.data:
            self.error(
                (*t.key, "profile"),
                f"no profile given and the default profile {DEFAULT_PROFILE!r} is not "
                f'defined: set profile = "..." or add [profiles.{DEFAULT_PROFILE}] with '
                f'base = "{DEFAULT_BASE}"',
            )
        elif profile is None:
            known = [*profiles, *sorted(broken)]
            self.error(
                (*t.key, "profile"),
                f"unknown profile {name!r}{_did_you_mean(name, known)}; profiles are: "
                + ", ".join(known),
            )
        elif not profile.enabled:
            self.error(
                (*t.key, "profile"),
                f"profile {name!r} is disabled (enabled = false); a folder is never served "
                "with a disabled profile",
            )

    def folder_path(
        self,
        t: _Table,
        fid: str,
        path: Path,
        daemon: DaemonConfig,
        earlier: Mapping[str, Path],
    ) -> None:
        key = (*t.key, "path")
        for name in ("mountpoint", "export_dir", "state_dir"):
            other: Path = getattr(daemon, name)
            if _overlaps(path, other):
                self.error(
                    key,
                    f"folder {fid!r} ({path}) must not be, contain or lie inside "
                    f"daemon.{name} ({other})",
                )
        for other_id, other_path in earlier.items():
            if _overlaps(path, other_path):
                how = "the same path as" if path == other_path else "nested with"
                self.error(
                    key,
                    f"folder {fid!r} ({path}) is {how} folder {other_id!r} ({other_path}); "
                    "a file must belong to one folder",
                )


class _Table:
    """A table of the document with typed getters that report problems at their key."""

    def __init__(self, checker: _Checker, key: Key, data: dict[str, object]) -> None:
        self.checker = checker
        self.key = key
        self.data = data

    def _err(self, name: str | int, message: str) -> None:
        self.checker.error((*self.key, name), message)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for name in self.data:
            if name not in allowed:
                self._err(
                    name,
                    f"unknown key{_did_you_mean(name, allowed)}; allowed here: "
                    + ", ".join(allowed),
                )

    def _get(self, name: str, expected: str, required: bool) -> object:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing) and required:
            self._err(name, f"missing {name} ({expected})")
        return value

    def _wrong(self, name: str, expected: str, value: object) -> None:
        self._err(name, f"expected {expected}, got {_type_name(value)} {value!r}")

    def table(self, name: str) -> _Table | None:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return None
        if not isinstance(value, dict):
            self._wrong(name, "a table", value)
            return None
        return _Table(self.checker, (*self.key, name), value)

    def subtables(self) -> list[tuple[str, _Table | None]]:
        """Each ``[<this>.<name>]`` table; ``None`` (reported) where the value is no table."""
        out: list[tuple[str, _Table | None]] = []
        for name, value in self.data.items():
            if isinstance(value, dict):
                out.append((name, _Table(self.checker, (*self.key, name), value)))
            else:
                self._wrong(name, f"a table [{dotted((*self.key, name))}]", value)
                out.append((name, None))
        return out

    def tables(self, name: str) -> list[_Table | None]:
        """An array of tables (inline or ``[[...]]``); ``None`` for reported bad items."""
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return []
        if not isinstance(value, list):
            self._wrong(name, "an array of tables", value)
            return []
        out: list[_Table | None] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append(_Table(self.checker, (*self.key, name, i), item))
            else:
                self.checker.error(
                    (*self.key, name, i), f"expected a table, got {_type_name(item)} {item!r}"
                )
                out.append(None)
        return out

    def strings(self, name: str) -> list[tuple[Key, str]]:
        """An array of strings, each with its key; bad items are reported and skipped."""
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return []
        if not isinstance(value, list):
            self._wrong(name, "an array of strings", value)
            return []
        out: list[tuple[Key, str]] = []
        for i, item in enumerate(value):
            key = (*self.key, name, i)
            if isinstance(item, str) and item.strip():
                out.append((key, item.strip()))
            else:
                self.checker.error(key, f"expected a non-empty string, got {item!r}")
        return out

    def string(self, name: str, default: str, *, required: bool = False) -> str:
        value = self._get(name, "a string", required)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, str):
            self._wrong(name, "a string", value)
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            self._wrong(name, "true or false", value)
            return default
        return value

    def number(
        self, name: str, default: float, *, minimum: float, exclusive: bool = False
    ) -> float:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong(name, "a number of seconds", value)
            return default
        number = float(value)
        too_small = number <= minimum if exclusive else number < minimum
        if not math.isfinite(number) or too_small:
            bound = f"greater than {minimum:g}" if exclusive else f"at least {minimum:g}"
            self._err(name, f"must be a finite number {bound}, got {value!r}")
            return default
        return number

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(name, "an integer", value)
            return default
        if value < minimum or (maximum is not None and value > maximum):
            span = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            self._err(name, f"must be {span}, got {value}")
            return default
        return value

    def choice(self, name: str, enum: type[_E], default: _E) -> _E:
        value = self.data.get(name, _MISSING)
        if isinstance(value, _Missing):
            return default
        names = [str(m.value) for m in enum]
        if not isinstance(value, str):
            self._wrong(name, "one of " + ", ".join(f'"{n}"' for n in names), value)
            return default
        for member in enum:
            if member.value == value:
                return member
        self._err(
            name,
            f"unknown {name} {value!r}{_did_you_mean(value, names)}; one of: " + ", ".join(names),
        )
        return default

    def path(self, name: str, default: Path) -> Path:
        """An absolute path; a relative one is taken from the configuration file's directory."""
        found = self.optional_path(name)
        return default if found is None else found

    def optional_path(self, name: str, *, required: bool = False) -> Path | None:
        """As :meth:`path`; ``None`` when absent (reported if ``required``) or invalid."""
        value = self._get(name, "a path", required)
        default = None
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, str) or not value or "\x00" in value:
            self._wrong(name, "a non-empty path string", value)
            return default
        return Path(os.path.normpath(self.checker.base_dir / value))


class _Resolver:
    """Resolves profile inheritance (``base``) in dependency order, detecting cycles."""

    def __init__(
        self, checker: _Checker, specs: Mapping[str, _ProfileSpec], broken: Collection[str]
    ) -> None:
        self.checker = checker
        self.specs = specs
        self.broken = broken
        self.done: dict[str, Profile] = dict(BUILTIN_PROFILES)
        self.failed: set[str] = set()

    def resolve(self, name: str, chain: tuple[str, ...]) -> Profile | None:
        if name in self.done:
            return self.done[name]
        if name in self.failed:
            return None
        spec = self.specs[name]
        base_key: Key = ("profiles", name, "base")
        if spec.base in (*chain, name):
            loop = (*chain, name)
            cycle = " -> ".join([*loop[loop.index(spec.base) :], spec.base])
            self.checker.error(base_key, f"base profiles form a cycle: {cycle}")
            self.failed.add(name)
            return None
        if spec.base in self.broken:
            self.failed.add(name)  # the base's own errors are reported where it is defined
            return None
        if spec.base not in self.specs and spec.base not in self.done:
            known = [*BUILTIN_PROFILES, *(n for n in self.specs if n != name)]
            self.checker.error(
                base_key,
                f"unknown base profile {spec.base!r}{_did_you_mean(spec.base, known)}; "
                "profiles are: " + ", ".join(known),
            )
            self.failed.add(name)
            return None
        base = self.resolve(spec.base, (*chain, name))
        if base is None:
            self.failed.add(name)
            return None
        profile = self.merge(spec, base)
        if profile is None:
            self.failed.add(name)
        else:
            self.done[name] = profile
        return profile

    def merge(self, spec: _ProfileSpec, base: Profile) -> Profile | None:
        """Derive ``spec`` from ``base``: unset fields inherited, lists added or removed."""
        own = {rule.tag for rule in spec.rules}
        rules = (*(r for r in base.rules if r.tag not in own), *spec.rules)
        options = (base.options | spec.add_options) - spec.remove_options
        try:
            return Profile(
                name=spec.name,
                base=base.name,
                comment=spec.comment,
                enabled=spec.enabled,
                apply_masks=base.apply_masks if spec.apply_masks is None else spec.apply_masks,
                options=options,
                disabled=(base.disabled | spec.add_disabled) - spec.remove_disabled,
                rules=rules,
                masks=base.masks if spec.masks is None else spec.masks,
                date_modification=(
                    base.date_modification
                    if spec.date_modification is None
                    else spec.date_modification
                ),
                max_age=base.max_age if isinstance(spec.max_age, _Missing) else spec.max_age,
                accepted=(base.accepted | spec.add_accepted) - spec.remove_accepted,
            )
        except ProfileError as exc:
            # Only combinations across the inheritance chain get here (e.g. both longitudinal
            # date options, one inherited): say which profile the other came from.
            self.checker.error(
                ("profiles", spec.name, "options"), f"{exc} (after inheriting from {base.name!r})"
            )
            return None
