"""Secrets, logs, permissions: the key is private, logs carry no PHI, the mount is read-only.

- The pseudonym key is created 0600 (its directory 0700); a key or state directory others
  can read or write stops the daemon at start with exit code 78 and a message saying what
  to run, and nothing is mounted.
- The daemon at ``--log-level debug`` serves, withholds, replaces and deletes files of the
  leak corpus (markers in values, nested items, private blocks, file meta, file and
  directory names), and ``deidfs export`` and ``deidfs anonymize`` run over the same files:
  the stderr of every process is searched for every marker, the key and the source paths.
- Every operation that would change the mount fails with EROFS for root; another user of
  an ``allow_other`` mount can read but change nothing.
- Originals are checked unchanged at the end of the module (the ``originals`` fixture).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (
    Daemon,
    Originals,
    error_lines,
    mounted_type,
    run_cli,
    sample_file,
    set_daemon_option,
    wait_for,
)
from deidfs.secret import KEY_FILE
from leak_corpus import UID_ROOT, build_leak_dataset, part10_bytes, write_source

pytestmark = pytest.mark.fuse


# -- the key ------------------------------------------------------------------------------------


def _start_expecting_failure(d: Daemon, timeout: float = 30.0) -> tuple[int, str]:
    """Run the daemon and wait for it to exit; (exit code, its output)."""
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "run", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    (d.root / f"refused-start-{d.runs}.stderr.log").write_text(done.stderr)
    return done.returncode, done.stderr


def test_key_is_created_private_and_refused_when_others_can_read_it(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory().start()
    key = d.state / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o700
    assert stat.S_IMODE((d.state / "index.sqlite3").stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert len(secret) == 64
    assert d.stop() == 0

    for mode in (0o644, 0o640, 0o604, 0o660):
        key.chmod(mode)
        code, err = _start_expecting_failure(d)
        assert code == 78, err
        assert "accessible by group or others" in err
        assert f"chmod 600 {key}" in err
        assert mounted_type(d.mnt) is None
        assert secret not in err
    key.chmod(0o600)

    d.state.chmod(0o770)  # others could swap the key file
    code, err = _start_expecting_failure(d)
    assert code == 78, err
    assert "writable by group or others" in err
    d.state.chmod(0o700)

    key.rename(d.state / "real.key")
    key.symlink_to(d.state / "real.key")
    code, err = _start_expecting_failure(d)
    assert code == 78, err
    assert "symbolic link" in err
    key.unlink()
    (d.state / "real.key").rename(key)

    d.start()  # all fixed: starts, same key
    assert key.read_text().strip() == secret
    assert d.stop() == 0
    assert secret not in d.log()


# -- logs -------------------------------------------------------------------------------------


def _needles(d: Daemon, corpus_names: list[str]) -> list[str]:
    """Every marker worth searching logs for: planted values, names, and source paths."""
    corpus = build_leak_dataset()
    needles = {UID_ROOT, "MRK0", *corpus_names}
    for plant in corpus.plants:
        if plant.value_text is not None and len(plant.value_text) >= 6:
            needles.add(plant.value_text)
        if plant.needle is not None and len(plant.needle) >= 6:
            needles.add(plant.needle.decode("latin-1"))
    needles.add(str(d.incoming) + "/")
    return sorted(needles)


def test_no_phi_in_any_log_at_debug_level(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, originals: Originals
) -> None:
    d = daemon_factory(profile="Basic")
    corpus = build_leak_dataset()
    data = part10_bytes(corpus.ds)
    marker_dir = "MRK0999991 Doe^Jane 19800101"
    names = [corpus.file_name, marker_dir, "MRK0999981_notes.txt", "MRK0999971_cut.dcm"]
    private = write_source(tmp_path / "private", corpus.file_name, corpus.ds)
    source = d.add(private, f"{marker_dir}/{corpus.file_name}")
    (d.incoming / names[2]).write_text("not DICOM: MRK0999961 Doe^Jane\n")
    (d.incoming / names[3]).write_bytes(data[: len(data) // 2])  # withheld: truncated
    latin = os.fsdecode(b"MRK0999951 M\xfcller.dcm")
    (d.incoming / latin).write_bytes(data)  # a duplicate view, under a Latin-1 name
    d.start()
    wait_for(lambda: len(_views(d)) == 1, timeout=30)
    wait_for(lambda: _readable(_views(d)), timeout=20)
    # Replaced in place, then deleted: events, re-indexing, stale opens.
    source.write_bytes(data)
    os.utime(source, ns=(1, 1))
    time.sleep(1.0)
    wait_for(lambda: _readable(_views(d)), timeout=20)
    (d.incoming / latin).unlink()
    source.unlink()
    wait_for(lambda: _views(d) == [], timeout=20)
    d.add(private, f"{marker_dir}/{corpus.file_name}")
    wait_for(lambda: len(_views(d)) == 1, timeout=30)
    wait_for(lambda: _readable(_views(d)), timeout=20)
    originals.record(d.incoming)

    logs = tmp_path / "logs"
    outputs = []
    for name, args in (
        (
            "export",
            ["export", "samples", "--config", str(d.config_path), "--to", str(tmp_path / "e")],
        ),
        (
            "anonymize",
            [
                *("anonymize", "--config", str(d.config_path), "--profile", "Basic"),
                *("--to", str(tmp_path / "a"), str(d.incoming)),
            ],
        ),
        ("status", ["status", "--config", str(d.config_path)]),
    ):
        done = run_cli(args, logs, name)
        assert done.returncode == 0, (name, done.stderr)
        outputs.append((name, done.stderr))
    assert d.stop() == 0
    outputs.append(("daemon", d.log()))

    needles = _needles(d, names)
    for name, text in outputs:
        found = [n for n in needles if n in text]
        assert found == [], (name, found)
    daemon_log = d.log()
    assert "withheld" in daemon_log  # the refusals were logged, by token
    assert " DEBUG " in daemon_log  # and the daemon did log at debug level
    assert error_lines(daemon_log) == []


def _views(d: Daemon) -> list[Path]:
    """The folder's view files (a walk that tolerates directories going away meanwhile)."""
    return [Path(p) / n for p, _, files in os.walk(d.folder) for n in files]


