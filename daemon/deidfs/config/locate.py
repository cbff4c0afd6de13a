"""Where a key sits in the configuration file: line numbers for error messages.

tomlkit items carry no source positions, so :class:`Locator` walks the accepted text once more
to learn on which line each key, table header, array item and inline-table key starts;
:data:`Key` is such a position in the document and :func:`dotted` renders it as TOML writes
it. Used by the checks to report ``file:line: key: message``.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib

#: A position in the document: table and key names, and indexes into arrays.
Key = tuple[str | int, ...]


def dotted(key: Key) -> str:
    """Render a key as TOML writes it: ``profiles."+Pixel".rules[2].act``."""
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else '"' + _escape(part) + '"'
        out += f".{name}" if out else name
    return out


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


class Locator:
    """Line numbers of the keys of a TOML document that tomlkit has already accepted.

    tomlkit items carry no source positions, so this walks the text once more, just far
    enough to know which key, table header, array item or inline-table key starts on which
    line. Best effort: if the walk stops early, the keys found until then still answer.
    """

    _BARE = re.compile(r"[A-Za-z0-9_-]+")
    _SCALAR = re.compile(r"[^,\]}\n#]*")

    def __init__(self, text: str) -> None:
        self._t = text
        self._i = 0
        self._starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self._aot: dict[Key, int] = {}
        self.lines: dict[Key, int] = {}
        with contextlib.suppress(IndexError, ValueError):
            self._document()

    def line_of(self, key: Key) -> int | None:
        """The line of ``key``, else of the closest enclosing table or key that has one."""
        for n in range(len(key), 0, -1):
            line = self.lines.get(key[:n])
            if line is not None:
                return line
        return None

    def _line(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i)

    def _record(self, key: Key, at: int) -> None:
        line = self._line(at)
        for n in range(1, len(key)):
            self.lines.setdefault(key[:n], line)
        self.lines[key] = line

    def _skip(self, newlines: bool) -> None:
        t = self._t
        while self._i < len(t):
            c = t[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#" and newlines:
                end = t.find("\n", self._i)
                self._i = len(t) if end < 0 else end
            else:
                break

    def _document(self) -> None:
        table: Key = ()
        while True:
            self._skip(newlines=True)
            if self._i >= len(self._t):
                return
            start = self._i
            if self._t[self._i] == "[":
                table = self._header()
            else:
                self._keyval(table)
            if self._i == start:
                raise ValueError("no progress")

    def _header(self) -> Key:
        start = self._i
        array = self._t.startswith("[[", start)
        self._i += 2 if array else 1
        parts = self._key()
        self._skip(newlines=False)
        self._i += 2 if array else 1
        resolved: list[str | int] = []
        for part in parts[:-1] if array else parts:
            resolved.append(part)
            index = self._aot.get(tuple(resolved))
            if index is not None:
                resolved.append(index)
        if array:
            resolved.append(parts[-1])
            index = self._aot.get(tuple(resolved), -1) + 1
            self._aot[tuple(resolved)] = index
            resolved.append(index)
        key = tuple(resolved)
        self._record(key, start)
        return key

    def _keyval(self, table: Key) -> None:
        start = self._i
        key = (*table, *self._key())
        self._skip(newlines=False)
        if self._t[self._i] != "=":
            raise ValueError("expected '='")
        self._i += 1
        self._record(key, start)
        self._value(key)

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip(newlines=False)
            if self._t[self._i] in "\"'":
                parts.append(self._decode_key(self._string()))
            else:
                m = self._BARE.match(self._t, self._i)
                if m is None:
                    raise ValueError("expected a key")
                parts.append(m.group())
                self._i = m.end()
            self._skip(newlines=False)
            if self._i < len(self._t) and self._t[self._i] == ".":
                self._i += 1
                continue
            return parts

    @staticmethod
    def _decode_key(raw: str) -> str:
        if raw.startswith("'"):
            return raw[1:-1]
        try:
            value = tomllib.loads(f"k = {raw}")["k"]
        except tomllib.TOMLDecodeError:
            return raw[1:-1]
        return value if isinstance(value, str) else raw[1:-1]

    def _string(self) -> str:
        """Skip the string starting here and return its raw text, quotes included."""
        t, i = self._t, self._i
        quote = t[i]
        if t.startswith(quote * 3, i):
            j = i + 3
            while not t.startswith(quote * 3, j):
                j += 2 if quote == '"' and t[j] == "\\" else 1
                if j >= len(t):
                    raise ValueError("unterminated string")
            j += 3
            while j < len(t) and t[j] == quote:  # up to two quotes end the content
                j += 1
        else:
            j = i + 1
            while t[j] != quote:
                j += 2 if quote == '"' and t[j] == "\\" else 1
            j += 1
        self._i = j
        return t[i:j]

    def _value(self, key: Key) -> None:
        self._skip(newlines=False)
        c = self._t[self._i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._i += 1
            index = 0
            while True:
                self._skip(newlines=True)
                if self._t[self._i] == "]":
                    self._i += 1
                    return
                item = (*key, index)
                self._record(item, self._i)
                self._value(item)
                index += 1
                self._skip(newlines=True)
                if self._t[self._i] == ",":
                    self._i += 1
        elif c == "{":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if self._t[self._i] == "}":
                    self._i += 1
                    return
                self._keyval(key)
                self._skip(newlines=True)
                if self._t[self._i] == ",":
                    self._i += 1
        else:
            m = self._SCALAR.match(self._t, self._i)
            assert m is not None  # the pattern matches the empty string
            if m.end() == self._i:
                raise ValueError("expected a value")
            self._i = m.end()
