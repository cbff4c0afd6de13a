"""Placement of tables and keys in the tomlkit tree, so that edits keep the admin's comments.

tomlkit attaches the comment lines that stand above a table header to the *previous* table
(python-poetry/tomlkit#295). Left alone, a new ``[profiles.x]`` would land between the
comment that introduces ``[folders.a]`` and that header, and deleting a table would take the
next table's comment with it. So this module moves those comment blocks explicitly:

- a blank line ends a table's own trailing comments; what follows it belongs to the next
  header and stays right above that header when a table is added or deleted;
- comment lines directly above a deleted table's header (no blank line between) are its own
  and go with it;
- a new table is appended after the last table of its section, with a blank line before it.

:func:`append_table`, :func:`remove_table` and :func:`set_key` are what the edits use;
:func:`new_table`, :func:`string_array` and :func:`inline` build the values they write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.items import (
    AoT,
    Array,
    Comment,
    InlineTable,
    Item,
    Null,
    SingleKey,
    String,
    StringType,
    Table,
    Whitespace,
)
from tomlkit.toml_document import TOMLDocument

from deidfs.errors import ConfigError


def _is_trivia(item: Item) -> bool:
    return isinstance(item, Comment | Whitespace | Null)


def _is_header_table(item: Item) -> bool:
    return isinstance(item, Table) and not item.is_super_table()


_Pos = tuple[Container, int]


def _walk(container: Container, tail: _Pos, before: dict[int, _Pos]) -> _Pos:
    """Walk ``container`` in render order; record, for every table header, what precedes it.

    ``before[id(table)]`` is the position (container, index) right after the last item
    rendered before that table's header: where the comment lines above the header live.
    Returns that position for whatever would be rendered after ``container``.
    """
    for i, (_, item) in enumerate(container.body):
        if isinstance(item, Null):
            continue
        if isinstance(item, Table):
            if item.is_super_table():
                tail = _walk(item.value, tail, before)
            else:
                before[id(item)] = tail
                tail = _walk(item.value, (item.value, 0), before)
        elif isinstance(item, AoT):
            for table in item.body:
                before[id(table)] = tail
                tail = _walk(table.value, (table.value, 0), before)
        else:
            tail = (container, i + 1)
    return tail


def _trivia_run(pos: _Pos) -> int:
    """Index where the run of comment and blank lines ending at ``pos`` starts."""
    container, end = pos
    start = end
    while start > 0 and _is_trivia(container.body[start - 1][1]):
        start -= 1
    return start


def _first_blank(container: Container, start: int, end: int) -> int:
    """Index of the first blank line in ``body[start:end]``, or ``end``."""
    for i in range(start, end):
        if isinstance(container.body[i][1], Whitespace):
            return i
    return end


def _take(container: Container, start: int, end: int) -> list[Item]:
    """Remove the trivia items ``body[start:end]`` and return them (``Null`` dropped)."""
    items = [item for _, item in container.body[start:end] if not isinstance(item, Null)]
    _splice(container, start, end, [])
    return items


def _splice(container: Container, start: int, end: int, items: Sequence[Item]) -> None:
    """Replace the key-less items ``body[start:end]`` by ``items``, keeping the key index.

    tomlkit offers no public way to insert comments at a position; its key map holds body
    indexes, so they are shifted here as ``Container._insert_at`` shifts them.
    """
    assert all(k is None for k, _ in container.body[start:end])
    shift = len(items) - (end - start)
    body = container.body
    body[start:end] = [(None, item) for item in items]
    if shift:
        index_map = container._map  # tomlkit has no public insert
        for key, idx in list(index_map.items()):
            if isinstance(idx, tuple):
                index_map[key] = tuple(i + shift if i >= end else i for i in idx)
            elif idx >= end:
                index_map[key] = idx + shift


def _blank() -> Whitespace:
    return tomlkit.ws("\n")


def new_table(pairs: Sequence[tuple[str, Any]], masks: Sequence[Table] = ()) -> Table:
    """A ``[header]`` table with ``pairs`` and optionally ``[[...masks]]`` tables."""
    table = tomlkit.table()
    for key, value in pairs:
        table.append(key, value)
    if masks:
        aot = tomlkit.aot()
        for mask in masks:
            mask.trivia.indent = "\n"
            aot.append(mask)
        table.append("masks", aot)
    table.trivia.indent = "\n"
    return table


def _section(doc: TOMLDocument, name: str) -> Item | None:
    """The last item the document holds for the top-level key ``name``."""
    found = None
    for key, item in doc.body:
        if key is not None and key.key == name and not isinstance(item, Null):
            found = item
    return found


def find_table(doc: TOMLDocument, section: str, name: str) -> tuple[Container, Item]:
    """The container holding ``[section.name]`` and that item (table or inline table)."""
    for key, item in doc.body:
        if key is None or key.key != section or isinstance(item, Null):
            continue
        if isinstance(item, Table | InlineTable):
            inner = item.value
            for k, v in inner.body:
                if k is not None and k.key == name and not isinstance(v, Null):
                    return inner, v
    raise KeyError(name)


def has_table(doc: TOMLDocument, section: str, name: str) -> bool:
    try:
        find_table(doc, section, name)
    except KeyError:
        return False
    return True


def append_table(doc: TOMLDocument, section: str, name: str, table: Table) -> None:
    """Append ``[section.name]`` after the section's last table, comments kept in place."""
    sec = _section(doc, section)
    if isinstance(sec, InlineTable):
        inline = tomlkit.inline_table()
        inline.update(table.unwrap())
        sec[name] = inline
        return
    if sec is not None and not isinstance(sec, Table):
        raise ConfigError(f"{section} is not a table", key=section)
    tail = _section_end(doc, section) if sec is not None else _walk(doc, (doc, 0), {})
    container, end = tail
    split = _first_blank(container, _trivia_run(tail), end)
    # What follows a blank line there introduces the next header: it moves after the new
    # table, so it stays right above that header.
    moved = _take(container, split, end)
    follows = _renders_after(doc, (container, split))
    last = _walk(table.value, (table.value, 0), {})
    if moved:
        _splice(last[0], last[1], last[1], moved)
    elif follows:
        _splice(last[0], last[1], last[1], [_blank()])
    text = doc.as_string()
    if not text.strip():
        table.trivia.indent = ""
    elif not follows and not moved and not text.endswith("\n"):
        table.trivia.indent = "\n\n"  # the file ended without a newline
    if sec is None:
        sup = tomlkit.table(is_super_table=True)
        sup.append(name, table)
        doc.append(section, sup)
        sup.trivia.indent = ""  # a super table renders no header, so no blank line either
    else:
        sec.value.append(name, table)


