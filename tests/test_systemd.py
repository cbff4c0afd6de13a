"""systemd integration: sd_notify datagrams, watchdog liveness, journald logs, the unit file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Daemon, mounted_type, sample_file, wait_for

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "deidfs.service"

#: Options that give the service a private mount namespace (the FUSE mount would be
#: invisible on the host), or NoNewPrivileges (setuid fusermount3 must work).
FORBIDDEN = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "NoNewPrivileges",
    "MountFlags",
)


class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="deidfs-notify-"))
        self.path = self.dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def receive_until(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 20.0
    ) -> dict[str, str]:
        """Read datagrams until one satisfies ``predicate``; all are kept in order."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no such notification within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)
            if predicate(fields):
                return fields

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def _start_under_fake_systemd(d: Daemon, notify: NotifySocket, watchdog_usec: int) -> Path:
    """Start ``d`` as systemd would: NOTIFY_SOCKET, WATCHDOG_USEC, stderr as JOURNAL_STREAM."""
    log_path = d.root / "journal.log"
    log_path.touch()
    st = log_path.stat()
    env = dict(os.environ)
    env.update(
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC=str(watchdog_usec),
        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
    )
    with open(log_path, "ab") as log:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "deidfs", "run", "--config", str(d.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    d._log_files.append(log_path)
    return log_path


@pytest.mark.fuse
def test_notifications_watchdog_and_journal_logs(
    daemon_factory: Callable[..., Daemon], notify: NotifySocket
) -> None:
    d = daemon_factory()
    src = d.incoming / "ct.dcm"
    src.write_bytes(sample_file("CT_small.dcm").read_bytes())
    log_path = _start_under_fake_systemd(d, notify, watchdog_usec=600_000)
    ready = notify.receive_until(lambda m: m.get("READY") == "1")
    # READY only once everything is up: the mount answers and the control socket exists.
    assert mounted_type(d.mnt) == "fuse.deidfs"
    assert (d.state / "control.sock").exists()
    assert "folder(s)" in ready.get("STATUS", "")
    # Watchdog pings keep coming while every part is alive (every 0.3 s here).
    first = len(notify.messages)
    for _ in range(3):
        notify.receive_until(lambda m: m.get("WATCHDOG") == "1")
    assert len(notify.messages) - first >= 3
    d.wait_views(1)

    # A reload is bracketed by RELOADING=1 (with the monotonic time) and READY=1 + STATUS.
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    reloading = notify.receive_until(lambda m: m.get("RELOADING") == "1")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    again = notify.receive_until(lambda m: m.get("READY") == "1")
    assert "1 file(s) served" in again["STATUS"]

    d.proc.send_signal(signal.SIGTERM)
    notify.receive_until(lambda m: m.get("STOPPING") == "1")
    assert d.proc.wait(15) == 0
    assert mounted_type(d.mnt) is None
    assert not (d.state / "control.sock").exists()

    # Under journald: a <priority> prefix on every line, no timestamps, no source names.
    # (libfuse writes a few lines of its own, unprefixed: journald files them as info.)
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("<")]
    assert len(lines) >= 3
    for line in lines:
        assert re.match(r"^<[2-7]>[a-z_.]+: ", line), line
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line), line
    assert " INFO deidfs" not in log_path.read_text()  # the interactive format is not used
    text = "\n".join(lines)
    assert "<6>deidfs.service.core: serving 1 folder(s)" in text
    assert "ct.dcm" not in text
    assert str(d.incoming) not in text


@pytest.mark.fuse
def test_watchdog_pings_only_while_every_part_is_alive(tmp_path: Path) -> None:
    from deidfs.config.model import Config, DaemonConfig, FolderConfig
    from deidfs.deid.profiles import BUILTIN_PROFILES
    from deidfs.service.core import Service

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config = Config(
        daemon=DaemonConfig(
            mountpoint=tmp_path / "mnt",
            state_dir=tmp_path / "state",
            export_dir=tmp_path / "export",
            control_socket=tmp_path / "state" / "control.sock",
            metrics_address="",
            settle_seconds=0.2,
            reconcile_seconds=0,
            poll_seconds=0.5,
        ),
        folders={"ct": FolderConfig(id="ct", path=incoming, profile="Basic")},
        profiles=dict(BUILTIN_PROFILES),
    )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/fuse")
    service = Service(config)
    try:
        service.start()
        assert service.ready()
        assert service.alive()
        assert service._healthy_for_watchdog(5.0)  # the FUSE loop answers a statfs
        # A watcher whose threads died: the daemon is no longer whole, pings must stop.
        folder = service._folders["ct"]
        assert folder.watcher is not None
        folder.watcher.stop()
        wait_for(lambda: not service.alive())
        assert not service._healthy_for_watchdog(1.0)
    finally:
        service.stop()
    assert not service.ready()
    assert mounted_type(tmp_path / "mnt") is None


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with its commands pointed at this checkout's deidfs (verify needs them)."""
    deidfs = Path(sys.executable).parent / "deidfs"
    if not deidfs.exists():
        pytest.skip("the deidfs console script is not installed next to the interpreter")
    copy = tmp_path / "deidfs.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/deidfs", str(deidfs)))
    return copy


@pytest.mark.external
def test_unit_file_verifies_without_any_complaint(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys and bad values: any output is a failure.
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    # A ratchet on the sandboxing that is possible without a mount namespace.
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=80", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_unit_file_settings() -> None:
    keys: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key, []).append(value)
    assert keys["Type"] == ["notify"]
    assert keys["NotifyAccess"] == ["main"]
    assert keys["WatchdogSec"] == ["60s"]
    assert keys["ExecReload"][0].endswith("reload --wait")
    assert keys["RestartPreventExitStatus"] == ["78"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["KillMode"] == ["mixed"]
    # Stale mounts cleared before start and after stop, failures ignored, full privileges.
    for key in ("ExecStartPre", "ExecStopPost"):
        assert keys[key][0].startswith("-+")
        assert keys[key][0].endswith("unmount")
    assert "CAP_SYS_ADMIN" in keys["CapabilityBoundingSet"][0]
    for option in FORBIDDEN:
        assert option not in keys, f"{option} would hide the mount or break fusermount3"
    # ... and the reason is written down in the unit.
    assert "mount namespace" in UNIT.read_text()
