"""Operations of a running daemon: inotify queue overflows, duplicates, ``deidfs withheld``,
and the library warnings it counts. Every test runs a real daemon on a real mount."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Daemon, sample_file, wait_for
from leak_corpus import make_image, part10_bytes

pytestmark = pytest.mark.fuse

QUEUE_LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")


def _status(d: Daemon) -> dict[str, object]:
    from deidfs.ops.control_client import call

    reply = call(d.state / "control.sock", "status")
    assert reply.ok, reply.error
    return dict(reply.result)


def _folder_status(d: Daemon) -> dict[str, object]:
    folders = _status(d)["folders"]
    assert isinstance(folders, list)
    return dict(folders[0])


def _with_metrics(d: Daemon) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = d.config_path.read_text()
    d.config_path.write_text(
        text.replace('metrics_address = ""', f'metrics_address = "127.0.0.1:{port}"')
    )
    return f"http://127.0.0.1:{port}/metrics"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http on loopback)
        body: bytes = resp.read()
    return body.decode()


def _sample_value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$", re.M)
    for match in pattern.finditer(text):
        if (match.group(1) or "") == (f"{{{want}}}" if want else ""):
            return float(match.group(2))
    return None


@pytest.fixture
def small_inotify_queue() -> Iterator[Callable[[], None]]:
    """Lower fs.inotify.max_queued_events for the inotify instances created meanwhile.

    The kernel takes the limit when an inotify instance is created, so it is lowered only
    while the daemon starts its observer and restored at once (and in any case at the end):
    the limit is machine-wide.
    """
    if os.geteuid() != 0 or not os.access(QUEUE_LIMIT, os.W_OK):
        pytest.skip("needs root to change fs.inotify.max_queued_events")
    saved = QUEUE_LIMIT.read_text().strip()

    def restore() -> None:
        QUEUE_LIMIT.write_text(saved + "\n")

    QUEUE_LIMIT.write_text("32\n")
    try:
        yield restore
    finally:
        restore()


# -- 1. an inotify queue overflow is noticed, rescanned, shown and counted ------------------


def test_inotify_queue_overflow_is_rescanned_at_once_and_counted(
    daemon_factory: Callable[..., Daemon], small_inotify_queue: Callable[[], None]
) -> None:
    # Mirror layout: every copy of the sample is a view of its own.
    d = daemon_factory(layout="mirror", reconcile=0.0)
    url = _with_metrics(d)
    d.start()
    # The observer (and its inotify instance) exists once the initial scan has run.
    wait_for(lambda: "initial scan read" in d.log())
    small_inotify_queue()
    assert _folder_status(d)["watch"] == {  # type: ignore[comparison-overlap]
        "kind": "inotify",
        "healthy": True,
        "degraded": "",
        "settling": 0,
        "directories": 1,
        "overflows": 0,
        "last_overflow_seconds_ago": None,
    }
    data = sample_file("MR_small.dcm").read_bytes()
    count = 400
    assert d.proc is not None
    # The daemon cannot read its inotify queue while stopped: 400 files (about 1,200
    # events) overflow a queue of 32 for certain. Nothing touches the mount meanwhile.
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        # Into a directory watched already: a new directory would be scanned by watchdog
        # when it adds the directory's watch, which finds its files without any event.
        for i in range(count):
            (d.incoming / f"img{i:04d}.dcm").write_bytes(data)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    # Every file appears promptly: the overflow made the daemon rescan (with no periodic
    # reconciliation configured, nothing else would find the files whose events were lost).
    views = d.wait_views(count, timeout=30)
    assert len(views) == count
    folder = _folder_status(d)
    watch = folder["watch"]
    assert isinstance(watch, dict)
    assert watch["overflows"] >= 1
    assert isinstance(watch["last_overflow_seconds_ago"], float)
    assert watch["healthy"] is True
    text = _scrape(url)
    overflows = _sample_value(text, "deidfs_watch_overflows_total", folder="samples")
    assert overflows is not None
    assert overflows >= 1
    assert "folder samples: inotify queue overflowed" in d.log()
    done = subprocess.run(
        [sys.executable, "-m", "deidfs", "status", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "inotify queue OVERFLOWED" in done.stdout
    assert "overflow(s)" in done.stdout
    # No path of the sources in logs, status or metrics.
    for where in (d.log(), text, json.dumps(_status(d)), done.stdout):
        assert "img0" not in where


# -- 2. a duplicate is logged, and `deidfs withheld` lists what is not served, and why ---------


def _token(d: Daemon, path: Path) -> str:
    from deidfs.deid.pseudonym import Pseudonymizer
    from deidfs.secret import load_or_create_key

    return Pseudonymizer(load_or_create_key(d.state)).token(os.fspath(path), "path")[:12]


def _cli(*argv: str, as_uid: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if as_uid is not None:
        prefix = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "deidfs", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="deidfs-ops-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_duplicate_is_logged_and_withheld_lists_sources_for_root_and_owner_only(
    daemon_factory: Callable[..., Daemon], public_dir: Path
) -> None:
    d = daemon_factory()
    sock = public_dir / "control.sock"
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace(f'"{d.state}/control.sock"', f'"{sock}"'))
    d.start()
    # Same SOP Instance UID (pydicom's RLE copy of MR_small): one view path, one is served.
    first = d.add(sample_file("MR_small.dcm"), "a/mr.dcm")
    d.wait_views(1)
    second = d.add(sample_file("MR_small_RLE.dcm"), "b/mr_rle.dcm")
    notes = d.incoming / "c" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("not DICOM")
    line = (
        f"duplicate: folder=samples file={_token(d, second)} not served: same view as "
        f"file={_token(d, first)}, which is served"
    )
    wait_for(lambda: line in d.log())
    assert len(d.views()) == 1
    assert d.log().count("duplicate: folder=samples") == 1

    def listed() -> str | None:
        done = _cli("withheld", "--socket", str(sock))
        assert done.returncode == 0, done.stderr
        return done.stdout if "not_dicom" in done.stdout else None

    out = wait_for(listed)
    assert isinstance(out, str)
    rows = sorted(r.split("\t") for r in out.splitlines())
    assert rows == [
        [
            "samples",
            "duplicate",
            _token(d, second),
            str(second),
            _token(d, first),
            str(first),
        ],
        ["samples", "not_dicom", _token(d, notes), str(notes)],
    ]
    done = _cli("withheld", "samples", "--json", "--socket", str(sock))
    assert done.returncode == 0, done.stderr
    (folder,) = json.loads(done.stdout)["folders"]
    assert {s["reason"] for s in folder["sources"]} == {"duplicate", "not_dicom"}
    done = _cli("withheld", "nope", "--socket", str(sock))
    assert done.returncode == 1
    assert "no folder 'nope'" in done.stderr

    # Another user who may connect (the socket opened to all here, as a group would) is
    # refused on its SO_PEERCRED uid; it is let in once it owns the configuration file.
    sock.chmod(0o666)
    done = _cli("withheld", "--socket", str(sock), as_uid=65534)
    assert done.returncode == 77, (done.stdout, done.stderr)
    assert "only root or the owner of the configuration file" in done.stderr
    assert str(first) not in done.stdout + done.stderr
    # status stays open to every peer that can connect.
    assert _cli("status", "--socket", str(sock), as_uid=65534).returncode == 0
    os.chown(d.config_path, 65534, 65534)
    done = _cli("withheld", "--socket", str(sock), as_uid=65534)
    assert done.returncode == 0, done.stderr
    assert str(second) in done.stdout
    # The daemon's log names files by token only, and who asked by uid.
    log = d.log()
    assert str(first) not in log
    assert "mr_rle" not in log
    assert "cmd=withheld result=denied" in log
    assert "peer_uid=65534" in log


# -- 3. pydicom's warnings: counted by category, the first of each logged with a file token --

#: Sample files pydicom warns about: invalid VR values (badVR, rtdose), and an implicit VR
#: data set under an explicit VR transfer syntax (SC_rgb_jpeg).
WARNING_SAMPLES = {
    "badVR.dcm": "invalid_value",
    "rtdose.dcm": "invalid_value",
    # Made by _unknown_charset: pydicom's own sample of an encoding mismatch
    # (SC_rgb_jpeg.dcm) is now refused from its bytes before pydicom reads it.
    "unknown_charset.dcm": "character_set",
}


def _unknown_charset(directory: Path) -> Path:
    ds = make_image("1.2.826.0.1.3680043.10.1234.90")
    ds.SpecificCharacterSet = "ISO_IR 999"
    path = directory / "unknown_charset.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as it writes the names, too
        path.write_bytes(part10_bytes(ds))
    return path


def test_pydicom_warnings_are_counted_by_category_in_status_metrics_and_log(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(layout="mirror")
    url = _with_metrics(d)
    d.start()
    made = _unknown_charset(d.root)
    added = {
        d.add(made if name == made.name else sample_file(name), name): category
        for name, category in WARNING_SAMPLES.items()
    }

    def counted() -> dict[str, int] | None:
        warned = _status(d).get("warnings")
        assert isinstance(warned, dict)
        counts = dict(warned["pydicom"])
        enough = counts.get("invalid_value", 0) >= 2 and counts.get("character_set")
        return counts if enough else None

    counts = wait_for(counted)
    assert isinstance(counts, dict)
    log = d.log()
    # Once per category, naming one of the files that caused it by its keyed token.
    for category in set(WARNING_SAMPLES.values()):
        lines = [ln for ln in log.splitlines() if f"pydicom warning: category={category} " in ln]
        assert len(lines) == 1, lines
        tokens = {_token(d, p) for p, c in added.items() if c == category}
        assert any(f"file={t};" in lines[0] for t in tokens), (lines[0], tokens)
    assert "reported a warning event" not in log
    assert "Invalid value" not in log
    assert "1A" not in log
    text = _scrape(url)
    value = _sample_value(text, "deidfs_pydicom_warnings_total", reason="invalid_value")
    assert value is not None
    assert value >= 2
    done = _cli("status", "--config", str(d.config_path))
    assert done.returncode == 0, done.stderr
    assert "pydicom: " in done.stdout
    assert "invalid_value" in done.stdout
    assert "character_set" in done.stdout


def test_verify_counts_pydicom_warnings_instead_of_printing_each(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    d.start()
    for name in ("badVR.dcm", "rtdose.dcm", "rtdose_1frame.dcm", "CT_small.dcm"):
        d.add(sample_file(name), name)

    def indexed() -> bool:
        f = _folder_status(d)
        handled = int(f["visible"]) + int(f["duplicates"]) + int(f["withheld_total"])  # type: ignore[call-overload]
        index = _status(d)["index"]
        assert isinstance(index, dict)
        return handled == 4 and index["backlog"] == 0

    wait_for(indexed)
    done = _cli("--config", str(d.config_path), "verify", "samples")
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert not [ln for ln in lines if "reported a warning event" in ln], done.stderr
    first = [ln for ln in lines if "pydicom warning: category=invalid_value " in ln]
    assert len(first) == 1, done.stderr
    assert "file=-;" not in first[0], first[0]
    summary = [ln for ln in lines if "pydicom warnings in all: " in ln]
    assert len(summary) == 1
    match = re.search(r"invalid_value (\d+)", summary[0])
    assert match is not None
    assert int(match.group(1)) >= 3
    assert "Invalid value" not in done.stderr
    assert str(d.incoming) not in done.stderr
