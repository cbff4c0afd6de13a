"""Exports stay where they belong: their files, and their worker processes.

Destinations are resolved and refused (exit 77) inside a watched folder, the state
directory or the mount, and, through the daemon, outside its export directory, whatever
symbolic links stand in the way, including one swapped in while the export runs. Worker
processes die with the command that started them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import deidfs.export.workers as export_workers
import deidfs.export.writer as export_writer
from conftest import Daemon, run_cli, sample_file
from deidfs.cli import common
from deidfs.cli.main import main
from deidfs.config.load import load_config
from deidfs.export.errors import ExportError, ExportRefused
from deidfs.export.files import is_temp_name
from deidfs.export.folder import export_folder
from deidfs.export.summary import ExportStopped
from deidfs.view.render import View
from test_export import PSEUDO, many_sources, tree, write_config_file


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


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid``: children, theirs, and so on."""
    found = children(pid)
    for child in list(found):
        found |= descendants(child)
    return found


#: An export of a configured folder from a process with another thread (as the daemon's):
#: its workers start through a fork server. Arguments: the directory of test_export.py, the
#: work directory.
THREADED_EXPORT = """\
import sys, threading
from pathlib import Path
if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    import test_export as t
    from deidfs.export.folder import export_folder
    root = Path(sys.argv[2])
    config = t.make_config(root, root / "src")
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    export_folder(config, "ct", t.PSEUDO, workers=2)
"""


# -- worker processes ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "anonymize", "threaded"])
def test_workers_die_with_a_killed_command(tmp_path: Path, command: str) -> None:
    """``kill -9`` of the coordinator: its workers are gone within seconds, whether forked
    by it (commands) or by a fork server (a process with threads, as the daemon)."""
    src = tmp_path / "src"
    src.mkdir()
    want = many_sources(src, 400)
    cfg = write_config_file(tmp_path, src)
    if command == "export":
        out = tmp_path / "export" / "ct"
        argv = ["-m", "deidfs", "--config", str(cfg), "export", "ct", "--quiet"]
        argv += ["--workers", "2"]
    elif command == "anonymize":
        out = tmp_path / "anon"
        argv = ["-m", "deidfs", "anonymize", str(src), "--profile", "Basic", "--to", str(out)]
        argv += ["--quiet", "--config", str(cfg), "--workers", "2"]
    else:
        out = tmp_path / "export" / "ct"
        script = tmp_path / "threaded_export.py"
        script.write_text(THREADED_EXPORT)
        argv = [str(script), str(Path(__file__).parent), str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "DEIDFS_CONFIG"}
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdin=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and (len(workers) < 2 or not list(out.rglob("*.dcm"))):
            assert time.monotonic() < deadline, "the export wrote nothing within 60 s"
            workers |= descendants(proc.pid)
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


