"""Sources rendered in worker processes: a slow file holds up no other, is shown in progress,
is abandoned past ``parse_timeout_seconds`` and withheld as ``parse_timeout``; the worker
processes die with the daemon, even ``kill -9`` ed in the middle of a render."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from conftest import SAMPLE_NAMES, Daemon, add_folder, run_cli, sample_file, wait_for
from deidfs.config.model import BUILTIN_PROFILES
from deidfs.deid.layout import Layout
from deidfs.deid.plan import compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.view.pool import TIMEOUT_REASON, RenderProcess

#: Private elements of the slow file: some 24 MB of header (the fast path reads 16 MB at
#: most, then pydicom reads it all), well within the default header bound of 256 MiB. Its
#: render takes tens of seconds and grows by a few dozen MB a second.
SLOW_ELEMENTS = 2_000_000
#: The time bound the daemon tests set: far below the slow file's render, far above a CT's.
TIMEOUT = 6


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def write_slow_source(path: Path, elements: int = SLOW_ELEMENTS, n: int = 1) -> Path:
    """A valid explicit VR little endian file whose header holds ``elements`` small private
    elements (blocks of 256 under their creators, groups 0021, 0023, ...)."""
    sop = f"1.2.826.0.1.3680043.10.998.77.{n}"
    meta = (
        struct.pack("<HH2s2xL", 0x0002, 0x0001, b"OB", 2)
        + b"\0\1"
        + _element(0x0002, 0x0002, b"UI", _uid("1.2.840.10008.5.1.4.1.1.7"))
        + _element(0x0002, 0x0003, b"UI", _uid(sop))
        + _element(0x0002, 0x0010, b"UI", _uid("1.2.840.10008.1.2.1"))
    )
    meta = _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(meta))) + meta
    body = (
        _element(0x0008, 0x0016, b"UI", _uid("1.2.840.10008.5.1.4.1.1.7"))
        + _element(0x0008, 0x0018, b"UI", _uid(sop))
        + _element(0x0008, 0x0060, b"CS", b"OT")
        + _element(0x0010, 0x0020, b"LO", b"SLOW01")
        + _element(0x0020, 0x000D, b"UI", _uid(f"{sop}.1"))
        + _element(0x0020, 0x000E, b"UI", _uid(f"{sop}.2"))
    )
    # One block of 256 elements with a placeholder group, copied for each group.
    template = b"".join(
        b"\xaa\xbb" + struct.pack("<H2sH", e, b"UL", 4) + b"\0\0\0\0" for e in range(0x1000, 0x1100)
    )
    blocks = []
    for k in range(-(-elements // 256)):
        group = struct.pack("<H", 0x0021 + 2 * k)
        blocks.append(group + b"\x10\x00LO\x0c\x00DEIDFS SLOW ")
        blocks.append(template.replace(b"\xaa\xbb", group))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + body + b"".join(blocks))
    return path


def _status(d: Daemon) -> dict[str, object]:
    from deidfs.ops.control_client import call

    reply = call(d.state / "control.sock", "status")
    assert reply.ok, reply.error
    return dict(reply.result)


def _in_progress(d: Daemon) -> list[dict[str, object]]:
    index = _status(d)["index"]
    assert isinstance(index, dict)
    return list(index["in_progress"])


def _withheld(d: Daemon, folder: str) -> dict[str, int]:
    folders = _status(d)["folders"]
    assert isinstance(folders, list)
    (found,) = [f for f in folders if f["id"] == folder]
    return dict(found["withheld"])


def _token(d: Daemon, path: Path) -> str:
    from deidfs.secret import load_or_create_key

    return Pseudonymizer(load_or_create_key(d.state)).token(os.fspath(path), "path")[:12]


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (children, theirs, ...), from /proc."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            parents[int(name)] = int(fields[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _slow_daemon(daemon_factory: Callable[..., Daemon], timeout: float) -> Daemon:
    d = daemon_factory()
    text = d.config_path.read_text()
    # One worker asked for: the daemon still runs two render processes.
    d.config_path.write_text(
        text.replace("workers = 2\n", f"workers = 1\nparse_timeout_seconds = {timeout}\n")
    )
    return d


# -- the render process, on its own ----------------------------------------------------------


def test_a_render_past_its_time_bound_is_abandoned_and_the_next_file_gets_a_new_process(
    tmp_path: Path,
) -> None:
    slow = write_slow_source(tmp_path / "slow.dcm")
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    setup = (plan, Pseudonymizer(b"render-pool-test-key-0123456789ab"), Layout.DICOM, None)
    renderer = RenderProcess("test-render")
    try:
        renderer.start()
        first = renderer.pid
        assert first is not None
        started = time.monotonic()
        outcome = renderer.render(str(slow), None, "digest", setup, 1.0)
        assert time.monotonic() - started < 5
        assert outcome.view is None
        assert outcome.reason == TIMEOUT_REASON
        wait_for(lambda: not _alive(first))
        good = sample_file("CT_small.dcm")
        outcome = renderer.render(str(good), PurePosixPath("ct.dcm"), "digest", setup, 30.0)
        assert outcome.view is not None, outcome
        assert outcome.view.source.size == good.stat().st_size
        assert renderer.started == 2
        assert renderer.pid != first
        refused = renderer.render(str(tmp_path), None, "digest", setup, 30.0)
        assert refused.view is None
        assert refused.reason == "not_regular"
        assert renderer.started == 2  # a refusal keeps the process
    finally:
        pid = renderer.pid
        renderer.close()
    assert pid is not None
    assert not _alive(pid)


def test_a_child_whose_memory_grew_past_the_bound_is_replaced_after_its_file() -> None:
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    setup = (plan, Pseudonymizer(b"render-pool-test-key-0123456789ab"), Layout.DICOM, None)
    good = str(sample_file("CT_small.dcm"))
    renderer = RenderProcess("test-render", retire_rss_kib=1)  # every child is past it
    try:
        for _ in range(3):
            outcome = renderer.render(good, None, "digest", setup, 30.0)
            assert outcome.view is not None, outcome
            assert renderer.pid is None  # retired and reaped
        assert renderer.started == 3
    finally:
        renderer.close()
    kept = RenderProcess("test-render")
    try:
        for _ in range(3):
            assert kept.render(good, None, "digest", setup, 30.0).view is not None
        assert kept.started == 1
    finally:
        kept.close()


# -- the daemon ---------------------------------------------------------------------------------


@pytest.mark.fuse
def test_a_slow_source_holds_up_no_other_folder_and_ends_withheld_as_parse_timeout(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = _slow_daemon(daemon_factory, TIMEOUT)
    other = d.root / "other"
    other.mkdir()
    add_folder(d, "other", other)
    d.start()
    slow = d.add(write_slow_source(d.root / "work" / "slow.dcm"), "slow.dcm")
    token = _token(d, slow)

    def shown() -> list[dict[str, object]]:
        return [j for j in _in_progress(d) if j["folder"] == "samples" and j["file"] == token]

    (job,) = wait_for(shown, timeout=TIMEOUT - 1, interval=0.05)  # type: ignore[misc]
    assert isinstance(job["seconds"], float)
    assert 1.0 <= job["seconds"] < TIMEOUT  # shown past a second (rounded to 0.1 s)
    text = run_cli(["status", "--config", str(d.config_path)], d.root, "status").stdout
    assert f"rendering folder=samples file={token} for " in text
    assert str(slow) not in text

    # Files copied into another folder meanwhile are served while the slow one renders.
    copied = time.monotonic()
    for name in SAMPLE_NAMES:
        dest = other / name
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(sample_file(name).read_bytes())
        os.replace(tmp, dest)
    mnt_other = d.mnt / "other"
    wait_for(
        lambda: sum(len(files) for _, _, files in os.walk(mnt_other)) == len(SAMPLE_NAMES),
        timeout=4,
    )
    served_after = time.monotonic() - copied
    assert shown(), "the slow file was no longer rendering: the test proves nothing"
    # And so are new files of the slow file's own folder (the other render process).
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1, timeout=4)
    assert shown()

    wait_for(lambda: _withheld(d, "samples").get(TIMEOUT_REASON) == 1, timeout=TIMEOUT + 10)
    assert not shown()
    log = d.log()
    assert f"file={token}: render took longer than {TIMEOUT} s" in log
    assert f"withheld: folder=samples file={token} reason={TIMEOUT_REASON}" in log
    assert str(slow) not in log
    # Indexing goes on with a new render process.
    d.add(sample_file("MR_small.dcm"), "mr.dcm")
    d.wait_views(2, timeout=10)
    print(f"\nother folder served {served_after:.2f} s after the copy, during the slow render")
    assert d.stop() == 0


@pytest.mark.fuse
def test_render_processes_die_with_the_daemon_killed_mid_render(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = _slow_daemon(daemon_factory, 600)
    d.start()
    assert d.proc is not None
    slow = d.add(write_slow_source(d.root / "work" / "slow.dcm"), "slow.dcm")
    wait_for(lambda: _in_progress(d), timeout=15)
    below = _descendants(d.proc.pid)
    # The fork server and the two render processes at least (and the resource tracker).
    assert len(below) >= 3, below
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    wait_for(lambda: not [p for p in below if _alive(p)], timeout=15)
    assert slow.exists()


@pytest.mark.fuse
def test_a_daemon_stopping_mid_render_stops_at_once_and_reaps_its_processes(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = _slow_daemon(daemon_factory, 600)
    d.start()
    assert d.proc is not None
    d.add(write_slow_source(d.root / "work" / "slow.dcm"), "slow.dcm")
    wait_for(lambda: _in_progress(d), timeout=15)
    below = _descendants(d.proc.pid)
    assert len(below) >= 3, below
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10
    # The fork server and the resource tracker end as the daemon's end of their pipes closes.
    wait_for(lambda: not [p for p in below if _alive(p)], timeout=5)
    assert "Traceback" not in d.log()


@pytest.mark.fuse
def test_a_pydicom_warning_in_a_render_process_is_counted_and_its_text_never_logged(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The render processes take the daemon's logging set-up before their first file: a
    value pydicom quotes in a warning (a UI of the leak corpus root, planted) reaches the
    log as a count and a file token only."""
    d = daemon_factory().start()
    data = sample_file("rtdose.dcm").read_bytes()
    invalid = b"1.2.123.456.78.9.0123.4567.89012345678901"  # pydicom warns: "0123"
    assert data.count(invalid) == 1
    planted = b"1.2.826.0.1.3680043.10.999.0123.4567.8901"
    assert len(planted) == len(invalid)
    src = d.root / "work" / "rtdose.dcm"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data.replace(invalid, planted))
    added = d.add(src, "rtdose.dcm")

    def counted() -> int:
        warned = _status(d)["warnings"]
        assert isinstance(warned, dict)
        return int(warned["pydicom"].get("invalid_value", 0))

    wait_for(counted)
    log = d.log()
    token = _token(d, added)
    assert f"pydicom warning: category=invalid_value level=warning file={token};" in log
    assert "3680043.10.999" not in log
    assert "Invalid value" not in log
    assert "UserWarning" not in log
    assert d.stop() == 0
