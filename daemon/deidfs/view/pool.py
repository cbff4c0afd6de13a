"""Sources rendered in worker processes, each file bounded in time.

Rendering a source (:func:`~deidfs.view.render.render_path`) is pure Python: in the process that
serves the mount it holds the GIL for as long as it runs, and a source whose header takes
minutes to walk would hold up every other file. The daemon's indexing threads therefore
each own one :class:`RenderProcess`, a child process that renders one file at a time and
sends the :class:`~deidfs.view.render.View` back through a pipe; the thread waits on the pipe
(without the GIL) and updates the index and the mount's tree itself. A render that runs past
its time bound is abandoned: the child is killed (a parse cannot be interrupted from within
and a thread cannot be killed) and the next file gets a fresh one.

Children start from a fork server (``forkserver``), never by forking the daemon, whose other
threads may hold locks a fork would copy held. Each child, before its first file:

- installs the daemon's logging set-up (:func:`~deidfs.ops.logs.setup_logging`): stderr, the
  same format, :class:`~deidfs.ops.logs.ThirdPartyRedactor`; pydicom's log records go to a
  :class:`~deidfs.ops.logs.LibraryWarnings` that only counts them, and Python warnings are
  ignored: their text quotes element values. The counts go back with each file, and the
  daemon logs the first of each category with the file's keyed token, as for a render in
  its own process;
- arranges to die with the daemon (:func:`~deidfs.ops.lifeline.die_with_parent`): the fork
  server is its parent, the daemon's death is watched through a pidfd; an idle child also
  ends at EOF on its pipe.

A child whose peak memory passed :data:`RETIRE_RSS_KIB` (a huge header) exits after its file
and the next file gets a new one. A plan is large (some 33 KB pickled, about 3 ms to send and
load, more than rendering a CT header): it goes to a child once per view digest, which keeps
the last :data:`PLANS_KEPT`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import PurePosixPath

from deidfs.deid.layout import Layout
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import Refused
from deidfs.ops.lifeline import die_with_parent
from deidfs.ops.logs import LibraryWarnings, setup_logging
from deidfs.view.render import View, render_path

log = logging.getLogger(__name__)

#: The withholding reason of a source whose render ran past its time bound.
TIMEOUT_REASON = "parse_timeout"
#: Plans (by view digest) a child keeps; the parent mirrors the same bounded order.
PLANS_KEPT = 8
#: How long a child that was asked to stop may take before it is killed.
STOP_SECONDS = 2.0
#: Added to a child's nice value: where cores are short, the process serving the mount is
#: scheduled first (a child still gets about a tenth of a contended core).
RENDER_NICENESS = 10
#: Peak resident size past which a child retires after its file: Python keeps the memory a
#: huge header took, and the next file gets a fresh child instead.
RETIRE_RSS_KIB = 512 * 1024

#: What a view digest stands for: plan, pseudonymizer, layout, header bound (None: default).
_Setup = tuple[Plan, Pseudonymizer, Layout, "int | None"]
_Job = tuple[str, str, "PurePosixPath | None", "_Setup | None"]


@dataclass(frozen=True, slots=True)
class Rendered:
    """What became of one render. Carries no path and no value."""

    view: View | None = None
    reason: str = ""  #: why it is withheld (a :class:`Refused` reason or TIMEOUT_REASON)
    error: str = ""  #: the type of an unexpected exception in the renderer
    lost: bool = False  #: the child died (or was stopped) before it answered
    seconds: float = 0.0  #: time the child spent rendering (the bound, on a timeout)
    warnings: tuple[tuple[str, int], ...] = ()  #: pydicom warnings counted, by category


def render_context() -> ForkServerContext:
    """The fork server context, with the renderer preloaded in the server."""
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, ForkServerContext)
    # Effective for the server's first start only (it lives as long as the daemon).
    context.set_forkserver_preload(["deidfs.view.pool", "deidfs.export.folder"])
    return context


class RenderProcess:
    """One child process rendering one source at a time, for one thread.

    :meth:`render` is called by a single thread; :meth:`shutdown` may come from another
    (the daemon stopping), and ends a render in progress at once.
    """

    def __init__(
        self,
        name: str,
        context: ForkServerContext | None = None,
        retire_rss_kib: int = RETIRE_RSS_KIB,
    ) -> None:
        self.name = name
        self._context = context
        self._retire_rss_kib = retire_rss_kib
        self._lock = threading.Lock()  #: guards the process handle against shutdown
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._known: OrderedDict[str, None] = OrderedDict()  #: the child's plans, mirrored
        self._closed = False
        self.started = 0  #: child processes started (a timeout or a crash replaces one)

    @property
    def pid(self) -> int | None:
        """The process id of the current child (None before the first file)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        """Start the child now rather than for the first file (its descriptors are then
        open from the start, and the first file waits for no process to start)."""
        self._start()

    def _start(self) -> Connection | None:
        with self._lock:
            if self._closed:
                return None
            if self._proc is not None and self._conn is not None and self._proc.is_alive():
                return self._conn
            self._discard()
            context = self._context if self._context is not None else render_context()
            ours, theirs = context.Pipe(duplex=True)
            level = logging.getLogger().getEffectiveLevel()
            proc = context.Process(
                target=_serve,
                args=(theirs, os.getpid(), level, self._retire_rss_kib),
                name=self.name,
                daemon=True,
            )
            proc.start()
            theirs.close()
            self._proc, self._conn = proc, ours
            self._known.clear()
            self.started += 1
            return ours

    def _discard(self) -> None:
        """Kill and reap the child, close the pipe (lock held)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(STOP_SECONDS)
        if conn is not None:
            conn.close()

    def render(
        self,
        path: str,
        rel: PurePosixPath | None,
        digest: str,
        setup: _Setup,
        timeout: float,
    ) -> Rendered:
        """Render ``path`` in the child with the plan of ``digest``, within ``timeout`` s.

        Parameters
        ----------
        path, rel
            The source and its path relative to its folder (for the ``mirror`` layout).
        digest
            The view digest the plan, pseudonymizer, layout and header bound of ``setup``
            belong to.
        timeout
            Seconds the child may take; past them it is killed and the result says
            :data:`TIMEOUT_REASON`.
        """
        for _ in range(2):
            conn = self._start()
            if conn is None:
                return Rendered(lost=True)
            job: _Job
            if digest in self._known:
                self._known.move_to_end(digest)
                job = (digest, path, rel, None)
            else:
                self._known[digest] = None
                while len(self._known) > PLANS_KEPT:
                    self._known.popitem(last=False)
                job = (digest, path, rel, setup)
            try:
                conn.send(job)
                if not conn.poll(timeout):
                    with self._lock:
                        if self._conn is conn:
                            self._discard()  # cannot be interrupted: the next file gets a new one
                    return Rendered(reason=TIMEOUT_REASON, seconds=timeout)
                reply = conn.recv()
            except (EOFError, OSError):
                with self._lock:
                    if self._conn is conn:
                        self._discard()
                return Rendered(lost=True)
            if reply[0] == "missing":  # out of step with the child's plans: send it again
                self._known.clear()
                continue
            kind, what, seconds, counted, retired = reply
            if retired:
                with self._lock:
                    if self._conn is conn:
                        self._discard()  # it exits by itself; reaped now
            found = tuple(sorted(counted.items()))
            if kind == "ok":
                return Rendered(view=what, seconds=seconds, warnings=found)
            if kind == "refused":
                return Rendered(reason=what, seconds=seconds, warnings=found)
            return Rendered(error=what, seconds=seconds, warnings=found)
        return Rendered(error="PlanMismatch")

    def shutdown(self) -> None:
        """Stop for good, from any thread: the child is killed, a render in progress ends
        as lost. The thread that renders reaps the child (:meth:`close`): closing the pipe
        under its feet could hand its descriptor number to another file."""
        with self._lock:
            self._closed = True
            if self._proc is not None:
                self._proc.kill()

    def close(self) -> None:
        """Ask an idle child to exit, and reap it (killed after :data:`STOP_SECONDS`)."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
            if proc is not None:
                proc.join(STOP_SECONDS)
            self._discard()


