"""Shared fixtures: sample files, and a real deidfs daemon (subprocess) on a real mount."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from pydicom.data import get_testdata_file

from deidfs.config import Config, load_config
from deidfs.deid.plan import compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.render import Layout, render_path, write_view
from deidfs.secret import load_or_create_key

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
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
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
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"daemon did not mount within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _serving(self) -> bool:
        """Mounted and answering (a stale mount from a killed run answers ENOTCONN)."""
        if mounted_type(self.mnt) != "fuse.deidfs":
            return False
        try:
            os.statvfs(self.mnt)  # never answered from the kernel's caches
            return self.folder.is_dir()
        except OSError:
            return False

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
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

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