def _readable(views: list[Path]) -> bool:
    try:
        for view in views:
            view.read_bytes()
    except OSError:
        return False
    return bool(views)


# -- the mount is read-only --------------------------------------------------------------------


def _writes(view: Path, directory: Path) -> list[tuple[str, Callable[[], object]]]:
    def write_open(path: Path, flags: int) -> None:
        fd = os.open(path, flags, 0o644)
        os.close(fd)

    def mmap_shared(path: Path) -> None:
        with open(path, "rb") as f:
            mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    return [
        ("open O_WRONLY", lambda: write_open(view, os.O_WRONLY)),
        ("open O_RDWR", lambda: write_open(view, os.O_RDWR)),
        ("open O_TRUNC", lambda: write_open(view, os.O_RDONLY | os.O_TRUNC)),
        ("open O_APPEND", lambda: write_open(view, os.O_WRONLY | os.O_APPEND)),
        ("create", lambda: write_open(directory / "new.dcm", os.O_WRONLY | os.O_CREAT)),
        ("mkdir", lambda: os.mkdir(directory / "newdir")),
        ("mknod", lambda: os.mkfifo(directory / "fifo")),
        ("symlink", lambda: os.symlink("x", directory / "link")),
        ("link", lambda: os.link(view, directory / "hard")),
        ("unlink", lambda: os.unlink(view)),
        ("rmdir", lambda: os.rmdir(view.parent)),
        ("rename file", lambda: os.rename(view, directory / "renamed.dcm")),
        ("rename dir", lambda: os.rename(view.parent, directory / "renamed")),
        ("chmod file", lambda: os.chmod(view, 0o644)),
        ("chmod dir", lambda: os.chmod(directory, 0o700)),
        ("chown", lambda: os.chown(view, 1, 1)),
        ("utime", lambda: os.utime(view, (0, 0))),
        ("truncate", lambda: os.truncate(view, 0)),
        ("setxattr file", lambda: os.setxattr(view, "user.x", b"1")),
        ("setxattr dir", lambda: os.setxattr(directory, "user.x", b"1")),
        ("removexattr", lambda: os.removexattr(view, "user.x")),
        ("mmap shared writable", lambda: mmap_shared(view)),
    ]


def test_nothing_can_write_to_the_mount_not_even_root(
    daemon_factory: Callable[..., Daemon], originals: Originals, request: pytest.FixtureRequest
) -> None:
    d = daemon_factory()
    set_daemon_option(d, "allow_other = true")
    # pytest's temporary directories are private (0700): mount where others can reach.
    public = Path(tempfile.mkdtemp(prefix="deidfs-ro-"))
    public.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(public, ignore_errors=True))
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace(f'mountpoint = "{d.mnt}"', f'mountpoint = "{public}/mnt"')
    )
    d.mnt = public / "mnt"
    d.start()
    src = d.add(sample_file("CT_small.dcm"), "ct.dcm")
    originals.record(src)
    (view,) = d.wait_views(1)
    content = view.read_bytes()
    targets = [(view, view.parent), (view, d.folder), (view, d.mnt)]
    failures = []
    for v, directory in targets:
        for what, attempt in _writes(v, directory):
            try:
                attempt()
            except OSError as exc:
                # EROFS; mmap of a read-only descriptor is refused before reaching the mount.
                allowed = {errno.EROFS} | ({errno.EACCES} if what.startswith("mmap") else set())
                if exc.errno not in allowed:
                    failures.append(f"{what} in {directory.name}: {exc}")
            else:
                failures.append(f"{what} in {directory.name}: succeeded")
    assert failures == []
    # Another user (nobody) reads the allow_other mount, and changes nothing either.
    script = (
        "import os, sys\n"
        "v = sys.argv[1]\n"
        "open(v, 'rb').read()\n"
        "bad = []\n"
        "for f in (lambda: open(v, 'r+b'), lambda: os.unlink(v), lambda: os.chmod(v, 0o400),\n"
        "          lambda: open(os.path.join(os.path.dirname(v), 'x'), 'wb')):\n"
        "    try:\n"
        "        f()\n"
        "        bad.append('succeeded')\n"
        "    except OSError as e:\n"
        "        bad += [] if e.errno in (30, 13, 1) else [str(e)]\n"
        "print(bad)\n"
    )
    done = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"),
            *(sys.executable, "-c", script, str(view)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert view.read_bytes() == content
    assert len(d.views()) == 1
    assert d.stop() == 0


def test_originals_keep_their_bytes_modes_and_times(
    daemon_factory: Callable[..., Daemon], originals: Originals
) -> None:
    d = daemon_factory()
    sources = [
        d.add(sample_file(n), f"s/{n}") for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
    ]
    for s in sources:
        s.chmod(0o400)  # even a read-only original is opened without changing it
    originals.record(*sources)
    atimes = {s: s.stat().st_atime_ns for s in sources}
    d.start()
    for view in d.wait_views(3):
        view.read_bytes()
    assert d.stop() == 0
    assert originals.changed() == []
    # O_NOATIME where allowed: reading through the mount does not even touch access times.
    assert {s: s.stat().st_atime_ns for s in sources} == atimes