def _section_end(doc: TOMLDocument, section: str) -> _Pos:
    """The position right after the last item rendered for the top-level table ``section``."""
    tail: _Pos = (doc, 0)
    result: _Pos | None = None
    for i, (key, item) in enumerate(doc.body):
        if isinstance(item, Null):
            continue
        if isinstance(item, Table):
            if item.is_super_table():
                tail = _walk(item.value, tail, {})
            else:
                tail = _walk(item.value, (item.value, 0), {})
        elif isinstance(item, AoT):
            for table in item.body:
                tail = _walk(table.value, (table.value, 0), {})
        else:
            tail = (doc, i + 1)
        if key is not None and key.key == section:
            result = tail
    assert result is not None
    return result


def _renders_after(doc: TOMLDocument, pos: _Pos) -> bool:
    """Whether anything but comments and blank lines is rendered after ``pos``."""
    seen = False
    found = False

    def visit(container: Container) -> None:
        nonlocal seen, found
        for i, (_, item) in enumerate(container.body):
            if found:
                return
            if container is pos[0] and i == pos[1]:
                seen = True
            if isinstance(item, Null):
                continue
            if isinstance(item, Table):
                if seen and _is_header_table(item):
                    found = True
                    return
                visit(item.value)
            elif isinstance(item, AoT):
                if seen and item.body:
                    found = True
                    return
                for table in item.body:
                    visit(table.value)
            elif seen and not _is_trivia(item):
                found = True
        if container is pos[0] and pos[1] == len(container.body):
            seen = True

    visit(doc)
    return found


