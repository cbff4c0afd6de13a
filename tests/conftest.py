"""Shared fixtures: sample files, and a real deidfs daemon (subprocess) on a real mount."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from pydicom.data import get_testdata_file

from deidfs.config.load import load_config
from deidfs.config.model import Config
from deidfs.deid.plan import compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.secret import load_or_create_key
from deidfs.view.render import Layout, render_path, write_view

#: Sample files that render without warnings under every built-in profile but +Pixel.
SAMPLE_NAMES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")


def sample_file(name: str) -> Path:
    """A file of pydicom's bundled test data."""
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(str(found))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> object:
    """Poll until ``predicate()`` is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


def mounted_type(mountpoint: Path) -> str | None:
    """The file system type mounted at ``mountpoint``, from /proc/self/mountinfo."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                found = right.split()[0]
    return found


def force_unmount(mountpoint: Path) -> None:
    """Leave nothing mounted at ``mountpoint`` (tests must never leave a mount behind)."""
    for argv in (["fusermount3", "-u", "-q"], ["fusermount3", "-u", "-q", "-z"]):
        if mounted_type(mountpoint) is None:
            return
        subprocess.run([*argv, str(mountpoint)], check=False, capture_output=True, timeout=10)


CONFIG_TEMPLATE = """\
[daemon]
mountpoint = "{mnt}"
state_dir = "{state}"
export_dir = "{export}"
control_socket = "{state}/control.sock"
metrics_address = ""
settle_seconds = {settle}
poll_seconds = 0.5
reconcile_seconds = {reconcile}
workers = 2
cache_mib = 16

[folders.samples]
path = "{incoming}"
profile = "{profile}"
layout = "{layout}"

[profiles.Nominal]
base = "Basic"
"""


@dataclass
class Daemon:
    """A ``python -m deidfs run`` subprocess serving ``incoming`` at ``mnt``."""

    root: Path
    profile: str = "Nominal"
    layout: str = "dicom"
    settle: float = 0.3
    reconcile: float = 0.0
    #: argv put before the daemon's own (e.g. ``setpriv`` to drop capabilities)
    command_prefix: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    _control_socket: Path = Path()
    _log_files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.incoming = self.root / "incoming"
        self.mnt = self.root / "mnt"
        self.state = self.root / "state"
        self.export = self.root / "export"
        self.config_path = self.root / "deidfs.toml"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            CONFIG_TEMPLATE.format(
                mnt=self.mnt,
                state=self.state,
                export=self.export,
                incoming=self.incoming,
                settle=self.settle,
                reconcile=self.reconcile,
                profile=self.profile,
                layout=self.layout,
            )
        )

    # -- process ---------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        log_path = self.root / f"daemon-{self.runs}.log"
        self._log_files.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *self.command_prefix,
                    sys.executable,
                    "-m",
                    "deidfs",
                    "--log-level",
                    "debug",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._control_socket = self.config().daemon.control_socket
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"daemon did not mount within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _serving(self) -> bool:
        """Mounted and answering (a stale mount from a killed run answers ENOTCONN), and
        the control socket accepting (it comes up after the mount)."""
        if mounted_type(self.mnt) != "fuse.deidfs":
            return False
        try:
            os.statvfs(self.mnt)  # never answered from the kernel's caches
            if not self.folder.is_dir():
                return False
        except OSError:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self._control_socket))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"daemon did not stop within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        force_unmount(self.mnt)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self._log_files if p.exists())

    # -- sources and views -----------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.mnt / "samples"

    def add(self, src: Path, rel: str) -> Path:
        """Copy ``src`` to ``incoming/rel`` the way transfer tools do: temp name, rename."""
        dest = self.incoming / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def views(self) -> list[Path]:
        # os.walk ignores directories that vanish mid-walk (a view removed while listing);
        # Path.rglob raises FileNotFoundError for them.
        found = [Path(top, name) for top, _dirs, files in os.walk(self.folder) for name in files]
        return sorted(found)

    def wait_views(self, count: int, timeout: float = 10.0) -> list[Path]:
        def ready() -> tuple[list[Path]] | None:
            views = self.views()
            return (views,) if len(views) == count else None  # truthy even when empty

        result = wait_for(ready, timeout)
        assert isinstance(result, tuple)
        return result[0]

    def config(self) -> Config:
        return load_config(self.config_path)

    def expected(self, source: Path, profile: str | None = None) -> tuple[str, bytes]:
        """(view relpath, bytes) that ``deidfs anonymize`` writes for ``source``."""
        cfg = self.config()
        plan = compile_plan(cfg.profiles[profile or self.profile])
        pseudo = Pseudonymizer(load_or_create_key(self.state))
        rel = None
        if source.is_relative_to(self.incoming):
            rel = PurePosixPath(source.relative_to(self.incoming).as_posix())
        view = render_path(source, plan, pseudo, Layout(self.layout), rel)
        fd = os.open(source, os.O_RDONLY)
        try:
            with tempfile.TemporaryFile() as out:
                write_view(view, fd, out)
                out.flush()
                out.seek(0)
                return str(view.relpath), out.read()
        finally:
            os.close(fd)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Build daemons (not started); every one is stopped and unmounted at teardown."""
    made: list[Daemon] = []

    def make(**kwargs: object) -> Daemon:
        d = Daemon(root=tmp_path / f"d{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
    for d in made:
        assert mounted_type(d.mnt) is None, "a mount was left behind"


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A running daemon with an empty watched folder, Nominal (= Basic) profile."""
    return daemon_factory().start()


