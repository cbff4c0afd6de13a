"""FolderWatcher against real files and real watchdog observers (inotify and polling)."""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify import InotifyObserver

from deidfs.config.model import WatchMode
from deidfs.watch import observer as observer_mod
from deidfs.watch import scan as scan_mod
from deidfs.watch.events import Change, FileEvent
from deidfs.watch.limits import filesystem_type, inotify_watch_limit, is_network_filesystem
from deidfs.watch.watcher import FolderWatcher

SETTLE = 0.2
POLL = 0.1
WAIT = 10.0  # upper bound of every wait; the expected delays are well below a second

FOLDER = "ct_in"
BOTH_MODES = pytest.mark.parametrize("mode", [WatchMode.INOTIFY, WatchMode.POLL], ids=str)


class Sink:
    """Collects changes with their arrival time and the thread that delivered them."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[float, Change]] = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, change: Change) -> None:
        self.threads.add(threading.current_thread().name)
        self.queue.put((time.monotonic(), change))

    def wait_for(self, kind: FileEvent, path: Path, timeout: float = WAIT) -> list[Change]:
        """Every change up to and including the awaited one."""
        return [c for _, c in self.wait_for_timed(kind, path, timeout)]

    def wait_for_timed(
        self, kind: FileEvent, path: Path, timeout: float = WAIT
    ) -> list[tuple[float, Change]]:
        seen: list[tuple[float, Change]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {kind.value} for {path.name} within {timeout} s; got {seen}")
            try:
                at, change = self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append((at, change))
            if change.kind is kind and change.path == path:
                return seen

    def quiet(self, seconds: float = 0.5) -> list[Change]:
        """Changes arriving within a short window (used to prove that nothing more comes)."""
        seen: list[Change] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                seen.append(self.queue.get(timeout=remaining)[1])
            except queue.Empty:
                break
        return seen


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


def _python_threads() -> set[threading.Thread]:
    """Threads Python started. Not the dummies of threads it did not (libfuse's workers of
    earlier mounts in this process): a new thread that gets a dead one's id replaces its
    dummy, and the dummy is gone when that thread ends, which is no leak of anyone's."""
    return {t for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = _python_threads()
    yield
    assert _python_threads() == before, threading.enumerate()


Factory = Callable[..., tuple[FolderWatcher, Sink]]


@pytest.fixture
def make_watcher(no_thread_leak: None) -> Iterator[Factory]:
    watchers: list[FolderWatcher] = []

    def make(
        root: Path,
        mode: WatchMode = WatchMode.INOTIFY,
        *,
        settle: float = SETTLE,
        poll: float = POLL,
        reconcile: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> tuple[FolderWatcher, Sink]:
        sink = Sink()
        w = FolderWatcher(
            FOLDER,
            root,
            mode,
            settle_seconds=settle,
            poll_seconds=poll,
            reconcile_seconds=reconcile,
            sink=sink,
            clock=clock,
        )
        watchers.append(w)
        if start:
            w.start()
        return w, sink

    yield make
    for w in watchers:
        w.stop()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


def started(w: FolderWatcher) -> FolderWatcher:
    """Wait until the observer runs and the (empty) initial scan is through."""
    wait_until(lambda: w.healthy and w.initial_scan_done)
    return w


def write(path: Path, data: bytes = b"DICM" * 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@BOTH_MODES
def test_copied_file_is_ready_exactly_once(
    make_watcher: Factory, root: Path, tmp_path: Path, mode: WatchMode
) -> None:
    w, sink = make_watcher(root, mode)
    started(w)
    source = write(tmp_path / "elsewhere.dcm", os.urandom(200_000))
    target = root / "study" / "series" / "img1.dcm"
    target.parent.mkdir(parents=True)
    shutil.copy2(source, target)  # data, close, then utime: the mtime changes after close

    got = sink.wait_for(FileEvent.READY, target)
    assert got == [Change(FOLDER, target, FileEvent.READY)]
    assert sink.quiet() == []
    assert w.pending == 0
    assert w.kind == mode.value
    # The sink runs on the watcher's own worker thread, never on a watchdog thread.
    assert sink.threads == {f"deidfs-watch-{FOLDER}"}


@BOTH_MODES
def test_slow_write_is_ready_once_after_the_writer_is_done(
    make_watcher: Factory, root: Path, mode: WatchMode
) -> None:
    w, sink = make_watcher(root, mode, settle=0.5)
    started(w)
    target = root / "slow.dcm"
    with target.open("wb") as f:
        for _ in range(6):  # pauses shorter than the settle time
            f.write(os.urandom(4096))
            f.flush()
            time.sleep(0.1)
        f.write(b"end")
    finished = time.monotonic()

    timed = sink.wait_for_timed(FileEvent.READY, target)
    assert [c for _, c in timed] == [Change(FOLDER, target, FileEvent.READY)]
    assert timed[0][0] >= finished
    assert sink.quiet() == []


@BOTH_MODES
def test_part_file_renamed_into_place_becomes_ready(
    make_watcher: Factory, root: Path, mode: WatchMode
) -> None:
    w, sink = make_watcher(root, mode)
    started(w)
    part = write(root / "1.2.3.dcm.part")
    assert sink.quiet(0.4) == []  # a transfer in progress is never reported
    final = root / "1.2.3.dcm"
    part.rename(final)

    assert sink.wait_for(FileEvent.READY, final) == [Change(FOLDER, final, FileEvent.READY)]
    assert sink.quiet() == []


def _make_ignored(root: Path, outside: Path, tag: str) -> None:
    """Entries that must never be reported: temp names, dotfiles, links, non-regular files."""
    write(root / f".hidden-{tag}.dcm")
    write(root / f".cache-{tag}" / "inside.dcm")
    write(root / f"transfer-{tag}.part")
    write(root / f"transfer-{tag}.PARTIAL")
    target_file = write(outside / f"other-patient-{tag}.dcm")
    (root / f"link-{tag}.dcm").symlink_to(target_file)
    outside_dir = outside / f"dir-{tag}"
    write(outside_dir / "img.dcm")
    (root / f"linkdir-{tag}").symlink_to(outside_dir, target_is_directory=True)
    os.mkfifo(root / f"fifo-{tag}.dcm")


@BOTH_MODES
def test_dotfiles_partials_symlinks_and_fifos_are_ignored(
    make_watcher: Factory, root: Path, tmp_path: Path, mode: WatchMode
) -> None:
    outside = tmp_path / "outside"
    _make_ignored(root, outside, "pre")
    old = write(root / "pre.dcm")
    w, sink = make_watcher(root, mode)
    # The initial scan reports the one eligible file only.
    assert sink.wait_for(FileEvent.READY, old) == [Change(FOLDER, old, FileEvent.READY)]
    started(w)

    _make_ignored(root, outside, "live")
    sentinel = write(root / "zz-sentinel.dcm")
    got = sink.wait_for(FileEvent.READY, sentinel) + sink.quiet()
    assert got == [Change(FOLDER, sentinel, FileEvent.READY)]


@BOTH_MODES
def test_deleted_file_is_gone(make_watcher: Factory, root: Path, mode: WatchMode) -> None:
    w, sink = make_watcher(root, mode)
    started(w)
    path = write(root / "a" / "img.dcm")
    sink.wait_for(FileEvent.READY, path)
    path.unlink()
    assert sink.wait_for(FileEvent.GONE, path) == [Change(FOLDER, path, FileEvent.GONE)]
    assert sink.quiet() == []
    # Deleting a file that was never reported (still settling) reports nothing.
    write(root / "b.dcm").unlink()
    assert sink.quiet() == []


@BOTH_MODES
def test_modified_file_is_ready_again(make_watcher: Factory, root: Path, mode: WatchMode) -> None:
    w, sink = make_watcher(root, mode)
    started(w)
    path = write(root / "img.dcm")
    sink.wait_for(FileEvent.READY, path)
    with path.open("ab") as f:
        f.write(b"more")
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]
    # chmod moves ctime, as does a rewrite whose mtime is set back (touch -r): the watcher
    # cannot tell them apart, so both are reported (the daemon parses the file again).
    path.chmod(0o600)
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]


@BOTH_MODES
def test_moves_inside_and_out_of_the_tree(
    make_watcher: Factory, root: Path, tmp_path: Path, mode: WatchMode
) -> None:
    w, sink = make_watcher(root, mode)
    started(w)
    first = write(root / "s1" / "a.dcm")
    sink.wait_for(FileEvent.READY, first)
    second = root / "s2" / "b.dcm"
    second.parent.mkdir()
    first.rename(second)
    got = sink.wait_for(FileEvent.READY, second)
    got += sink.quiet(0.3)
    assert sorted(got, key=lambda c: c.kind.value) == [
        Change(FOLDER, first, FileEvent.GONE),
        Change(FOLDER, second, FileEvent.READY),
    ]
    # A whole directory moved out of the tree: its files are gone.
    shutil.move(root / "s2", tmp_path / "away")
    assert sink.wait_for(FileEvent.GONE, second) == [Change(FOLDER, second, FileEvent.GONE)]


def test_reconciliation_catches_what_the_observer_has_not_seen(
    make_watcher: Factory, root: Path
) -> None:
    # The poller would only look after 60 s; the reconciliation scan runs every 0.3 s.
    w, sink = make_watcher(root, WatchMode.POLL, poll=60.0, reconcile=0.3)
    started(w)
    path = write(root / "late" / "img.dcm")
    assert sink.wait_for(FileEvent.READY, path, timeout=5) == [
        Change(FOLDER, path, FileEvent.READY)
    ]
    path.unlink()
    assert sink.wait_for(FileEvent.GONE, path, timeout=5) == [Change(FOLDER, path, FileEvent.GONE)]
    assert w.missed_files == 0  # counted for inotify only: polling is expected to lag
    began = time.monotonic()
    w.stop()
    assert time.monotonic() - began < 5  # a long poll interval does not delay the shutdown


def test_rescan_on_demand(make_watcher: Factory, root: Path) -> None:
    w, sink = make_watcher(root, WatchMode.POLL, poll=60.0)
    started(w)
    path = write(root / "img.dcm")
    assert sink.quiet(0.5) == []
    w.rescan()
    assert sink.wait_for(FileEvent.READY, path, timeout=5) == [
        Change(FOLDER, path, FileEvent.READY)
    ]


def test_initial_scan_runs_in_the_background(
    make_watcher: Factory, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = [write(root / f"p{i}" / "img.dcm") for i in range(3)]
    for path in old:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    fresh = write(root / "fresh.dcm")  # mtime now: goes through settling first
    gate = threading.Event()

    def gated_scandir(path: str) -> Iterator[os.DirEntry[str]]:
        gate.wait(WAIT)
        return os.scandir(path)

    monkeypatch.setattr(scan_mod, "_scandir", gated_scandir)
    w, sink = make_watcher(root, WatchMode.INOTIFY, start=False)
    began = time.monotonic()
    w.start()
    assert time.monotonic() - began < 0.5
    assert not w.initial_scan_done
    assert sink.quiet(0.3) == []
    gate.set()
    got = sink.wait_for(FileEvent.READY, fresh)
    got += sink.quiet(0.3)
    assert sorted(c.path for c in got) == sorted([*old, fresh])
    assert {c.kind for c in got} == {FileEvent.READY}
    assert w.initial_scan_done
    assert w.directories == 4


@BOTH_MODES
def test_root_removed_and_recreated_comes_back(
    make_watcher: Factory, root: Path, mode: WatchMode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="deidfs.watch")
    w, sink = make_watcher(root, mode)
    started(w)
    first = write(root / "s" / "a.dcm")
    sink.wait_for(FileEvent.READY, first)

    shutil.rmtree(root)
    assert sink.wait_for(FileEvent.GONE, first) == [Change(FOLDER, first, FileEvent.GONE)]
    wait_until(lambda: not w.healthy)

    second = write(root / "t" / "b.dcm")
    assert sink.wait_for(FileEvent.READY, second) == [Change(FOLDER, second, FileEvent.READY)]
    wait_until(lambda: w.healthy)
    # Watching really resumed, not only the scan.
    third = write(root / "t" / "c.dcm")
    assert sink.wait_for(FileEvent.READY, third) == [Change(FOLDER, third, FileEvent.READY)]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("deidfs.watch.")]
    # Which of the two the watcher notices first depends on timing: the root check finding
    # it gone, or inotify's observer stopping with its root (then restarted on the new one).
    assert any(
        f"folder {FOLDER}: root unreachable (ENOENT)" in m
        or f"folder {FOLDER}: restarting the observer" in m
        for m in messages
    )
    # Paths may carry patient names: no log line shows one.
    assert not [m for m in messages if str(root.parent) in m or ".dcm" in m]


def test_root_replaced_by_another_directory(
    make_watcher: Factory, root: Path, tmp_path: Path
) -> None:
    w, sink = make_watcher(root)
    started(w)
    first = write(root / "a.dcm")
    sink.wait_for(FileEvent.READY, first)
    staged = tmp_path / "staged"
    second = write(staged / "b.dcm")
    root.rename(tmp_path / "old")
    staged.rename(root)
    got = sink.wait_for(FileEvent.READY, root / "b.dcm") + sink.quiet(0.3)
    assert sorted(got, key=lambda c: c.kind.value) == [
        Change(FOLDER, first, FileEvent.GONE),
        Change(FOLDER, root / second.name, FileEvent.READY),
    ]


def test_missing_root_at_start_is_picked_up_later(make_watcher: Factory, tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    w, sink = make_watcher(root)
    assert sink.quiet(0.3) == []
    assert not w.healthy
    path = write(root / "img.dcm")
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]
    wait_until(lambda: w.healthy)


def test_symlinked_root_reports_paths_below_the_configured_root(
    make_watcher: Factory, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    w, sink = make_watcher(link)
    started(w)
    write(real / "x" / "img.dcm")
    want = link / "x" / "img.dcm"
    assert sink.wait_for(FileEvent.READY, want) == [Change(FOLDER, want, FileEvent.READY)]


def test_settling_follows_the_injected_clock(make_watcher: Factory, root: Path) -> None:
    now = [1000.0]
    w, sink = make_watcher(root, clock=lambda: now[0])
    started(w)
    path = write(root / "img.dcm")
    wait_until(lambda: w.pending == 1)
    assert sink.quiet(0.4) == []  # real time passes, the watcher's clock does not
    deadline = time.monotonic() + WAIT
    while sink.queue.empty() and time.monotonic() < deadline:
        now[0] += 0.5
        time.sleep(0.05)
    assert sink.wait_for(FileEvent.READY, path, timeout=1) == [
        Change(FOLDER, path, FileEvent.READY)
    ]


def test_sink_errors_are_contained_and_retried_by_the_next_scan(
    make_watcher: Factory, root: Path
) -> None:
    w, sink = make_watcher(root, reconcile=0.3)
    started(w)
    calls: list[Change] = []
    real_sink = sink.__call__

    def flaky(change: Change) -> None:
        calls.append(change)
        if len(calls) == 1:
            raise RuntimeError("index busy")
        real_sink(change)

    w._worker._sink = flaky
    path = write(root / "img.dcm")
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]
    assert len(calls) == 2
    assert w.healthy


def test_watcher_never_opens_source_files(
    make_watcher: Factory, root: Path, tmp_path: Path
) -> None:
    opened: list[tuple[str, int]] = []
    if not _AUDIT_INSTALLED:
        sys.addaudithook(_audit)  # hooks cannot be removed: it stays, inert, for the session
        _AUDIT_INSTALLED.append(True)
    _AUDIT_SINK[0] = opened
    try:
        for mode in (WatchMode.INOTIFY, WatchMode.POLL):
            w, sink = make_watcher(root, mode, reconcile=0.2)
            started(w)
            path = write(root / mode.value / "img.dcm")
            sink.wait_for(FileEvent.READY, path)
            with path.open("ab") as f:
                f.write(b"x")
            sink.wait_for(FileEvent.READY, path)
            sink.quiet(0.3)  # let a reconciliation scan pass
            w.stop()
    finally:
        _AUDIT_SINK[0] = None
    assert opened  # the hook works: the root directory is opened to check it is readable
    files = [(p, flags) for p, flags in opened if not os.path.isdir(p)]
    assert files == []
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    assert all(flags & writing == 0 for _, flags in opened)


_AUDIT_SINK: list[list[tuple[str, int]] | None] = [None]
_AUDIT_INSTALLED: list[bool] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    record = _AUDIT_SINK[0]
    if record is None or event != "open":
        return
    if threading.current_thread() is threading.main_thread():
        return  # the test itself writes the files
    path, _mode, flags = args
    if isinstance(path, str) and "incoming" in path:
        record.append((path, flags if isinstance(flags, int) else 0))


def test_watch_limit_hit_on_start_falls_back_to_polling(
    make_watcher: Factory, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullInotify(InotifyObserver):
        def start(self) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(observer_mod, "InotifyObserver", FullInotify)
    w, sink = make_watcher(root)
    started(w)
    assert w.kind == "poll"
    assert w.degraded_reason is not None
    assert "watch limit" in w.degraded_reason
    path = write(root / "img.dcm")
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]


def test_unwatched_subdirectories_fall_back_to_polling(
    make_watcher: Factory, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What watchdog does at the limit: it skips subdirectories without a word. Here the
    # kernel's list of held watches is made to show the root only.
    for i in range(3):
        (root / f"s{i}").mkdir()
    root_ino = root.stat().st_ino
    monkeypatch.setattr(observer_mod, "_watched_inodes", lambda fd: {root_ino})
    w, sink = make_watcher(root)
    wait_until(lambda: w.degraded_reason is not None)
    assert "1 of 4 directories watched" in str(w.degraded_reason)
    wait_until(lambda: w.kind == "poll" and w.healthy)
    path = write(root / "s2" / "img.dcm")
    assert sink.wait_for(FileEvent.READY, path) == [Change(FOLDER, path, FileEvent.READY)]


_USERNS_SCRIPT = textwrap.dedent(
    """
    import json, queue, sys, time
    from pathlib import Path
    from deidfs.config.model import WatchMode
    from deidfs.watch.events import FileEvent
    from deidfs.watch.limits import inotify_watch_limit
    from deidfs.watch.watcher import FolderWatcher

    root = Path(sys.argv[1])
    q = queue.Queue()
    w = FolderWatcher("lim", root, WatchMode.INOTIFY, settle_seconds=0.2, poll_seconds=0.1,
                      reconcile_seconds=0, sink=q.put)
    w.start()
    deadline = time.monotonic() + 10
    while w.degraded_reason is None and time.monotonic() < deadline:
        time.sleep(0.05)
    target = root / "s5" / "deep" / "img.dcm"
    target.write_bytes(b"DICM")
    ready = []
    while time.monotonic() < deadline:
        try:
            change = q.get(timeout=0.1)
        except queue.Empty:
            continue
        ready.append(str(change.path))
        if change.path == target:
            break
    result = {"kind": w.kind, "reason": w.degraded_reason, "limit": inotify_watch_limit(),
              "ready": ready, "target": str(target), "healthy": w.healthy}
    w.stop()
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("limit", [0, 4])
def test_real_inotify_watch_limit_in_a_user_namespace(root: Path, limit: int) -> None:
    # A user namespace has its own max_inotify_watches: a tiny limit for this process only.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) not installed")
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    for i in range(6):
        (root / f"s{i}" / "deep").mkdir(parents=True)
    shell = f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$0" -c "$1" "$2"'
    script_args = [_USERNS_SCRIPT, str(root)]
    proc = subprocess.run(
        [unshare, "--user", "--map-root-user", "sh", "-c", shell, sys.executable, *script_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["limit"] == limit
    assert result["kind"] == "poll"
    assert "watch limit" in result["reason"]
    assert result["healthy"] is True
    assert result["ready"] == [result["target"]]
    # The warning names the folder id and the limit, never a path.
    assert "folder lim: inotify watch limit reached" in proc.stderr
    assert str(root) not in proc.stderr


def test_auto_mode_uses_inotify_on_a_local_file_system(make_watcher: Factory, root: Path) -> None:
    w, _ = make_watcher(root, WatchMode.AUTO)
    started(w)
    assert w.kind == "inotify"
    wait_until(lambda: w.inotify_watches is not None)
    assert w.degraded_reason is None
    assert w.inotify_watches == w.directories == 1


MOUNTINFO = textwrap.dedent(
    r"""
    22 27 0:21 / /proc rw,relatime - proc proc rw
    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
    40 27 0:40 / /srv/pacs rw,relatime shared:5 - nfs4 nas:/export/pacs rw,vers=4.2
    41 40 0:41 / /srv/pacs/local rw,relatime - ext4 /dev/vdb rw
    42 27 0:42 / /mnt/ssh\040share rw,nosuid - fuse.sshfs user@host:/data rw
    43 27 0:43 / /mnt/smb rw - cifs //srv/share rw
    44 43 0:44 / /mnt/smb rw - tmpfs tmpfs rw
    """
)


@pytest.mark.parametrize(
    ("path", "fstype", "network"),
    [
        ("/srv/pacs/incoming/ct", "nfs4", True),
        ("/srv/pacs", "nfs4", True),
        ("/srv/pacsarchive", "ext4", False),
        ("/srv/pacs/local/x", "ext4", False),
        ("/mnt/ssh share/dicom", "fuse.sshfs", True),
        ("/mnt/smb/x", "tmpfs", False),  # mounted over the cifs share: the last mount wins
        ("/var/lib/dicom", "ext4", False),
    ],
)
def test_filesystem_type_from_mountinfo(path: str, fstype: str, network: bool) -> None:
    assert filesystem_type(Path(path), MOUNTINFO) == fstype
    assert is_network_filesystem(fstype) is network


def test_filesystem_type_of_this_machine(tmp_path: Path) -> None:
    found = filesystem_type(Path(os.path.realpath(tmp_path)))
    assert found is not None
    assert not is_network_filesystem(found)


def test_inotify_watch_limit_reads_proc() -> None:
    limit = inotify_watch_limit()
    expected = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    assert limit is not None
    assert 0 < limit <= expected


_OVERFLOW_SCRIPT = textwrap.dedent(
    """
    import json, queue, sys, time
    from pathlib import Path
    from deidfs.config.model import WatchMode
    from deidfs.ops.logs import setup_logging
    from deidfs.watch.events import FileEvent
    from deidfs.watch.watcher import FolderWatcher

    setup_logging()  # as the daemon: watchdog's lines (with paths) redacted
    root, count = Path(sys.argv[1]), int(sys.argv[2])
    q = queue.Queue()
    w = FolderWatcher("ovf", root, WatchMode.INOTIFY, settle_seconds=0.2, poll_seconds=0.1,
                      reconcile_seconds=0, sink=q.put)
    w.start()
    while not w.initial_scan_done:
        time.sleep(0.02)
    print("started", flush=True)
    sys.stdin.readline()  # the files were written while this process was stopped
    resumed = time.monotonic()
    ready = set()
    while len(ready) < count and time.monotonic() < resumed + 20:
        try:
            change = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if change.kind is FileEvent.READY:
            ready.add(change.path.name)
    result = {"ready": len(ready), "seconds": time.monotonic() - resumed,
              "overflows": w.overflows, "age": w.last_overflow_age, "kind": w.kind}
    w.stop()
    print(json.dumps(result), flush=True)
    """
)


def test_real_inotify_queue_overflow_rescans_at_once(root: Path) -> None:
    limit_file = Path("/proc/sys/fs/inotify/max_queued_events")
    if os.geteuid() != 0 or not os.access(limit_file, os.W_OK):
        pytest.skip("needs root to change fs.inotify.max_queued_events")
    saved = limit_file.read_text().strip()
    count = 300
    # The kernel takes the queue limit when the inotify instance is created: it is lowered
    # (machine-wide) only until the watcher has started.
    limit_file.write_text("16\n")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _OVERFLOW_SCRIPT, str(root), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "started"
    finally:
        limit_file.write_text(saved + "\n")
    try:
        # Stopped, the process cannot drain its queue: 300 new files overflow it for sure.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for i in range(count):
                write(root / f"img{i:04d}.dcm")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    result = json.loads(out)
    assert result["overflows"] >= 1, err
    assert result["ready"] == count, err  # without the rescan most would never be reported
    assert result["seconds"] < 10
    assert result["kind"] == "inotify"
    assert "folder ovf: inotify queue overflowed" in err
    assert str(root) not in err
