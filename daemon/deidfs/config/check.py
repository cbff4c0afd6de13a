"""The checks of a whole configuration document: the plain TOML data becomes a Config.

:class:`Checker` runs one checker per part of the document (``[daemon]``, ``[profiles.*]``,
``[folders.*]``, ``[destinations.*]``), in that order, on one shared
:class:`~deidfs.config.tables.Report`; :meth:`Checker.invalid` lists every problem found,
top to bottom, as :class:`~deidfs.config.model.ConfigInvalid`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from deidfs.config.check_daemon import DaemonChecker
from deidfs.config.check_destinations import DestinationChecker
from deidfs.config.check_folders import FolderChecker
from deidfs.config.check_profiles import ProfileChecker
from deidfs.config.locate import Key
from deidfs.config.model import Config, ConfigInvalid
from deidfs.config.tables import Report, Table


class Checker:
    """Turns the plain document into a :class:`Config`, collecting problems by key."""

    def __init__(self, text: str, where: str, base_dir: Path) -> None:
        self.report = Report(text, where, base_dir)
        self.daemon = DaemonChecker(self.report)
        self.profiles = ProfileChecker(self.report)
        self.folders = FolderChecker(self.report)
        self.destinations = DestinationChecker(self.report)

    @property
    def problems(self) -> list[tuple[Key, str]]:
        return self.report.problems

    def invalid(self) -> ConfigInvalid:
        return self.report.invalid()

    # -- whole document ----------------------------------------------------------------------

    def config(self, doc: Mapping[str, object]) -> Config:
        top = Table(self.report, (), dict(doc))
        top.check_keys(("daemon", "folders", "profiles", "destinations"))
        daemon = self.daemon.daemon(top.table("daemon"))
        profiles, broken = self.profiles.profiles(top.table("profiles"))
        folders = self.folders.folders(top.table("folders"), daemon, profiles, broken)
        destinations = self.destinations.destinations(top.table("destinations"))
        return Config(daemon=daemon, folders=folders, profiles=profiles, destinations=destinations)