@pytest.fixture(scope="session", autouse=True)
def _testdata_untouched() -> Iterator[None]:
    """The bundled sample files are originals too: nothing may change them."""
    names = (*SAMPLE_NAMES, "MR_truncated.dcm", "dicomdirtests/DICOMDIR")
    before = {n: sha256(sample_file(n)) for n in names}
    yield
    after = {n: sha256(sample_file(n)) for n in names}
    assert after == before


# -- reliability, hostile input and security helpers ---------------------------------------

#: What no log line of the suite may ever contain: the leak corpus markers (``MRK0<5 digits>1``,
#: never a base32 token), the bad-input marker, the leak corpus UID root, and the markers
#: planted by the security, fuzz and reliability tests (``QZXLOG<digits>``).
LOG_LEAK_PATTERN = re.compile(
    rb"MRK0\d{5}1|QZX9SECRET|QZXLOG\d+|1\.2\.826\.0\.1\.3680043\.10\.999\."
)
#: Log files scanned at the end of the session: daemon logs and captured CLI stderr.
LOG_GLOBS = ("daemon-*.log", "*.stderr.log")


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process (``VmRSS`` in /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def error_lines(log: str) -> list[str]:
    """Lines of a daemon log at level ERROR or CRITICAL, and Python tracebacks."""
    return [
        line
        for line in log.splitlines()
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
    ]


def add_folder(d: Daemon, folder_id: str, path: Path, profile: str = "Nominal") -> None:
    """Add a watched folder to a daemon's configuration (before it starts)."""
    with open(d.config_path, "a", encoding="utf-8") as f:
        f.write(f'\n[folders.{folder_id}]\npath = "{path}"\nprofile = "{profile}"\n')


def set_daemon_option(d: Daemon, line: str) -> None:
    """Add one ``key = value`` line to a daemon's ``[daemon]`` table (before it starts)."""
    text = d.config_path.read_text(encoding="utf-8")
    d.config_path.write_text(text.replace("[daemon]\n", f"[daemon]\n{line}\n", 1))


def run_cli(
    args: list[str], log_dir: Path, name: str, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """``python -m deidfs --log-level debug ARGS``; stderr is kept in ``<name>.stderr.log``
    (scanned for leak markers at the end of the session)."""
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "--log-level", "debug", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.stderr.log").write_text(done.stderr, errors="surrogateescape")
    return done


class Originals:
    """Checksums, modes and times of original files, to prove nothing changed them."""

    def __init__(self) -> None:
        self._state: dict[Path, tuple[str, int, int]] = {}

    @staticmethod
    def _of(path: Path) -> tuple[str, int, int]:
        st = path.lstat()
        return sha256(path), st.st_mtime_ns, stat.S_IMODE(st.st_mode)

    def record(self, *paths: Path) -> None:
        """Remember files, or every regular file below directories (links not followed)."""
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                self.record(*(c for c in p.rglob("*") if c.is_file() and not c.is_symlink()))
            elif p.is_file() and not p.is_symlink():
                self._state[p] = self._of(p)

    def forget(self, *paths: Path) -> None:
        """Stop checking files the test itself changes or deletes."""
        for p in paths:
            self._state.pop(p, None)

    def changed(self) -> list[Path]:
        """Recorded files that are gone or differ from when they were recorded."""
        bad = []
        for p, before in sorted(self._state.items()):
            try:
                if self._of(p) != before:
                    bad.append(p)
            except OSError:
                bad.append(p)
        return bad

    def __len__(self) -> int:
        return len(self._state)


@pytest.fixture(scope="module")
def originals() -> Iterator[Originals]:
    """Originals recorded by a module's tests; checked unchanged at the end of the module."""
    registry = Originals()
    yield registry
    assert registry.changed() == [], "originals were changed"


@pytest.fixture(scope="session", autouse=True)
def _no_leak_marker_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every daemon log and captured CLI stderr of the session is free of leak markers."""
    yield
    base = tmp_path_factory.getbasetemp()
    found: list[str] = []
    for pattern in LOG_GLOBS:
        for path in base.rglob(pattern):
            for m in LOG_LEAK_PATTERN.finditer(path.read_bytes()):
                found.append(f"{path.relative_to(base)}: {m.group().decode(errors='replace')}")
    assert found == [], found[:20]
