"""Live refresh: a running daemon applies configuration changes without restart or unmount."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from conftest import Daemon, mounted_type, sample_file, wait_for
from deidfs.cli.ops_cmd import format_status
from deidfs.config import edit as config_edit
from deidfs.config import edit_folders, edit_profiles
from deidfs.config.edit import Edit
from deidfs.config.edit_profiles import ProfileChanges
from deidfs.config.load import parse_config
from deidfs.deid.standard import Option
from deidfs.ops.control_client import call

pytestmark = pytest.mark.fuse


def _edit(d: Daemon, edit: Edit) -> None:
    """Edit the daemon's configuration the way ``deidfs profile/folder`` does."""
    config_edit.edit_config(d.config_path, edit, lambda text: parse_config(text, d.config_path))


def _save_by_rename(path: Path, text: str) -> None:
    """Save like an editor: write a new file beside it, then rename it over the old one."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cli(d: Daemon, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deidfs", *argv, "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _status(d: Daemon) -> dict[str, Any]:
    reply = call(d.state / "control.sock", "status")
    assert reply.ok
    return dict(reply.result)


def _uids(view: Path) -> tuple[str, str]:
    ds = dcmread(view, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def _research_profile(d: Daemon) -> None:
    """Add profile Research = Basic + Retain UIDs, not yet used by any folder."""
    _edit(d, edit_profiles.add_profile("Research", base="Basic"))
    _edit(
        d,
        edit_profiles.edit_profile(
            "Research", ProfileChanges(options=((True, Option.RETAIN_UIDS),))
        ),
    )


def test_profile_change_applies_to_views_of_a_mount_in_use(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    sources = [d.add(sample_file(n), n) for n in ("CT_small.dcm", "MR_small.dcm")]
    originals = {_uids(s)[0] for s in sources}
    views = d.wait_views(2)
    old_names = {v.name for v in views}
    assert {_uids(v)[0] for v in views}.isdisjoint(originals)  # Basic: new UIDs
    # The mount is in use: a shell sits in it and a reader holds a view open.
    cwd = os.open(d.folder, os.O_RDONLY | os.O_DIRECTORY)
    held = os.open(views[0], os.O_RDONLY)
    # And one who read the other view before: their next open is answered in C.
    views[1].read_bytes()
    held_c = os.open(views[1], os.O_RDONLY | os.O_DIRECT)
    try:
        _research_profile(d)
        _edit(d, edit_folders.set_folder_profile("samples", "Research"))
        done = _cli(d, "reload", "--wait")
        assert done.returncode == 0, done.stderr
        # Fail closed: once the reload is done, no view of the old profile is served.
        assert not {v.name for v in d.views()} & old_names
        # The views come back rendered with the new profile: the original UIDs are kept.
        new_views = d.wait_views(2)
        assert {_uids(v)[0] for v in new_views} == originals
        for src in sources:
            rel, data = d.expected(src, profile="Research")
            assert (d.folder / rel).read_bytes() == data
        # The handle opened on the old view does not mix versions: it fails, never serves.
        # (EIO from deidfs, or ENOENT from libfuse once the kernel dropped the old name.)
        with pytest.raises(OSError, match=r"Input/output error|No such file") as failed:
            os.pread(held, 4096, 0)
        assert failed.value.errno in (errno.EIO, errno.ENOENT)
        with pytest.raises(OSError, match=r"Input/output error|No such file") as failed:
            os.pread(held_c, 4096, 0)
        assert failed.value.errno in (errno.EIO, errno.ENOENT)
        assert os.listdir(cwd)  # the directory the shell sits in still works
    finally:
        os.close(held_c)
        os.close(held)
        os.close(cwd)
    assert mounted_type(d.mnt) == "fuse.deidfs"
    st = _status(d)
    assert st["folders"][0]["profile"] == "Research"
    assert st["last_reload"]["ok"] is True
    assert st["config"]["sha256"] == d.config().sha256
    log = d.log()
    assert "Nominal -> Research" in log
    for src in sources:
        assert src.name not in log


def test_file_changes_are_picked_up_by_themselves(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1)
    other = tmp_path / "second"
    other.mkdir()
    (other / "sub").mkdir()
    # A folder is added (editor-style save: new file renamed over the old one) ...
    text = d.config_path.read_text()
    added = text + f'\n[folders.second]\npath = "{other}"\nprofile = "Basic"\n'
    _save_by_rename(d.config_path, added)
    wait_for((d.mnt / "second").is_dir)
    src = other / "sub" / "mr.dcm"
    src.write_bytes(sample_file("MR_small.dcm").read_bytes())
    wait_for(lambda: len([p for p in (d.mnt / "second").rglob("*") if p.is_file()]) == 1)
    st = _status(d)
    assert [f["id"] for f in st["folders"]] == ["samples", "second"]
    assert st["last_reload"]["trigger"] == "file"
    # ... and removed again: its directory goes, the other folder keeps serving.
    _save_by_rename(d.config_path, text)
    wait_for(lambda: not (d.mnt / "second").exists())
    assert sorted(os.listdir(d.mnt)) == ["samples"]
    assert len(d.views()) == 1
    assert [f["id"] for f in _status(d)["folders"]] == ["samples"]
    assert src.exists()  # originals are never touched


def test_a_broken_config_is_reported_and_the_last_good_one_keeps_serving(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    src = d.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = d.wait_views(1)
    before = view.read_bytes()
    good = d.config_path.read_text()
    broken = good.replace('layout = "dicom"', 'layuot = "dicom"')
    line = broken.splitlines().index('layuot = "dicom"') + 1
    _save_by_rename(d.config_path, broken)
    done = _cli(d, "reload", "--wait")
    assert done.returncode == 78, done.stderr
    assert f"{d.config_path}:{line}: folders.samples.layuot: unknown key" in done.stderr
    assert "last good configuration keeps serving" in done.stderr
    # Still serving the same bytes, and saying so.
    assert view.read_bytes() == before
    d.add(sample_file("MR_small.dcm"), "mr.dcm")
    d.wait_views(2)
    st = _status(d)
    assert st["last_reload"]["ok"] is False
    assert any("folders.samples.layuot" in e for e in st["last_reload"]["errors"])
    assert st["config"]["sha256"] == parse_config(good, d.config_path).sha256
    shown = format_status(st)  # what `deidfs status` prints
    assert "REJECTED" in shown
    assert "folders.samples.layuot" in shown
    assert f"{d.config_path}:{line}: folders.samples.layuot" in d.log()
    # The file watch does not retry the same broken content over and over.
    assert d.log().count("folders.samples.layuot: unknown key") <= 2
    # Fixed: accepted again.
    _save_by_rename(d.config_path, good)
    assert call(d.state / "control.sock", "reload", {"wait": True}).ok
    st = _status(d)
    assert st["last_reload"]["ok"] is True
    assert view.read_bytes() == before
    assert src.exists()


def test_a_config_that_is_not_toml_is_reported_with_its_line_not_as_a_daemon_not_running(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = d.wait_views(1)
    before = view.read_bytes()
    good = d.config_path.read_text()
    # The daemon's socket is not the default one: only the (broken) file names it.
    broken = good.replace("[folders.samples]", "[folders.samples")
    line = broken.splitlines().index("[folders.samples") + 1
    _save_by_rename(d.config_path, broken)
    for argv in (("reload", "--wait"), ("reload",), ("status",), ("withheld",)):
        done = _cli(d, *argv)
        assert done.returncode == 78, (argv, done.stderr)
        assert f"{d.config_path}:{line}: invalid TOML" in done.stderr, (argv, done.stderr)
        assert "(column " in done.stderr
        assert "not running" not in done.stderr
        assert "give it with --socket" in done.stderr
    # Given the socket, the daemon answers: still serving the last good configuration.
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "status", "--socket", str(d.state / "control.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "samples" in done.stdout
    assert view.read_bytes() == before
    # A configuration file that is not there is said to be missing (66), not the daemon.
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "status", "--config", str(d.root / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 66, done.stderr
    assert "configuration file not found" in done.stderr


def _reload_failures(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http on loopback)
        text = resp.read().decode()
    match = re.search(r'^deidfs_config_reloads_total\{result="failure"\} (\S+)$', text, re.M)
    assert match is not None, text
    return float(match.group(1))


def test_a_blank_config_file_is_refused_and_the_mount_keeps_its_folders(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace('metrics_address = ""', f'metrics_address = "127.0.0.1:{port}"')
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    d.start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    (view,) = d.wait_views(1)
    before = view.read_bytes()
    good = d.config_path.read_text()
    good_sha = d.config().sha256
    assert _reload_failures(metrics) == 0
    # An editor truncates the file in place and has not written it yet: the file watch
    # must not apply it.
    d.config_path.write_text("")
    wait_for(lambda: _status(d)["last_reload"]["ok"] is False, timeout=15)
    st = _status(d)
    assert st["last_reload"]["trigger"] == "file"
    assert any("configuration file is empty" in e for e in st["last_reload"]["errors"])
    assert st["config"]["sha256"] == good_sha
    assert [f["id"] for f in st["folders"]] == ["samples"]
    assert os.listdir(d.mnt) == ["samples"]
    assert view.read_bytes() == before
    assert "configuration rejected, the last good one keeps serving" in d.log()
    assert "configuration file is empty" in d.log()
    assert _reload_failures(metrics) == 1
    # Only comments and blank lines left: refused the same way, by the file watch ...
    _save_by_rename(d.config_path, "# deidfs configuration\n\n   \n# [folders.samples]\n")
    wait_for(lambda: _reload_failures(metrics) == 2, timeout=15)
    assert "nothing but whitespace and comments" in " ".join(_status(d)["last_reload"]["errors"])
    # ... and by `deidfs reload`, which says so and fails, with or without --wait.
    for argv in (("reload", "--wait"), ("reload",)):
        done = _cli(d, *argv)
        assert done.returncode == 78, (argv, done.stderr)
        assert f"{d.config_path}: the configuration file is blank" in done.stderr, done.stderr
        assert "would remove every folder" in done.stderr
    sock = str(d.state / "control.sock")
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "reload", "--wait", "--socket", sock],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert "last good configuration keeps serving" in done.stderr
    assert "nothing but whitespace and comments" in done.stderr
    assert _reload_failures(metrics) == 3
    assert os.listdir(d.mnt) == ["samples"]
    assert view.read_bytes() == before
    assert _status(d)["config"]["sha256"] == good_sha
    # The file written in full again: accepted, nothing to change.
    _save_by_rename(d.config_path, good)
    done = _cli(d, "reload", "--wait")
    assert done.returncode == 0, done.stderr
    assert _status(d)["last_reload"]["ok"] is True
    # An admin removing every folder on purpose (the rest of the file still there) may.
    no_folders = good[: good.index("[folders.samples]")] + good[good.index("[profiles.") :]
    _save_by_rename(d.config_path, no_folders)
    done = _cli(d, "reload", "--wait")
    assert done.returncode == 0, done.stderr
    assert "folder samples removed" in done.stdout
    wait_for(lambda: not (d.mnt / "samples").exists())
    assert _status(d)["folders"] == []


def test_sighup_reloads(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory().start()
    other = tmp_path / "hup"
    other.mkdir()
    d.config_path.write_text(
        d.config_path.read_text() + f'\n[folders.hup]\npath = "{other}"\nprofile = "HIPAA"\n'
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for((d.mnt / "hup").is_dir)
    wait_for(lambda: "reload requested (SIGHUP)" in d.log())
    st = _status(d)
    assert st["last_reload"]["ok"] is True
    assert {f["id"]: f["profile"] for f in st["folders"]} == {"hup": "HIPAA", "samples": "Nominal"}
    assert d.proc.poll() is None


def test_settings_that_need_a_restart_are_warned_about_not_applied(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1)
    text = d.config_path.read_text()
    moved = text.replace(f'mountpoint = "{d.mnt}"', f'mountpoint = "{tmp_path / "elsewhere"}"')
    moved = moved.replace("settle_seconds = 0.3", "settle_seconds = 0.2")
    assert moved != text
    d.config_path.write_text(moved)
    done = _cli(d, "reload", "--wait")
    assert done.returncode == 0, done.stderr
    assert "mountpoint changed: takes effect at the next restart" in done.stderr
    assert mounted_type(d.mnt) == "fuse.deidfs"
    assert not (tmp_path / "elsewhere").exists()
    assert len(d.views()) == 1
    st = _status(d)
    assert st["mount"]["mountpoint"] == str(d.mnt)
    assert any("mountpoint" in w for w in st["last_reload"]["warnings"])
    # What can change did: the watchers run with the new timing and still report files.
    d.add(sample_file("MR_small.dcm"), "mr.dcm")
    d.wait_views(2)
    done = _cli(d, "reload")
    assert done.returncode == 0, done.stderr
    assert "reload requested" in done.stdout
