"""The ``[folders.<id>]`` tables: the watched folders and the profile each is served with.

:class:`FolderChecker` builds one :class:`~deidfs.config.model.FolderConfig` per table once
the daemon settings and the profiles are known: a folder's profile must exist and be
enabled, and its path must not overlap the daemon's directories or another folder.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from deidfs.config.model import DEFAULT_BASE, DEFAULT_PROFILE, DaemonConfig, FolderConfig, WatchMode
from deidfs.config.tables import FOLDER_ID, Checks, Table, did_you_mean, overlaps
from deidfs.deid.layout import Layout
from deidfs.deid.profiles import Profile

_FOLDER_KEYS = ("path", "profile", "layout", "watch")


class FolderChecker(Checks):
    """Checks the ``[folders.*]`` tables against the daemon settings and the profiles."""

    def folders(
        self,
        t: Table | None,
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
            if not FOLDER_ID.match(fid):
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
        self, t: Table, name: str, profiles: Mapping[str, Profile], broken: Collection[str]
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
                f"unknown profile {name!r}{did_you_mean(name, known)}; profiles are: "
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
        t: Table,
        fid: str,
        path: Path,
        daemon: DaemonConfig,
        earlier: Mapping[str, Path],
    ) -> None:
        key = (*t.key, "path")
        for name in ("mountpoint", "export_dir", "state_dir"):
            other: Path = getattr(daemon, name)
            if overlaps(path, other):
                self.error(
                    key,
                    f"folder {fid!r} ({path}) must not be, contain or lie inside "
                    f"daemon.{name} ({other})",
                )
        for other_id, other_path in earlier.items():
            if overlaps(path, other_path):
                how = "the same path as" if path == other_path else "nested with"
                self.error(
                    key,
                    f"folder {fid!r} ({path}) is {how} folder {other_id!r} ({other_path}); "
                    "a file must belong to one folder",
                )
