"""Edits of the configuration file that keep the admin's comments and formatting.

The configuration is a hand-edited TOML file, so ``deidfs profile ...`` and ``deidfs folder
...`` change it the way a careful admin would: through tomlkit, touching only the table an
edit is about. Every comment, blank line and odd-but-valid spelling elsewhere survives byte
for byte.

Where new tables and keys go so that comments stay with the header they describe is
:mod:`deidfs.config.edit_tree`; the edits of folders and destinations are in
:mod:`deidfs.config.edit_folders` and :mod:`deidfs.config.edit_destinations`.

:func:`edit_config` is the transaction: lock ``<config>.lock``, read, edit, check that the
rendered text re-reads as exactly the edited document and that nothing outside the edited
tables changed, validate the whole result, write it atomically, return the diff.

This module does no validation of its own beyond that: the caller passes the configuration
loader as ``validate``, so a refused edit gives the same messages as ``check-config`` (and
the edit modules, siblings of :mod:`deidfs.config.model` and its checks, do not import them).
"""

from __future__ import annotations

import copy
import difflib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tomlkit
from tomlkit.exceptions import ParseError, TOMLKitError
from tomlkit.items import (
    AoT,
    Array,
    InlineTable,
    Item,
    Null,
    Table,
)
from tomlkit.toml_document import TOMLDocument

from deidfs.config.edit_tree import (
    append_table,
    find_table,
    has_table,
    inline,
    new_table,
    remove_table,
    set_key,
    string_array,
)
from deidfs.deid.profiles import (
    ACT_WORDS,
    BUILTIN_PROFILES,
    Profile,
    Rule,
    parse_act,
    rules_from_json,
)
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.errors import ConfigError, DeidfsError, NotFound, ProfileError

#: How long an edit waits for another edit's lock before giving up (exit 75).
LOCK_TIMEOUT = 2.0
_LOCK_POLL = 0.05

#: A path into the document, as table names: ``("profiles", "Nominal")``.
TablePath = tuple[str, ...]


class ConfigBusy(DeidfsError):
    """Another edit holds the configuration lock, or the file changed during the edit."""

    exit_code = os.EX_TEMPFAIL


class NoPermission(DeidfsError):
    """The configuration cannot be read, or rewritten with its owner and group kept."""

    exit_code = os.EX_NOPERM


# --------------------------------------------------------------------------------------------
# What the caller's loader gives back


class FolderLike(Protocol):
    """What an edit needs to know of a folder of the current configuration."""

    @property
    def profile(self) -> str: ...


class ConfigLike(Protocol):
    """What an edit needs to know of the current configuration (a ``config.Config``)."""

    @property
    def profiles(self) -> Mapping[str, Profile]: ...

    @property
    def folders(self) -> Mapping[str, FolderLike]: ...


#: Validates a whole configuration text; raises :class:`~deidfs.errors.ConfigError`.
Validator = Callable[[str], ConfigLike]


@dataclass(frozen=True, slots=True)
class EditContext:
    """The current configuration as the loader sees it, for edits that depend on it.

    ``current`` is ``None`` when the file on disk is already invalid; ``problem`` then says
    why, and edits that need the resolved profiles refuse with it.
    """

    path: Path
    current: ConfigLike | None
    problem: ConfigError | None = None

    def profile(self, name: str) -> Profile:
        """The resolved profile ``name`` (built-ins included)."""
        if self.current is None:
            builtin = BUILTIN_PROFILES.get(name)
            if builtin is not None:
                return builtin
            raise ConfigError(
                f"cannot resolve profile {name!r} because the configuration is invalid; "
                f"fix it first:\n{_indent(str(self.problem))}",
                path=str(self.path),
            )
        profile = self.current.profiles.get(name)
        if profile is None:
            raise NotFound(f"no profile named {name!r}")
        return profile

    def folders_using(self, name: str) -> list[str]:
        """Ids of the folders bound to profile ``name``."""
        if self.current is None:
            return []
        return sorted(fid for fid, f in self.current.folders.items() if f.profile == name)

    def derived_from(self, name: str) -> list[str]:
        """Names of the profiles whose ``base`` is ``name``."""
        if self.current is None:
            return []
        return sorted(
            p.name
            for p in self.current.profiles.values()
            if p.base == name and not p.builtin and p.name != name
        )


#: An edit: changes the document in place and returns the paths it meant to change.
Edit = Callable[[TOMLDocument, EditContext], Sequence[TablePath]]


