"""Where exports may write.

A destination is never inside a watched folder, the state directory or the mount
(:func:`forbidden_places`, as :class:`Place` s), and through the daemon only inside its
``export_dir``: :func:`resolve_destination` resolves and checks it before anything is written,
and :func:`guard_of` gives the directory identities a writer refuses to enter while it writes
(:class:`~deidfs.export.errors.ExportRefused`, exit 77).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deidfs.export.dirs import (
    DirId,
)
from deidfs.export.errors import ExportError, ExportRefused

if TYPE_CHECKING:
    from deidfs.config.model import Config


# -- where exports may write --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Place:
    """A directory no export writes in, nor below: ``what`` names it in messages."""

    what: str
    path: Path  #: resolved (no symbolic link)
    #: A directory inside it where exports may go all the same: the export directory, which
    #: lies in the state directory by default.
    allowed: Path | None = None


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def forbidden_places(config: Config | None, state_dir: Path | None = None) -> list[Place]:
    """The directories of ``config`` that no export may write in: every watched folder's
    source directory (the daemon would take the files as new sources), the state directory
    (its key and index) and the mount (read-only; a view of the sources). ``state_dir``
    adds a state directory of another origin (``deidfs anonymize`` without configuration).
    """
    places: list[Place] = []
    if config is not None:
        for fid, folder in sorted(config.folders.items()):
            places.append(Place(f"watched folder {fid!r}", _resolved(folder.path)))
        state = _resolved(config.daemon.state_dir)
        export_dir = _resolved(config.daemon.export_dir)
        allowed = export_dir if _inside(export_dir, state) and export_dir != state else None
        places.append(Place("the state directory", state, allowed))
        # The mount point itself is not looked at (a hung mount would hang the export):
        # its parent is resolved, and it is taken as a plain name there.
        mnt = Path(os.path.abspath(config.daemon.mountpoint))
        places.append(Place("the mount", _resolved(mnt.parent) / mnt.name))
    if state_dir is not None:
        places.append(Place("the state directory", _resolved(state_dir)))
    return places


def guard_of(places: Iterable[Place]) -> frozenset[DirId]:
    """The identities of the ``places`` that exist, for
    :class:`~deidfs.export.writer.ExportWriter`'s ``guard``: but the mount's (see
    :func:`forbidden_places`) and a place holding an allowed directory (the writer passes
    through it on its way from ``/``)."""
    ids = set()
    for place in places:
        if place.what == "the mount" or place.allowed is not None:
            continue  # the export directory may lie below an allowed place
        try:
            st = os.stat(place.path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            ids.add((st.st_dev, st.st_ino))
    return frozenset(ids)


def _inside(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def resolve_destination(dest: Path, places: Sequence[Place], *, within: Path | None = None) -> Path:
    """``dest`` with its symbolic links resolved, refused where no export may write.

    Parameters
    ----------
    dest
        The directory files go to (it may not exist yet).
    places
        :func:`forbidden_places`: ``dest`` may be neither one nor inside one.
    within
        When given (exports through the daemon), ``dest`` must be inside it, links resolved.

    Raises
    ------
    ExportRefused
        The message names ``dest`` (the admin's own destination) and the place by its kind
        or its folder id, never a source path.
    """
    resolved = _resolved(dest)
    for place in places:
        if _inside(resolved, place.path) and not (
            place.allowed is not None and _inside(resolved, place.allowed)
        ):
            # Its files would be sources of the next export (and of the mount) in turn.
            raise ExportRefused(f"the destination {resolved} is inside {place.what}")
    if within is not None and not _inside(resolved, _resolved(within)):
        raise ExportRefused(
            f"an export through the daemon must go inside its export_dir ({within}); "
            f"the destination {resolved} does not"
        )
    return resolved


def _precheck_destination(dest: Path) -> None:
    """Fail early, creating nothing, when the destination obviously cannot be written."""
    probe = dest
    while not probe.exists():
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError("the output directory is not a directory", errno.ENOTDIR)
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise ExportError(
                "cannot write to the output directory: Read-only file system", errno.EROFS
            )
    except OSError:
        return
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError("cannot write to the output directory: Permission denied", errno.EACCES)
