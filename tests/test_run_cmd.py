"""``deidfs run``, ``deidfs unmount`` and ``deidfs demo`` on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deidfs.config.load import load_config
from deidfs.demo import SAMPLES, write_demo


def _deidfs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deidfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_run_with_a_bad_config_exits_78_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "deidfs.toml"
    config.write_text('[daemon]\nmountpoint = "mnt"\nmountpiont = "typo"\n')
    done = _deidfs("run", "--config", str(config))
    assert done.returncode == os.EX_CONFIG
    assert f"{config}:3" in done.stderr
    assert "mountpiont" in done.stderr
    assert not (tmp_path / "mnt").exists()  # nothing was started


def test_run_without_a_config_file_fails_cleanly(tmp_path: Path) -> None:
    done = _deidfs("run", "--config", str(tmp_path / "missing.toml"))
    assert done.returncode == os.EX_NOINPUT
    assert "not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_unmount_with_nothing_mounted_succeeds(tmp_path: Path) -> None:
    config = tmp_path / "deidfs.toml"
    config.write_text(f'[daemon]\nmountpoint = "{tmp_path / "mnt"}"\n')
    assert _deidfs("unmount", "--config", str(config)).returncode == 0


def test_demo_writes_a_valid_config_and_samples(tmp_path: Path) -> None:
    done = _deidfs("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deidfs run --config demo/deidfs.toml" in done.stdout
    demo = tmp_path / "demo"
    config = load_config(demo / "deidfs.toml")
    assert config.daemon.mountpoint == demo / "mnt"
    assert config.daemon.state_dir == demo / "state"
    assert config.daemon.export_dir == demo / "export"
    assert config.folders["samples"].path == demo / "incoming"
    assert config.folders["samples"].profile == "Nominal"
    assert config.profiles["Nominal"].base == "Basic"
    copied = {p.relative_to(demo / "incoming").as_posix() for p in (demo / "incoming").rglob("*")}
    assert {rel for _, rel in SAMPLES} <= copied
    assert {"DICOMDIR", "README.txt"} <= copied


def test_demo_keeps_what_exists(tmp_path: Path) -> None:
    first = write_demo(tmp_path / "d")
    (first.config).write_text(first.config.read_text() + "# edited\n")
    second = write_demo(tmp_path / "d")
    assert not second.config_written
    assert second.copied == ()
    assert first.config.read_text().endswith("# edited\n")