@dataclass(frozen=True, slots=True)
class EditResult:
    """The outcome of :func:`edit_config`."""

    path: Path
    before: str
    after: str
    written: bool

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def diff(self) -> str:
        return unified_diff(self.before, self.after, self.path)


# --------------------------------------------------------------------------------------------
# The transaction


def unified_diff(before: str, after: str, path: Path) -> str:
    """A unified diff of two versions of the file at ``path`` (empty when equal)."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"{path} (before)",
        tofile=f"{path} (after)",
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def apply_edit(text: str, path: Path, edit: Edit, validate: Validator) -> str:
    """Apply ``edit`` to the configuration ``text`` and return the validated new text.

    Raises
    ------
    ConfigError
        The text is not TOML, the edit is refused, or its result would be invalid.
    NotFound
        The edit names a profile, folder or rule that does not exist.
    """
    # Work on "\n" line ends: what tomlkit writes for new lines. A file with CRLF line ends
    # throughout gets them back.
    crlf = "\r\n" in text and text.count("\r\n") == text.count("\n")
    source = text.replace("\r\n", "\n") if crlf else text
    doc = _parse(source, path)
    try:
        context = EditContext(path, validate(text))
    except ConfigError as exc:
        context = EditContext(path, None, exc)
    try:
        touched = edit(doc, context)
    except ConfigError as exc:
        if exc.path is not None:
            raise
        raise ConfigError(f"refused, nothing written: {exc.reason}", path=str(path)) from None
    after = doc.as_string()
    if after == source:
        return text
    _verify(source, after, doc, touched, path)
    if crlf:
        after = after.replace("\n", "\r\n")
    try:
        validate(after)
    except ConfigError as exc:
        why = (
            "the configuration is already invalid and this edit does not fix it"
            if context.problem is not None
            else "the result would be invalid"
        )
        raise ConfigError(
            f"refused, nothing written: {why}:\n{_indent(_problems(exc))}", path=str(path)
        ) from None
    return after


def edit_config(
    path: Path,
    edit: Edit,
    validate: Validator,
    *,
    dry_run: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
) -> EditResult:
    """Edit the configuration file at ``path`` under its lock and write it atomically.

    Parameters
    ----------
    path
        The configuration file; a symbolic link is followed and its target replaced.
    edit
        Changes the parsed document (see :data:`Edit`).
    validate
        The configuration loader, ``lambda text: parse_config(text, path)``.
    dry_run
        Compute the result and its diff, write nothing (and take no lock).
    lock_timeout
        Seconds to wait for the lock held by another edit.

    Raises
    ------
    ConfigError
        Missing file (exit 66), refused or invalid edit (exit 78); nothing is written.
    ConfigBusy
        The lock is held (exit 75), or the file changed while it was being edited.
    """
    real = Path(os.path.realpath(path))
    if dry_run:
        before = _read(real, path)
        after = apply_edit(before, path, edit, validate)
        return EditResult(path, before, after, written=False)
    with config_lock(real, lock_timeout):
        before = _read(real, path)
        st = os.stat(real)
        after = apply_edit(before, path, edit, validate)
        if after == before:
            return EditResult(path, before, after, written=False)
        # Someone may have saved the file by hand (without the lock) meanwhile.
        if _read(real, path) != before:
            raise ConfigBusy(f"{path}: the file changed while it was being edited; try again")
        write_atomically(real, after, st)
    return EditResult(path, before, after, written=True)


@contextmanager
def config_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (created if missing, never removed).

    Raises
    ------
    ConfigBusy
        When the lock is still held by another process after ``timeout`` seconds.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _missing(path) from None
    # Never removed: unlinking a lock file lets two editors lock two different inodes.
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        # Whoever may read the configuration may lock it (flock needs only a read-only
        # open); nobody else can hold edits up.
        with suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, st.st_mode & 0o640)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigBusy(
                        f"{path}: another edit holds {lock_path.name}; try again"
                    ) from None
                time.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, like: os.stat_result) -> None:
    """Replace ``path`` by ``text`` atomically, keeping the mode, owner and group of ``like``.

    A temporary file in the same directory is written, flushed to disk, given the original's
    mode and ownership, renamed over ``path``, and the directory is flushed, so a crash
    leaves either the old or the new file, never a mix.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fchmod(f.fileno(), like.st_mode & 0o7777)
            if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
                except PermissionError:
                    raise NoPermission(
                        f"{path}: cannot keep its owner and group (uid {like.st_uid}, gid "
                        f"{like.st_gid}); edit it as root or as its owner"
                    ) from None
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConfigMissing(ConfigError):
    """The configuration file does not exist or cannot be read (EX_NOINPUT)."""

    exit_code = os.EX_NOINPUT


