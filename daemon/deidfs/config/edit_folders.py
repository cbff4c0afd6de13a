"""Edits of ``[folders.<id>]`` tables: add a folder, bind it to a profile, remove it.

What ``deidfs folder ...`` changes: each function returns an
:data:`~deidfs.config.edit.Edit` for :func:`~deidfs.config.edit.edit_config`. Removing a
folder removes its views from the mount; its originals are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tomlkit.items import InlineTable, Table
from tomlkit.toml_document import TOMLDocument

from deidfs.config.edit import Edit, EditContext, TablePath
from deidfs.config.edit_tree import (
    append_table,
    find_table,
    has_table,
    new_table,
    remove_table,
    set_key,
)
from deidfs.errors import ConfigError, NotFound


def _folder_table(doc: TOMLDocument, fid: str) -> Table | InlineTable:
    try:
        _, item = find_table(doc, "folders", fid)
    except KeyError:
        raise NotFound(f"no folder with id {fid!r} in the configuration") from None
    if not isinstance(item, Table | InlineTable):
        raise ConfigError(f"folders.{fid} is not a table", key=f"folders.{fid}")
    return item


# --------------------------------------------------------------------------------------------
# Folder edits


def add_folder(
    fid: str, path: str, profile: str, layout: str | None = None, watch: str | None = None
) -> Edit:
    """Edit: add ``[folders.<fid>]``."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        if has_table(doc, "folders", fid):
            raise ConfigError(f"a folder with id {fid!r} already exists")
        pairs: list[tuple[str, Any]] = [("path", path), ("profile", profile)]
        if layout is not None:
            pairs.append(("layout", layout))
        if watch is not None:
            pairs.append(("watch", watch))
        append_table(doc, "folders", fid, new_table(pairs))
        return [("folders", fid)]

    return edit


def set_folder_profile(fid: str, profile: str) -> Edit:
    """Edit: bind folder ``fid`` to ``profile``."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        table = _folder_table(doc, fid)
        set_key(table, "profile", profile)
        return [("folders", fid)]

    return edit


def remove_folder(fid: str) -> Edit:
    """Edit: delete ``[folders.<fid>]`` (its originals are untouched, its views go)."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        _folder_table(doc, fid)
        remove_table(doc, "folders", fid)
        return [("folders", fid)]

    return edit