def _quiet_child() -> None:
    """The child's share of the daemon's signal and warning handling, and its priority."""
    # Indexing is background work: where the CPU is short, reads of the mount go first.
    with contextlib.suppress(OSError):
        os.nice(RENDER_NICENESS)
    # A terminal's Ctrl-C or hang-up reaches the whole process group: the daemon decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Warnings quote element values; pydicom's are the twins of the records counted.
    warnings.simplefilter("ignore")


def _serve(conn: Connection, coordinator: int, level: int, retire_rss_kib: int) -> None:
    """A child's life: render what the parent sends until it says stop or goes away."""
    die_with_parent(coordinator)
    tally = LibraryWarnings(log_first=False)
    setup_logging(level, tally)
    _quiet_child()
    plans: OrderedDict[str, _Setup] = OrderedDict()
    while True:
        try:
            job: _Job | None = conn.recv()
        except (EOFError, OSError):
            return  # the daemon went away
        if job is None:
            return
        digest, path, rel, setup = job
        if setup is not None:
            plans[digest] = setup
            while len(plans) > PLANS_KEPT:
                plans.popitem(last=False)
        elif digest in plans:
            plans.move_to_end(digest)
        else:
            conn.send(("missing",))
            continue
        plan, pseudonymizer, layout, max_header_bytes = plans[digest]
        tally.take()
        started = time.perf_counter()
        reply: tuple[str, object]
        try:
            view = render_path(path, plan, pseudonymizer, layout, rel, max_header_bytes)
            reply = ("ok", view)
        except Refused as exc:
            reply = ("refused", exc.reason)
        except Exception as exc:  # reported by type, as an in-process render's would be
            reply = ("error", type(exc).__name__)
        retire = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > retire_rss_kib
        try:
            conn.send((*reply, time.perf_counter() - started, tally.take(), retire))
        except OSError:
            return
        if retire:
            return