def _missing(path: Path) -> ConfigError:
    return ConfigMissing("configuration file not found", path=str(path))


def _read(real: Path, shown: Path) -> str:
    try:
        data = real.read_bytes()
    except FileNotFoundError:
        raise _missing(shown) from None
    except PermissionError as exc:
        raise NoPermission(f"{shown}: cannot read: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigMissing(f"cannot read: {exc.strerror}", path=str(shown)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=str(shown)) from None


def read_document(path: Path) -> TOMLDocument:
    """Read and parse the configuration file at ``path`` (no validation, no lock)."""
    return _parse(_read(Path(os.path.realpath(path)), path), path)


def _parse(text: str, path: Path) -> TOMLDocument:
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=str(path), line=exc.line) from None
    except TOMLKitError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=str(path)) from None


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _problems(exc: ConfigError) -> str:
    """The loader's problems by key (line numbers would point into the unwritten text)."""
    errors: Sequence[ConfigError] = getattr(exc, "errors", (exc,))
    return "\n".join(f"{e.key}: {e.reason}" if e.key else e.reason for e in errors)


def _verify(
    before: str, after: str, doc: TOMLDocument, touched: Sequence[TablePath], path: Path
) -> None:
    """Check that ``after`` re-reads as ``doc`` and differs from ``before`` only at ``touched``.

    A guard against rendering surprises: a key that would land in the wrong table, a
    comment that would turn a header-less table into a header. Nothing is written if so.
    """
    try:
        reread = tomlkit.parse(after).unwrap()
    except TOMLKitError as exc:
        raise ConfigError(f"internal error: the edit renders as invalid TOML ({exc})") from None
    old = tomlkit.parse(before).unwrap()
    new = doc.unwrap()
    # An implicit [folders] or [profiles] left empty renders as nothing: the same config.
    for data in (old, reread, new):
        for key in [k for k, v in data.items() if v == {}]:
            del data[key]
    if reread != new:
        raise ConfigError(
            "internal error: the edited file would not read back as edited; nothing written",
            path=str(path),
        )
    for p in touched:
        _drop(old, p)
        _drop(new, p)
    if old != new:
        raise ConfigError(
            "internal error: the edit would change more than it should; nothing written",
            path=str(path),
        )


def _drop(data: dict[str, Any], path: TablePath) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # A section emptied or created by the edit counts as touched too.
    if len(path) > 1 and isinstance(data.get(path[0]), dict) and not data[path[0]]:
        del data[path[0]]


def _rule_pairs(rule: Rule) -> list[tuple[str, str]]:
    return list(rule.to_json().items())


def _rules_array(rules: Sequence[Rule]) -> Array:
    arr = tomlkit.array()
    for rule in rules:
        arr.append(inline(_rule_pairs(rule)))
    arr.multiline(True)
    return arr


# --------------------------------------------------------------------------------------------
# Reading a profile table as written


def _profile_table(doc: TOMLDocument, name: str) -> Table | InlineTable:
    if name in BUILTIN_PROFILES:
        raise ConfigError(
            f"{name!r} is a built-in profile and cannot be changed; copy it first "
            f"(deidfs profile copy {name} NEW)"
        )
    try:
        _, item = find_table(doc, "profiles", name)
    except KeyError:
        raise NotFound(f"no profile named {name!r} in the configuration") from None
    if not isinstance(item, Table | InlineTable):
        raise ConfigError(f"profiles.{name} is not a table", key=f"profiles.{name}")
    return item