# -- destinations -------------------------------------------------------------------------------
def files_under(root: Path) -> dict[str, bytes]:
    """Every file and link below ``root`` (links by their target), by relative path."""
    if not root.exists():
        return {}
    found: dict[str, bytes] = {}
    for top, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = Path(top, name)
            rel = path.relative_to(root).as_posix()
            found[rel] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return found


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(configuration file, the exported folder's sources, another watched folder)."""
    src = tmp_path / "src"
    src.mkdir()
    many_sources(src, 3)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("another folder's source\n")
    cfg = write_config_file(tmp_path, src)
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(f'\n[folders.other]\npath = "{other}"\nprofile = "Basic"\n')
    return cfg, src, other


def watched(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """What the watched folders, the state directory and the mount point hold."""
    names = ("src", "other", "state", "mnt")
    return {name: files_under(tmp_path / name) for name in names}


@pytest.mark.parametrize(
    "target",
    [
        "link-to-own-folder",
        "link-to-other-folder",
        "other-folder",
        "state-dir",
        "link-to-state-dir",
        "mount",
        "link-to-mount-parent",
    ],
)
@pytest.mark.parametrize("command", ["export", "anonymize"])
def test_a_destination_where_no_export_may_write_exits_77(
    tmp_path: Path,
    setup: tuple[Path, Path, Path],
    target: str,
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg, src, other = setup
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "mnt").mkdir()
    links = tmp_path / "links"
    links.mkdir()
    to = {
        "link-to-own-folder": links / "own",
        "link-to-other-folder": links / "other",
        "other-folder": other,
        "state-dir": tmp_path / "state",
        "link-to-state-dir": links / "state",
        "mount": tmp_path / "mnt",
        "link-to-mount-parent": links / "parent" / "mnt",
    }[target]
    (links / "own").symlink_to(src)
    (links / "other").symlink_to(other)
    (links / "state").symlink_to(tmp_path / "state")
    (links / "parent").symlink_to(tmp_path)
    before = watched(tmp_path)
    if command == "export":
        argv = ["--config", str(cfg), "export", "ct", "--to", str(to), "--workers", "1"]
    else:
        argv = ["anonymize", str(src), "--profile", "Basic", "--to", str(to), "--config", str(cfg)]
    assert main(argv) == 77
    err = capsys.readouterr().err
    assert "is inside" in err
    assert watched(tmp_path) == before


def test_through_the_daemon_a_link_under_export_dir_is_refused(
    tmp_path: Path, setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The in-process side of the daemon's check (the real daemon is tested below)."""
    cfg, _src, _other = setup
    outside = tmp_path / "outside"
    outside.mkdir()
    export = tmp_path / "export"
    export.mkdir()
    (export / "out").symlink_to(outside)
    config = load_config(cfg)
    for to in (export / "out", export / "out" / "deeper"):
        with pytest.raises(ExportRefused, match="inside its export_dir") as refused:
            export_folder(config, "ct", PSEUDO, to=to, confine=True)
        assert refused.value.exit_code == 77
    assert files_under(outside) == {}


def test_a_link_swapped_in_for_the_destination_is_not_written_through(
    tmp_path: Path, setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked, then replaced by a link to a watched folder before the files are written: the
    writer (in this process or a worker) reaches its directory without following a link."""
    cfg, _src, other = setup
    config = load_config(cfg)
    dest = tmp_path / "export" / "ct"
    real_run_batch = export_workers.run_batch

    def swap_then_run(*args: Any, **kwargs: Any) -> bool:
        os.rename(dest, tmp_path / "export" / "moved")
        dest.symlink_to(other)
        return real_run_batch(*args, **kwargs)

    monkeypatch.setattr(export_workers, "run_batch", swap_then_run)
    before = watched(tmp_path)
    with pytest.raises(ExportStopped) as stopped:
        export_folder(config, "ct", PSEUDO, workers=1)
    assert stopped.value.exit_code == 77
    assert "symbolic link" in str(stopped.value)
    assert watched(tmp_path) == before
    assert [p for p in (tmp_path / "export" / "moved").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_link_swapped_in_below_the_destination_is_not_written_through(
    tmp_path: Path,
    setup: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """A patient's directory replaced by a link to a watched folder after its first file:
    the files of that directory still go where the writer opened it, none into the folder."""
    cfg, _src, other = setup
    config = load_config(cfg)
    export = tmp_path / "export"
    dest = export / "ct"
    real_write = export_writer.write_view_fd
    moved = export / "moved"

    def write_then_swap(view: View, src_fd: int, fd: int) -> None:
        real_write(view, src_fd, fd)  # (in a worker process, with workers)
        top = dest / view.relpath.parts[0]
        with contextlib.suppress(OSError):  # swapped once, by the first writer to get here
            os.mkdir(moved.with_suffix(".lock"))
            os.rename(top, moved)
            top.symlink_to(other)

    monkeypatch.setattr(export_writer, "write_view_fd", write_then_swap)
    before = watched(tmp_path)
    written, code = -1, 0
    try:
        written = export_folder(config, "ct", PSEUDO, workers=workers).written
    except ExportStopped as exc:
        code = exc.exit_code
    assert moved.is_dir(), "no file was written"
    assert files_under(other) == {"keep.txt": b"another folder's source\n"}
    assert watched(tmp_path) == before
    # Refused, or all in the directory the writer had opened.
    assert (written, code) in ((-1, 77), (3, 0))


@pytest.mark.fuse
def test_the_daemon_writes_through_no_link_under_its_export_dir(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A real daemon (root) asked over its control socket: a link under export_dir, as the
    folder's directory or as --to, to a directory outside it or to the watched folder."""
    d = daemon_factory().start()
    d.add(sample_file("CT_small.dcm"), "a/ct.dcm")
    d.wait_views(1)
    outside = tmp_path / "outside"
    outside.mkdir()
    d.export.mkdir()
    (d.export / "out").symlink_to(outside)
    (d.export / "in").symlink_to(d.incoming)
    (d.export / "samples").symlink_to(outside)
    incoming = files_under(d.incoming)
    base = ["--config", str(d.config_path), "export", "samples", "--via-daemon"]
    for n, extra in enumerate(
        ([], ["--to", str(d.export / "out")], ["--to", str(d.export / "in")])
    ):
        done = run_cli([*base, *extra], tmp_path, f"refused-{n}")
        assert done.returncode == 77, done.stderr
        assert "export_dir" in done.stderr or "is inside" in done.stderr
    assert files_under(outside) == {}
    assert files_under(d.incoming) == incoming
    (d.export / "samples").unlink()
    done = run_cli(base, tmp_path, "allowed")  # the same export, without the link: written
    assert done.returncode == 0, done.stderr
    assert len(list((d.export / "samples").rglob("*.dcm"))) == 1
    time.sleep(d.settle * 3)
    assert len(d.views()) == 1  # the daemon took none of its output for a source


def test_no_directory_descriptor_outlives_an_export(
    tmp_path: Path, setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The writers' directory descriptors are all closed: after a complete export, a refused
    one and an output that cannot be written (whose file system must stay unmountable)."""
    cfg, src, other = setup
    config = load_config(cfg)
    (tmp_path / "file").write_text("not a directory\\n")

    def open_fds() -> list[str]:
        return sorted(os.listdir("/proc/self/fd"))

    export_folder(config, "ct", PSEUDO)  # the first opens /proc/self/fd for good
    before = open_fds()
    assert export_folder(config, "ct", PSEUDO, to=tmp_path / "again").written == 3
    with pytest.raises(ExportRefused):
        export_folder(config, "ct", PSEUDO, to=other)
    anonymize = ["anonymize", str(src), "--profile", "Basic", "--config", str(cfg), "--to"]
    assert main([*anonymize, str(tmp_path / "file")]) == 73
    assert main([*anonymize, str(tmp_path / "anon")]) == 0
    if os.geteuid() == 0:  # a read-only file system, that must unmount afterwards
        ro = tmp_path / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
        try:
            assert main([*anonymize, str(ro)]) == 73
            with pytest.raises(ExportError, match="Read-only"):
                export_folder(config, "ct", PSEUDO, to=ro)
        finally:
            unmounted = subprocess.run(["umount", str(ro)], check=False, capture_output=True)
        assert unmounted.returncode == 0, unmounted.stderr
    capsys.readouterr()
    assert open_fds() == before
