"""Exports stay where they belong: their files, and their worker processes.

Destinations are resolved and refused (exit 77) inside a watched folder, the state
directory or the mount, and, through the daemon, outside its export directory, whatever
symbolic links stand in the way, including one swapped in while the export runs. Worker
processes die with the command that started them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deidfs.cli import common
from test_export import is_temp_name, many_sources, tree, write_config_file


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie left to an init that does not reap is dead too)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# -- worker processes ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "anonymize"])
def test_workers_die_with_a_killed_command(tmp_path: Path, command: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    want = many_sources(src, 400)
    cfg = write_config_file(tmp_path, src)
    if command == "export":
        out = tmp_path / "export" / "ct"
        argv = ["--config", str(cfg), "export", "ct", "--quiet", "--workers", "2"]
    else:
        out = tmp_path / "anon"
        argv = ["anonymize", str(src), "--profile", "Basic", "--to", str(out), "--quiet"]
        argv += ["--config", str(cfg), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "DEIDFS_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deidfs", *argv], env=env, stdin=subprocess.DEVNULL
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and (len(workers) < 2 or not list(out.rglob("*.dcm"))):
            assert time.monotonic() < deadline, "the export wrote nothing within 60 s"
            workers |= children(proc.pid)
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # the command alone, as `kill -9 PID` does
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, "the export ended before it could be killed"
        assert len(workers) >= 2
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if alive(pid)] == [], "workers outlived their command"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # Nothing writes any more, and what is there under a final name is complete.
    before = tree(out)
    time.sleep(0.5)
    assert tree(out) == before
    visible = {rel: data for rel, data in before.items() if not is_temp_name(Path(rel).name)}
    assert 0 < len(visible) < len(want)
    for rel, data in visible.items():
        assert data == want[rel]
