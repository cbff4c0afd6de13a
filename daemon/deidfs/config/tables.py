"""The plain document as typed tables, and the report of the problems found in it.

:class:`Table` wraps one table of the parsed document with getters (``string``, ``integer``,
``path``, ...) that report a wrong or missing value at its key and return the default, so
the checks go on and list every problem. :class:`Report` collects those problems, in the
order found, and turns them into :class:`~deidfs.config.model.ConfigInvalid` with lines;
:class:`Checks` is the base of the checkers that share it. Also here: the rules several
tables share (names that become directory names, overlapping paths, close spellings).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import TypeVar

from deidfs.config.locate import Key, Locator, dotted
from deidfs.config.model import ConfigInvalid
from deidfs.errors import ConfigError

#: Folder ids become directory names in the mount: no "/", no leading dot or dash.
FOLDER_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

_E = TypeVar("_E", bound=Enum)


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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    pool = list(choices)
    same_case = [c for c in pool if c.casefold() == word.casefold()]
    close = same_case or difflib.get_close_matches(word, pool, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


class Missing:
    """Marks an absent key where ``None`` is a value of its own (``max_age``: no cap)."""


MISSING = Missing()


class Report:
    """The problems found in one document, by key, in the order they were found."""

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


class Checks:
    """Base of the checkers of one part of the document; they share one :class:`Report`."""

    def __init__(self, report: Report) -> None:
        self.report = report

    @property
    def problems(self) -> list[tuple[Key, str]]:
        return self.report.problems

    def error(self, key: Key, message: str) -> None:
        self.report.error(key, message)


class Table:
    """A table of the document with typed getters that report problems at their key."""

    def __init__(self, report: Report, key: Key, data: dict[str, object]) -> None:
        self.report = report
        self.key = key
        self.data = data

    def _err(self, name: str | int, message: str) -> None:
        self.report.error((*self.key, name), message)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for name in self.data:
            if name not in allowed:
                self._err(
                    name,
                    f"unknown key{did_you_mean(name, allowed)}; allowed here: "
                    + ", ".join(allowed),
                )

    def _get(self, name: str, expected: str, required: bool) -> object:
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing) and required:
            self._err(name, f"missing {name} ({expected})")
        return value

    def _wrong(self, name: str, expected: str, value: object) -> None:
        self._err(name, f"expected {expected}, got {_type_name(value)} {value!r}")

    def table(self, name: str) -> Table | None:
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
            return None
        if not isinstance(value, dict):
            self._wrong(name, "a table", value)
            return None
        return Table(self.report, (*self.key, name), value)

    def subtables(self) -> list[tuple[str, Table | None]]:
        """Each ``[<this>.<name>]`` table; ``None`` (reported) where the value is no table."""
        out: list[tuple[str, Table | None]] = []
        for name, value in self.data.items():
            if isinstance(value, dict):
                out.append((name, Table(self.report, (*self.key, name), value)))
            else:
                self._wrong(name, f"a table [{dotted((*self.key, name))}]", value)
                out.append((name, None))
        return out

    def tables(self, name: str) -> list[Table | None]:
        """An array of tables (inline or ``[[...]]``); ``None`` for reported bad items."""
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
            return []
        if not isinstance(value, list):
            self._wrong(name, "an array of tables", value)
            return []
        out: list[Table | None] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append(Table(self.report, (*self.key, name, i), item))
            else:
                self.report.error(
                    (*self.key, name, i), f"expected a table, got {_type_name(item)} {item!r}"
                )
                out.append(None)
        return out

    def strings(self, name: str) -> list[tuple[Key, str]]:
        """An array of strings, each with its key; bad items are reported and skipped."""
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
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
                self.report.error(key, f"expected a non-empty string, got {item!r}")
        return out

    def string(self, name: str, default: str, *, required: bool = False) -> str:
        value = self._get(name, "a string", required)
        if isinstance(value, Missing):
            return default
        if not isinstance(value, str):
            self._wrong(name, "a string", value)
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
            return default
        if not isinstance(value, bool):
            self._wrong(name, "true or false", value)
            return default
        return value

    def number(
        self, name: str, default: float, *, minimum: float, exclusive: bool = False
    ) -> float:
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
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
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
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
        value = self.data.get(name, MISSING)
        if isinstance(value, Missing):
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
            f"unknown {name} {value!r}{did_you_mean(value, names)}; one of: " + ", ".join(names),
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
        if isinstance(value, Missing):
            return default
        if not isinstance(value, str) or not value or "\x00" in value:
            self._wrong(name, "a non-empty path string", value)
            return default
        return Path(os.path.normpath(self.report.base_dir / value))