def own_rules(doc: TOMLDocument, name: str, config_dir: Path) -> tuple[Rule, ...]:
    """The custom rules profile ``name`` defines itself (``rules`` or ``rules_file``).

    Inherited rules are not included: these are what ``rules-export`` saves and
    ``rules-import`` replaces. A built-in profile has none.
    """
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name].rules
    table = _profile_table(doc, name)
    data = table.unwrap()
    if "rules_file" in data:
        rules_path = config_dir / str(data["rules_file"])
        try:
            return rules_from_json(rules_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read rules file {rules_path}: {exc.strerror}",
                key=f"profiles.{name}.rules_file",
            ) from None
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError("rules must be an array", key=f"profiles.{name}.rules")
    out = []
    for item in rules:
        if not isinstance(item, dict):
            raise ConfigError("rules must be tables", key=f"profiles.{name}.rules")
        out.append(
            Rule.parse(str(item.get("id", "")), str(item.get("act", "")), item.get("note", ""))
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Profile edits


def _check_new_name(doc: TOMLDocument, name: str) -> None:
    if any(b.casefold() == name.casefold() for b in BUILTIN_PROFILES):
        raise ConfigError(f"{name!r} is the name of a built-in profile; choose another name")
    if has_table(doc, "profiles", name):
        raise ConfigError(f"a profile named {name!r} already exists")
    try:
        Profile(name=name)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None


def add_profile(name: str, base: str = "Basic", comment: str = "") -> Edit:
    """Edit: add ``[profiles.<name>]`` with ``base`` and ``comment``."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _check_new_name(doc, name)
        if not has_table(doc, "profiles", base) and base not in BUILTIN_PROFILES:
            raise NotFound(f"no profile named {base!r} to use as base")
        pairs: list[tuple[str, Any]] = [("base", base)]
        if comment:
            pairs.append(("comment", comment))
        append_table(doc, "profiles", name, new_table(pairs))
        return [("profiles", name)]

    return edit


def _explicit_pairs(profile: Profile, comment: str | None) -> list[tuple[str, Any]]:
    """Every setting of a resolved profile, written out (for a copy of a built-in)."""
    pairs: list[tuple[str, Any]] = [
        ("base", "Basic"),
        ("comment", profile.comment if comment is None else comment),
        ("enabled", profile.enabled),
        ("apply_masks", profile.apply_masks),
        ("options", string_array(sorted(o.value for o in profile.options))),
        ("date_modification", profile.date_modification.value),
    ]
    if profile.max_age is not None:
        pairs.append(("max_age", profile.max_age))
    if profile.disabled:
        pairs.append(("disabled", string_array([format_tag(t) for t in sorted(profile.disabled)])))
    if profile.rules:
        pairs.append(("rules", _rules_array(profile.rules)))
    if profile.accepted:
        pairs.append(("accepted", string_array([format_tag(t) for t in sorted(profile.accepted)])))
    return pairs


def _mask_tables(profile: Profile) -> list[Table]:
    out = []
    for mask in profile.masks:
        t = tomlkit.table()
        for key in ("modality", "manufacturer", "model", "rows", "columns"):
            value = getattr(mask, key)
            if value is not None:
                t.append(key, value)
        if not mask.enabled:
            t.append("enabled", False)
        rects = tomlkit.array()
        for r in mask.rects:
            rects.append([r.left, r.top, r.width, r.height])
        t.append("rects", rects)
        out.append(t)
    return out


def copy_profile(source: str, name: str, comment: str | None = None) -> Edit:
    """Edit: add ``[profiles.<name>]`` as a copy of ``source``.

    A copy of a built-in has all its settings written out, so each can be edited; a copy of
    a configured profile repeats its keys as written (same base, same inheritance).
    """

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _check_new_name(doc, name)
        builtin = BUILTIN_PROFILES.get(source)
        if builtin is not None:
            table = new_table(_explicit_pairs(builtin, comment), _mask_tables(builtin))
        else:
            src = _profile_table(doc, source)
            pairs: list[tuple[str, Any]] = []
            masks: list[Table] = []
            for key, value in src.value.body:
                if key is None or isinstance(value, Null):
                    continue
                if isinstance(value, AoT) and key.key == "masks":
                    masks = [_plain_table(t) for t in value.body]
                    continue
                pairs.append((key.key, _copy_item(value)))
            if comment is not None:
                pairs = [(k, v) for k, v in pairs if k != "comment"]
                pairs.insert(1 if pairs and pairs[0][0] == "base" else 0, ("comment", comment))
            table = new_table(pairs, masks)
        append_table(doc, "profiles", name, table)
        return [("profiles", name)]

    return edit


def _copy_item(value: Item) -> Item:
    """A copy of a value with its inline comment, on a line of its own."""
    item = copy.deepcopy(value)
    item.trivia.indent = ""
    if "\n" not in item.trivia.trail:
        item.trivia.trail = "\n"
    return item


def _plain_table(source: Table) -> Table:
    t = tomlkit.table()
    for key, value in source.value.body:
        if key is None or isinstance(value, Null):
            continue
        t.append(key.key, _copy_item(value))
    return t


def delete_profile(name: str) -> Edit:
    """Edit: delete ``[profiles.<name>]``; refused while a folder or profile builds on it."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        _profile_table(doc, name)
        used = context.folders_using(name)
        if used:
            raise ConfigError(
                f"profile {name!r} is used by folder(s) {', '.join(used)}; bind them to "
                "another profile first (deidfs folder set-profile ID PROFILE)"
            )
        derived = context.derived_from(name)
        if derived:
            raise ConfigError(
                f"profile {name!r} is the base of {', '.join(derived)}; change their base first"
            )
        remove_table(doc, "profiles", name)
        return [("profiles", name)]

    return edit


def normalize_option(text: str) -> Option:
    """An option from its value or a close spelling (``retain-uids``, ``Retain UIDs``)."""
    key = text.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return Option(key)
    except ValueError:
        names = ", ".join(o.value for o in Option)
        raise ProfileError(f"unknown option {text!r}; options are: {names}") from None


def normalize_act(text: str) -> str:
    """A rule act as stored: words in lower case, PS3.15 codes in upper case."""
    act = parse_act(text)
    word = text.strip().lower()
    return word if word in ACT_WORDS else act.value


@dataclass(frozen=True, slots=True)
class ProfileChanges:
    """What ``deidfs profile edit`` changes; ``None`` and empty mean "leave as is"."""

    comment: str | None = None
    enabled: bool | None = None
    apply_masks: bool | None = None
    options: tuple[tuple[bool, Option], ...] = ()  #: (turn on?, option), in order
    disable: tuple[int, ...] = ()
    enable: tuple[int, ...] = ()
    rules: tuple[Rule, ...] = ()
    remove_rules: tuple[int, ...] = ()
    note: str | None = None  #: note for the rules added by this edit


def _entries(table: Table | InlineTable, key: str) -> list[str]:
    value = table.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be an array of strings")
    return [str(v) for v in value]


def _update_list(table: Table | InlineTable, key: str, wanted: list[str]) -> None:
    """Make array ``key`` hold ``wanted`` (kept entries first), editing it in place.

    Entries that stay keep their place and their comments; new ones are appended; an
    array left empty is removed with its key.
    """
    current = table.get(key)
    if not isinstance(current, Array):
        if wanted:
            set_key(table, key, string_array(wanted))
        return
    old = [str(v) for v in current]
    if old == wanted:
        return
    # Append first, remove last: tomlkit keeps the array's layout while it has items.
    have = set(old)
    for v in wanted:
        if v not in have:
            current.append(v)
            have.add(v)
    for i in reversed(range(len(old))):
        if old[i] not in wanted:
            del current[i]
    _drop_if_empty(table, key)


def _drop_if_empty(table: Table | InlineTable, key: str) -> None:
    """Remove an array left empty, unless a comment goes with it (``key = []  # why``)."""
    value = table.get(key)
    if isinstance(value, Array | AoT) and not len(value):
        if isinstance(value, Array) and ("#" in value.as_string() or value.trivia.comment):
            return
        del table[key]


def _signed_tag(text: str) -> tuple[bool, int]:
    removing = text.startswith("-")
    return removing, parse_tag(text[1:] if removing else text)


def edit_profile(name: str, changes: ProfileChanges) -> Edit:
    """Edit: change settings of ``[profiles.<name>]`` (see :class:`ProfileChanges`)."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        table = _profile_table(doc, name)
        if changes.comment is not None:
            set_key(table, "comment", changes.comment)
        # Written only where they change something: enabled defaults to true, apply_masks
        # is inherited from the base.
        if changes.enabled is not None and ("enabled" in table or not changes.enabled):
            set_key(table, "enabled", changes.enabled)
        if changes.apply_masks is not None and (
            "apply_masks" in table or _base_of(table, context).apply_masks != changes.apply_masks
        ):
            set_key(table, "apply_masks", changes.apply_masks)
        if changes.options:
            _edit_options(table, name, changes.options, context)
        if changes.disable or changes.enable:
            _edit_disabled(table, name, changes, context)
        if changes.rules or changes.remove_rules:
            _edit_rules(table, name, changes)
        return [("profiles", name)]

    return edit


def _base_of(table: Table | InlineTable, context: EditContext) -> Profile:
    base = table.get("base")
    base_name = str(base) if base is not None else "Basic"
    return context.profile(base_name)


def _edit_options(
    table: Table | InlineTable,
    name: str,
    options: Sequence[tuple[bool, Option]],
    context: EditContext,
) -> None:
    entries = _entries(table, "options")
    inherited = _base_of(table, context).options
    for on, option in options:
        plus, minus = option.value, "-" + option.value
        entries = [e for e in entries if e.strip() not in (plus, minus)]
        if on and option not in inherited:
            entries.append(plus)
        elif not on and option in inherited:
            entries.append(minus)
    del name
    _update_list(table, "options", entries)


def _edit_disabled(
    table: Table | InlineTable, name: str, changes: ProfileChanges, context: EditContext
) -> None:
    entries = _entries(table, "disabled")
    inherited = _base_of(table, context).disabled
    for tag, disable in [
        *((t, True) for t in changes.disable),
        *((t, False) for t in changes.enable),
    ]:
        kept = []
        for e in entries:
            try:
                _, t = _signed_tag(e)
            except ProfileError:
                kept.append(e)
                continue
            if t != tag:
                kept.append(e)
        entries = kept
        if disable and tag not in inherited:
            entries.append(format_tag(tag))
        elif not disable and tag in inherited:
            entries.append("-" + format_tag(tag))
    del name
    _update_list(table, "disabled", entries)


def _rule_tag(item: Any) -> int | None:
    try:
        return parse_tag(str(item.get("id", "")))
    except ProfileError:
        return None


def _edit_rules(table: Table | InlineTable, name: str, changes: ProfileChanges) -> None:
    if "rules_file" in table:
        raise ConfigError(
            f"profile {name!r} takes its rules from rules_file = {str(table['rules_file'])!r}: "
            "edit that JSON file, or replace it with deidfs profile rules-import"
        )
    current = table.get("rules")
    if current is None:
        current = tomlkit.array()
    if not isinstance(current, Array | AoT):
        raise ConfigError(f"profiles.{name}.rules must be an array of tables")
    for tag in changes.remove_rules:
        if not any(_rule_tag(item) == tag for item in current):
            raise NotFound(f"profile {name!r} has no custom rule for {format_tag(tag)}")
    if "rules" not in table:
        assert isinstance(current, Array)
        current.multiline(True)
        set_key(table, "rules", current)
        current = table["rules"]
    # Add and replace first, remove last: tomlkit keeps an array's layout (one rule per
    # line, trailing comma) when it still has an item to copy it from.
    for rule in changes.rules:
        found = [i for i, item in enumerate(current) if _rule_tag(item) == rule.tag]
        note = changes.note
        if note is None and found:
            note = str(current[found[0]].get("note", ""))
        pairs = _rule_pairs(
            Rule(rule.tag, rule.act, note or "", format_tag(rule.tag), rule.act_text)
        )
        if isinstance(current, AoT):
            if found:
                old = current[found[0]]
                for k in ("id", "act", "note"):
                    if k in old and k not in dict(pairs):
                        del old[k]
                for k, v in pairs:
                    set_key(old, k, v)
            else:
                t = tomlkit.table()
                for k, v in pairs:
                    t.append(k, v)
                current.append(t)
        elif found:
            current[found[0]] = inline(pairs)
        else:
            current.append(inline(pairs))
    gone = set(changes.remove_rules)
    for i in reversed(range(len(current))):
        if _rule_tag(current[i]) in gone:
            del current[i]
    _drop_if_empty(table, "rules")


def set_rules(name: str, rules: Sequence[Rule]) -> Edit:
    """Edit: replace the custom rules of ``[profiles.<name>]`` (``rules-import``).

    Each rule is written as the JSON gave it (``id``, ``act``, ``note``), so exporting them
    again gives the same JSON. A ``rules_file`` is replaced by the inline rules.
    """

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        table = _profile_table(doc, name)
        if "rules_file" in table:
            del table["rules_file"]
        current = table.get("rules")
        if isinstance(current, Array):
            # Append the new rules, then drop the old: the array keeps its layout.
            old = len(current)
            for rule in rules:
                current.append(inline(_rule_pairs(rule)))
            for i in reversed(range(old)):
                del current[i]
            _drop_if_empty(table, "rules")
        else:
            if current is not None:
                del table["rules"]
            if rules:
                set_key(table, "rules", _rules_array(rules))
        return [("profiles", name)]

    return edit
