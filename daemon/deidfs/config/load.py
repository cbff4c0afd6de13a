"""Reading a configuration: :func:`load_config` (a file) and :func:`parse_config` (a text).

Both parse the TOML with tomlkit, report a syntax error at the most precise line either
tomlkit or the standard library's parser knows, refuse a blank file where asked, and hand
the plain document to the checks, which build the :class:`~deidfs.config.model.Config` or
raise :class:`~deidfs.config.model.ConfigInvalid` listing every problem, top to bottom.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from deidfs.config.check import Checker
from deidfs.config.model import Config, ConfigInvalid, ConfigUnreadable
from deidfs.errors import ConfigError

if TYPE_CHECKING:
    from tomlkit.exceptions import TOMLKitError


def load_config(path: Path, *, allow_blank: bool = True) -> Config:
    """Read and validate the TOML configuration at ``path``.

    Parameters
    ----------
    path
        The configuration file. Relative paths inside it are resolved against its directory.
    allow_blank
        Whether a file with no table and no key (empty, or only whitespace and comments) is
        valid: it is, as the defaults with no folder. A reload passes False: such a file is
        what an editor leaves while it truncates before writing, and applying it would remove
        every folder from the mount.

    Returns
    -------
    Config
        The validated configuration, built-in profiles included, with ``source`` and the
        SHA-256 of the file's bytes.

    Raises
    ------
    ConfigUnreadable
        The file is missing or unreadable (exit code 66).
    ConfigInvalid
        The file is not valid TOML or breaks the schema (exit code 78); lists every problem.
        Also a blank file, unless ``allow_blank``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigUnreadable("configuration file not found", path=str(path)) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigUnreadable(
            f"cannot read configuration file: {reason}", path=str(path)
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        error = ConfigError("not UTF-8 text", path=str(path), line=line)
        raise ConfigInvalid([error]) from None
    return _parse(text, path, hashlib.sha256(data).hexdigest(), allow_blank=allow_blank)


def parse_config(text: str, path: Path | None = None) -> Config:
    """Validate a configuration given as text.

    Parameters
    ----------
    text
        The TOML document.
    path
        Where the text comes from (or is about to be written): named in errors, and its
        directory resolves relative paths. Without it, messages say ``<config>`` and
        relative paths are resolved against the current directory.

    Returns
    -------
    Config
        As :func:`load_config`; ``sha256`` is that of the UTF-8 encoded text.

    Raises
    ------
    ConfigInvalid
        The text is not valid TOML or breaks the schema; lists every problem.
    """
    return _parse(text, path, hashlib.sha256(text.encode("utf-8")).hexdigest())


def _parse(text: str, path: Path | None, digest: str, *, allow_blank: bool = True) -> Config:
    # tomlkit loads with the first configuration read: commands that read none stay quick.
    import tomlkit  # noqa: PLC0415
    from tomlkit.exceptions import TOMLKitError  # noqa: PLC0415

    where = str(path) if path is not None else "<config>"
    try:
        doc = tomlkit.parse(text).unwrap()
    except TOMLKitError as exc:
        raise ConfigInvalid([_syntax_error(text, where, exc)]) from None
    if not doc and not allow_blank:
        blank = "empty" if not text.strip() else "blank (nothing but whitespace and comments)"
        error = ConfigError(
            f"the configuration file is {blank}; refused: it would remove every folder "
            "(a file truncated while being saved?)",
            path=where,
        )
        raise ConfigInvalid([error])
    base_dir = path.absolute().parent if path is not None else Path.cwd()
    checker = Checker(text, where, base_dir)
    config = checker.config(doc)
    if checker.problems:
        raise checker.invalid()
    return Config(
        daemon=config.daemon,
        folders=config.folders,
        profiles=config.profiles,
        destinations=config.destinations,
        source=path.absolute() if path is not None else None,
        sha256=digest,
    )


def _syntax_error(text: str, where: str, exc: TOMLKitError) -> ConfigError:
    """The TOML syntax error, at the most precise position either parser knows.

    tomlkit places some errors at the end of the offending table, or nowhere (a key given
    twice); the standard library's parser names the exact line, so it speaks when it agrees
    that the text is invalid.
    """
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as std:
        message = str(std)
        m = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if m is not None:
            # tomlkit names the key given twice ('Key "x" already exists.'), tomllib does not.
            kit = re.sub(r" at line \d+ col \d+$", "", str(exc))
            reason = kit if "already exists" in kit else message[: m.start()]
            reason = f"{reason} (column {m.group(2)})"
            return ConfigError(f"invalid TOML: {reason}", path=where, line=int(m.group(1)))
        if message.endswith(" (at end of document)"):
            reason = message.removesuffix(" (at end of document)") + " at the end of the file"
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
            return ConfigError(f"invalid TOML: {reason}", path=where, line=max(line, 1))
    from tomlkit.exceptions import ParseError  # noqa: PLC0415

    if isinstance(exc, ParseError):
        reason = re.sub(r" at line \d+ col \d+$", "", str(exc))
        return ConfigError(f"invalid TOML: {reason} (column {exc.col})", path=where, line=exc.line)
    return ConfigError(f"invalid TOML: {exc}", path=where)
