"""Edits of the configuration file that keep the admin's comments and formatting.

The configuration is a hand-edited TOML file, so ``deidfs profile ...`` and ``deidfs folder
...`` change it the way a careful admin would: through tomlkit, touching only the table an
edit is about. Every comment, blank line and odd-but-valid spelling elsewhere survives byte
for byte.

Where new tables and keys go so that comments stay with the header they describe is
:mod:`deidfs.config.edit_tree`; the edits themselves are in :mod:`deidfs.config.edit_profiles`,
:mod:`deidfs.config.edit_folders` and :mod:`deidfs.config.edit_destinations`.

:func:`edit_config` is the transaction: lock ``<config>.lock``, read, edit, check that the
rendered text re-reads as exactly the edited document and that nothing outside the edited
tables changed, validate the whole result, write it atomically, return the diff.

This module does no validation of its own beyond that: the caller passes the configuration
loader as ``validate``, so a refused edit gives the same messages as ``check-config`` (and
the edit modules, siblings of :mod:`deidfs.config.model` and its checks, do not import them).
"""

from __future__ import annotations

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
from tomlkit.toml_document import TOMLDocument

from deidfs.deid.profiles import BUILTIN_PROFILES, Profile
from deidfs.errors import ConfigError, DeidfsError, NotFound

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