def remove_table(doc: TOMLDocument, section: str, name: str) -> None:
    """Delete ``[section.name]`` with its own comments; the next header keeps its own."""
    container, item = find_table(doc, section, name)
    if not isinstance(item, Table) or item.is_super_table():
        container.remove(name)
        return
    before: dict[int, _Pos] = {}
    _walk(doc, (doc, 0), before)
    prev = before[id(item)]
    own_end = _walk(item.value, (item.value, 0), {})
    # The table's trailing run: its own comments up to the first blank line, then what
    # introduces the next header, which must survive the deletion.
    run = _trivia_run(own_end)
    keep = _take(own_end[0], _first_blank(own_end[0], run, own_end[1]), own_end[1])
    container.remove(name)
    pcont, pend = prev
    pstart = _trivia_run(prev)
    last_blank = max(
        (i for i in range(pstart, pend) if isinstance(pcont.body[i][1], Whitespace)),
        default=None,
    )
    if last_blank is not None:
        # Comment lines right above the header (no blank line between) describe it.
        _take(pcont, last_blank + 1, pend)
        pend = last_blank + 1
    ends_blank = pend > pstart and isinstance(pcont.body[pend - 1][1], Whitespace)
    if keep and ends_blank and isinstance(keep[0], Whitespace):
        keep = keep[1:]
    if not keep and not _renders_after(doc, (pcont, pend)):
        # The file ended with the deleted table: do not leave blank lines at its end.
        while pend > pstart and isinstance(pcont.body[pend - 1][1], Whitespace):
            _take(pcont, pend - 1, pend)
            pend -= 1
    _splice(pcont, pend, pend, keep)


def _same_quotes(old: Any, value: Any) -> Any:
    """``value``, a new string, in the quotes of the ``old`` one where it can be.

    An admin who wrote ``'x'`` gets ``'y'``; a literal string cannot hold ``'`` or control
    characters, so such a value is written as a basic string ``"..."`` with escapes. Decided
    here, not left to tomlkit, whose choice changed between releases.
    """
    if not isinstance(value, str) or isinstance(value, Item):
        return value
    literal = (
        isinstance(old, String)
        and old.type is StringType.SLL
        and "'" not in value
        and all(c == "\t" or (c >= " " and c != "\x7f") for c in value)
    )
    return tomlkit.string(value, literal=literal)


def set_key(table: Table | InlineTable, key: str, value: Any) -> None:
    """Set ``key`` in ``table``: in place if present, else after the table's last key."""
    if key in table:
        old = table[key]
        old_plain = old.unwrap() if isinstance(old, Item) else old
        new_plain = value.unwrap() if isinstance(value, Item) else value
        if type(old_plain) is type(new_plain) and old_plain == new_plain:
            return  # same value: leave its spelling ('x' vs "x") alone
        table[key] = _same_quotes(old, value)
        return
    if isinstance(table, InlineTable):
        table[key] = value
        return
    body = table.value.body
    last_key = None
    first_sub = len(body)
    for i, (k, v) in enumerate(body):
        if isinstance(v, Table | AoT):
            first_sub = min(first_sub, i)
            continue
        if k is not None and not isinstance(v, Null) and i < first_sub:
            last_key = i
    if last_key is not None:
        idx = last_key + 1
        indent = body[last_key][1].trivia.indent
    else:
        # No key yet: after the comment lines right below the header, before a blank line.
        idx = _first_blank(table.value, 0, first_sub)
        indent = ""
    item = tomlkit.item(value)
    if not isinstance(item, Whitespace | Comment):
        item.trivia.indent = indent
    if idx >= len(body):
        table.value.append(SingleKey(key), item)
    else:
        # tomlkit's public setitem appends after trailing comments and blank lines, i.e.
        # after what introduces the next header; inserting at an index is private API.
        table.value._insert_at(idx, SingleKey(key), item)


def string_array(values: Sequence[str]) -> Array:
    arr = tomlkit.array()
    for v in values:
        arr.append(v)
    return arr


def inline(pairs: Sequence[tuple[str, str]]) -> InlineTable:
    """An inline table written ``{ id = "...", act = "..." }``, the usual TOML spacing."""
    inner = ", ".join(f"{k} = {tomlkit.string(v).as_string()}" for k, v in pairs)
    value = tomlkit.value("{ " + inner + " }")
    assert isinstance(value, InlineTable)
    return value
