"""Reload: a new configuration planned completely, then applied by difference.

:class:`Reloader` reads and validates the configuration file (or takes a configuration
given), builds a :class:`_ReloadPlan` (every folder's plan compiled, nothing changed), and
only then applies it to the folder set and the indexing threads; any error leaves the
running configuration untouched. :class:`_ConfigPoll` tells the supervising loop when the
file has new content that has stopped changing. See :mod:`deidfs.service.core` for what a
reload changes and what waits for a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deidfs.config.load import load_config
from deidfs.config.model import Config, ConfigInvalid, DaemonConfig
from deidfs.deid.plan import Plan
from deidfs.errors import ConfigError, DeidfsError
from deidfs.ops.sdnotify import Notifier
from deidfs.service.folders import FolderSet, _Folder
from deidfs.service.indexing import Indexer, _index_workers
from deidfs.service.status import ReloadOutcome
from deidfs.service.work import _Kind
from deidfs.view.handles import ViewFS
from deidfs.watch.watcher import FolderWatcher

log = logging.getLogger(__name__)

#: How often the configuration file's SHA-256 is compared (see the module notes).
CONFIG_POLL_SECONDS = 0.5
#: ``[daemon]`` settings a running daemon cannot change: a reload keeps their old value.
RESTART_SETTINGS = ("mountpoint", "state_dir", "metrics_address", "control_socket", "allow_other")
_WATCH_SETTINGS = ("settle_seconds", "poll_seconds", "reconcile_seconds")


@dataclass
class _ReloadPlan:
    """What a reload changes; built completely before anything is applied."""

    config: Config  #: the configuration that will run (restart-only settings kept)
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    added: list[_Folder] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rerender: list[_Folder] = field(default_factory=list)  #: new views: fail closed
    rebound: list[_Folder] = field(default_factory=list)  #: same views, other settings
    restart_watchers: set[str] = field(default_factory=set)


class _ConfigPoll:
    """Tells when the configuration file has new content that has stopped changing."""

    def __init__(self, path: Path, seen: str) -> None:
        self.path = path
        self.seen = seen  #: digest of the content last loaded or rejected
        self._candidate: str | None = None

    def due(self) -> bool:
        """True when the file differs from :attr:`seen` and kept that content for a poll."""
        digest = file_sha256(self.path)
        if digest == self.seen:
            self._candidate = None
            return False
        if digest != self._candidate:
            self._candidate = digest  # changed since the last poll: maybe still being written
            return False
        self._candidate = None
        return True


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; "" when it cannot be read (missing, permissions)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


class Reloader:
    """Reloads of a running daemon, one at a time.

    Parameters
    ----------
    folders
        The folder set a reload changes.
    indexer
        Its indexing threads (more ``workers`` start at once).
    fs
        The mount's file handles (``cache_mib`` applies at once).
    notifier
        systemd notifications (``RELOADING=1``, then ``READY=1`` with a status line).
    running
        Whether the daemon has started and is not stopping.
    status_line
        The ``STATUS=`` line sent with ``READY=1`` after a reload.
    """

    def __init__(
        self,
        folders: FolderSet,
        indexer: Indexer,
        fs: ViewFS,
        notifier: Notifier,
        running: Callable[[], bool],
        status_line: Callable[[], str],
    ) -> None:
        self.folders = folders
        self.indexer = indexer
        self.fs = fs
        self.notifier = notifier
        self._running = running
        self._status_line = status_line
        self.requested = threading.Event()
        self.trigger = "signal"
        self.lock = threading.Lock()
        self.config_poll: _ConfigPoll | None = None
        self.last_reload: ReloadOutcome | None = None

    def request_reload(self, trigger: str = "signal") -> None:
        """Ask the supervising loop to reload (thread- and signal-safe); returns at once."""
        self.trigger = trigger
        self.requested.set()

    def reload(self, trigger: str = "control", config: Config | None = None) -> ReloadOutcome:
        """Read the configuration again and apply what changed; keep it all on any error.

        Parameters
        ----------
        trigger
            What asked for it (reported in ``status``): ``signal``, ``control``, ``file``.
        config
            Apply this configuration instead of reading the file (tests, embedding).

        Returns
        -------
        ReloadOutcome
            ``ok`` False with the problems (file:line: key: message) when the new
            configuration was rejected; the running one is then unchanged.
        """
        with self.lock:
            if self.folders.stopping.is_set() or not self._running():
                return ReloadOutcome(
                    False, trigger, time.time(), errors=("the daemon is not running",)
                )
            self.notifier.reloading()
            started = time.monotonic()
            try:
                outcome = self._reload(trigger, config)
            except Exception as exc:  # contain: a failed reload must never stop serving
                log.error("reload failed unexpectedly: %s", type(exc).__name__)
                outcome = ReloadOutcome(
                    False, trigger, time.time(), errors=(f"internal error: {type(exc).__name__}",)
                )
            self.last_reload = outcome
            self.folders.metrics.config_loaded(outcome.ok, outcome.finished_at)
            if outcome.ok:
                log.info(
                    "configuration reloaded (%s) in %.2f s: %s",
                    trigger,
                    time.monotonic() - started,
                    "; ".join(outcome.changes) or "nothing changed",
                )
                for warning in outcome.warnings:
                    log.warning("reload: %s", warning)
            else:
                for error in outcome.errors:
                    log.error("configuration rejected, the last good one keeps serving: %s", error)
            self.notifier.ready(self._status_line())
            return outcome

    def _reload(self, trigger: str, given: Config | None) -> ReloadOutcome:
        digest = ""
        if given is None:
            path = self.folders.config.source
            if path is None:
                return ReloadOutcome(
                    False,
                    trigger,
                    time.time(),
                    errors=("started without a configuration file: nothing to reload",),
                )
            digest = file_sha256(path)
            if self.config_poll is not None:
                self.config_poll.seen = digest  # this content is handled now
            try:
                # Blank is what an editor leaves between truncating and writing: never
                # applied, as it would remove every folder.
                new = load_config(path, allow_blank=False)
            except ConfigError as exc:
                errors = exc.errors if isinstance(exc, ConfigInvalid) else (exc,)
                return ReloadOutcome(
                    False, trigger, time.time(), digest, errors=tuple(str(e) for e in errors)
                )
        else:
            new = given
        try:
            plan = self._plan(new)
        except (DeidfsError, ValueError) as exc:
            return ReloadOutcome(False, trigger, time.time(), digest, errors=(str(exc),))
        self._apply_plan(plan)
        return ReloadOutcome(
            True,
            trigger,
            time.time(),
            new.sha256 or digest,
            warnings=tuple(plan.warnings),
            changes=tuple(plan.changes),
        )

    def _plan(self, new: Config) -> _ReloadPlan:
        """Work out what ``new`` changes; compiles every plan, changes nothing."""
        old_d, new_d = self.folders.config.daemon, new.daemon
        keep: dict[str, Any] = {}
        warnings_: list[str] = []
        for name in RESTART_SETTINGS:
            if getattr(new_d, name) != getattr(old_d, name):
                keep[name] = getattr(old_d, name)
                warnings_.append(
                    f"[daemon] {name} changed: takes effect at the next restart "
                    f"(running with {getattr(old_d, name)!s})"
                )
        if _index_workers(new_d.workers) < len(self.indexer.workers):
            keep["workers"] = old_d.workers
            warnings_.append(
                f"[daemon] workers lowered to {new_d.workers}: takes effect at the next restart"
            )
        daemon: DaemonConfig = dataclasses.replace(new_d, **keep)
        config = Config(
            daemon=daemon,
            folders=new.folders,
            profiles=new.profiles,
            destinations=new.destinations,
            source=new.source if new.source is not None else self.folders.config.source,
            sha256=new.sha256,
        )
        plan = _ReloadPlan(config=config, warnings=warnings_)
        watch_timing = any(getattr(old_d, n) != getattr(daemon, n) for n in _WATCH_SETTINGS)
        if watch_timing:
            plan.changes.append("watch timing changed: watchers restarted")
        if daemon.cache_mib != old_d.cache_mib:
            plan.changes.append(f"header cache bound set to {daemon.cache_mib} MiB")
        if _index_workers(daemon.workers) > len(self.indexer.workers):
            plan.changes.append(f"indexing workers raised to {daemon.workers}")
        if daemon.parse_timeout_seconds != old_d.parse_timeout_seconds:
            plan.changes.append(f"parse timeout set to {daemon.parse_timeout_seconds:g} s")
        current = self.folders.by_id
        plans: dict[str, Plan] = {}
        for fid in sorted(set(current) - set(new.folders)):
            plan.removed.append(fid)
            plan.changes.append(f"folder {fid} removed")
        for fid, fc in sorted(new.folders.items()):
            folder = self.folders.new_folder(fc, config, plans)
            cur = current.get(fid)
            if cur is None:
                plan.added.append(folder)
                plan.changes.append(f"folder {fid} added (profile {fc.profile})")
            elif folder.view.root != cur.view.root:
                plan.removed.append(fid)
                plan.added.append(folder)
                plan.changes.append(f"folder {fid} moved to another path: indexed anew")
            elif folder.view.digest != cur.view.digest:
                plan.rerender.append(folder)
                if fc.profile != cur.config.profile:
                    what = f"profile {cur.config.profile} -> {fc.profile}"
                elif folder.view.max_header_bytes != cur.view.max_header_bytes:
                    what = "[daemon] max_header_mib changed"
                else:
                    what = f"profile {fc.profile} changed"
                if fc.layout != cur.config.layout:
                    what += f", layout {cur.config.layout.value} -> {fc.layout.value}"
                plan.changes.append(f"folder {fid}: {what}; views withdrawn and rendered again")
                if fc.watch != cur.config.watch or watch_timing:
                    plan.restart_watchers.add(fid)
            else:
                if fc.watch != cur.config.watch:
                    plan.restart_watchers.add(fid)
                    plan.changes.append(
                        f"folder {fid}: watch {cur.config.watch.value} -> {fc.watch.value}"
                    )
                elif fc != cur.config:
                    plan.changes.append(f"folder {fid}: settings changed, same views")
                elif watch_timing:
                    plan.restart_watchers.add(fid)
                plan.rebound.append(folder)
        return plan

    def _apply_plan(self, plan: _ReloadPlan) -> None:
        """Apply a reload plan; nothing here fails on configuration grounds."""
        assert self.folders.index is not None
        self.folders.config = plan.config
        self.fs.cache.max_bytes = plan.config.daemon.cache_mib * 1024 * 1024
        wanted = _index_workers(plan.config.daemon.workers)
        if wanted > len(self.indexer.workers):
            self.indexer.start_workers(wanted - len(self.indexer.workers))
        folders = dict(self.folders.by_id)
        stop: list[FolderWatcher] = []
        for fid in plan.removed:
            gone = folders.pop(fid)
            if gone.watcher is not None:
                stop.append(gone.watcher)
            self.folders.tree.drop_folder(fid)
            self.folders.index.remove_folder(fid)
            self.folders.metrics.forget_folder(fid)
        requeue: list[tuple[str, list[str]]] = []
        for folder in plan.rerender:
            fid = folder.config.id
            old = folders[fid]
            known = {vf.source for vf in self.folders.tree.sources(fid)}
            known.update(old.refused)
            known.update(e.path for e in self.folders.index.entries(fid))
            # Fail closed: the old views go in the same step that installs the new settings.
            withdrawn = self.folders.tree.replace_folder(folder.view)
            folder.watcher = old.watcher
            folders[fid] = folder
            requeue.append((fid, sorted(known)))
            log.info(
                "folder %s: %d view(s) withdrawn; %d source(s) queued for the new profile",
                fid,
                withdrawn,
                len(known),
            )
        for folder in plan.rebound:
            fid = folder.config.id
            old = folders[fid]
            folder.watcher = old.watcher
            folder.refused = old.refused
            self.folders.tree.set_folder(folder.view)
            folders[fid] = folder
        for folder in plan.added:
            fid = folder.config.id
            self.folders.tree.set_folder(folder.view)
            folders[fid] = folder
            self.folders.metrics.folder_added(fid)
        self.folders.by_id = folders
        for fid, paths in requeue:
            for path in paths:
                self.folders.queue.put((fid, path), _Kind.READY)
        for folder in plan.added:
            self.folders.load_folder_index(folder)
        for fid in sorted(plan.restart_watchers):
            folder = folders[fid]
            if folder.watcher is not None:
                stop.append(folder.watcher)
                folder.watcher = None
        for watcher in stop:
            watcher.stop()
        for fid in sorted(plan.restart_watchers):
            self.folders.start_watcher(folders[fid])
        for folder in plan.added:
            self.folders.start_watcher(folder)
