"""Edits of ``[destinations.<name>]`` tables: add a destination, remove it.

What ``deidfs destination ...`` changes: each function returns an
:data:`~deidfs.config.edit.Edit` for :func:`~deidfs.config.edit.edit_config`; the new
table's keys are checked by the configuration loader like any other table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tomlkit.toml_document import TOMLDocument

from deidfs.config.edit import Edit, EditContext, TablePath
from deidfs.config.edit_tree import append_table, find_table, has_table, new_table, remove_table
from deidfs.errors import ConfigError, NotFound


def add_destination(name: str, pairs: Sequence[tuple[str, Any]]) -> Edit:
    """Edit: add ``[destinations.<name>]`` with ``pairs`` (``kind`` first), validated by
    the loader like any other table."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        if has_table(doc, "destinations", name):
            raise ConfigError(f"a destination named {name!r} already exists")
        append_table(doc, "destinations", name, new_table(pairs))
        return [("destinations", name)]

    return edit


def remove_destination(name: str) -> Edit:
    """Edit: delete ``[destinations.<name>]`` (what was sent there stays there)."""

    def edit(doc: TOMLDocument, context: EditContext) -> Sequence[TablePath]:
        del context
        try:
            find_table(doc, "destinations", name)
        except KeyError:
            raise NotFound(f"no destination named {name!r} in the configuration") from None
        remove_table(doc, "destinations", name)
        return [("destinations", name)]

    return edit
