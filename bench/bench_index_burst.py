"""Benchmark first reads through the mount while a burst of new files is indexed, vs quiet.

See ``bench/README.md``. Needs root and /dev/fuse (a real mount). In one invocation:

1. writes ``--read-files`` synthetic CT files (``synth.write_instances``) into the folder
   ``read`` and ``--burst`` (2,000) others, of other patients, into a staging directory
   beside the folder ``burst``; starts ``deidfs run`` with both folders and waits until the
   ``read`` files are served;
2. quiet: ``--passes`` passes over the ``read`` views, each view's pages dropped from the
   page cache before its pass, timing each first read (open, read it whole, close);
3. burst: moves the staged files into ``burst`` (one rename, as a transfer tool finishing
   a directory does), and repeats the same passes while the daemon indexes them; only the
   reads that ended between the first and the last burst file served count;
4. prints p50/p95/max of both, the ratios burst/quiet, and the burst's indexing rate.

Nothing passes or fails on time: the ratios compare two measurements of the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import Daemon, cpu_seconds, log_problems, wait_settled
from synth import write_instances

CONFIG = """\
[daemon]
mountpoint = "{work}/mnt"
state_dir = "{work}/state"
export_dir = "{work}/export"
control_socket = "{work}/state/control.sock"
metrics_address = ""
settle_seconds = {settle}
workers = {workers}
cache_mib = {cache_mib}

[folders.read]
path = "{work}/read"
profile = "Basic"

[folders.burst]
path = "{work}/burst"
profile = "Basic"
"""
CHUNK = 1 << 20


@dataclass
class Reads:
    """First reads: (end on the monotonic clock, seconds) each."""

    samples: list[tuple[float, float]] = field(default_factory=list)

    def seconds(self, since: float = 0.0, until: float | None = None) -> list[float]:
        return sorted(
            s for end, s in self.samples if end >= since and (until is None or end <= until)
        )


def _views(root: Path) -> list[str]:
    return sorted(os.path.join(top, n) for top, _dirs, names in os.walk(root) for n in names)


def _drop(path: str) -> None:
    """Drop a view's cached pages, so that its next read is served by the daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_pass(paths: list[str], out: Reads, stop: threading.Event | None = None) -> None:
    """One first read of every view: pages dropped, then each opened, read whole, closed."""
    for path in paths:
        _drop(path)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    clock = time.perf_counter
    for path in paths:
        if stop is not None and stop.is_set():
            return
        t0 = clock()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
        out.samples.append((time.monotonic(), clock() - t0))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _served(status: dict[str, object] | None, folder: str) -> int:
    if status is None:
        return 0
    folders = status["folders"]
    assert isinstance(folders, list)
    return sum(
        int(f["visible"]) + int(f["duplicates"]) + int(f["withheld_total"])
        for f in folders
        if f["id"] == folder
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burst", type=int, default=2000, help="new files indexed (2,000)")
    p.add_argument("--read-files", type=int, default=200, help="files read each pass (200)")
    p.add_argument("--passes", type=int, default=3, help="quiet passes (3)")
    p.add_argument("--rows", type=int, default=512, help="pixel rows (and columns) of a file")
    p.add_argument("--workers", type=int, default=2, help="[daemon] workers (2)")
    p.add_argument("--settle", type=float, default=0.5, help="[daemon] settle_seconds (0.5)")
    p.add_argument("--cache-mib", type=int, default=32, help="[daemon] cache_mib (32)")
    p.add_argument("--work", type=Path, help="work directory (kept); a temporary one if absent")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a FUSE mount, page cache control)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="deidfs-burst-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("read", "burst", "staged", "mnt", "state"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "burst").mkdir()
    write_instances(work / "read", args.read_files, rows=args.rows, columns=args.rows, seed=1)
    staged = write_instances(work / "staged", args.burst, rows=args.rows, columns=args.rows, seed=2)
    newest = max(os.stat(f).st_mtime_ns for f in _views(work / "read"))
    wait_settled(args.settle, newest)
    config = work / "deidfs.toml"
    config.write_text(
        CONFIG.format(work=work, settle=args.settle, workers=args.workers, cache_mib=args.cache_mib)
    )
    log = work / "daemon.log"
    daemon = Daemon(config, work / "state" / "control.sock", log)
    started = daemon.start()
    try:
        daemon.wait_served(args.read_files, started, timeout=300)
        views = _views(work / "mnt" / "read")
        if len(views) != args.read_files:
            raise SystemExit(f"{len(views)} views of {args.read_files} files; see {log}")
        read_pass(views, Reads())  # warm-up: the daemon's header cache, the dentries
        quiet = Reads()
        quiet_started = time.monotonic()
        for _ in range(args.passes):
            read_pass(views, quiet)
        quiet_elapsed = time.monotonic() - quiet_started

        # The burst: every staged file arrives at once, then passes run until it is indexed.
        done = threading.Event()
        finished: list[float] = []
        cpu_before = cpu_seconds(daemon.pid)

        begun: list[float] = []

        def watch() -> None:
            while not done.is_set():
                served = _served(daemon.status(), "burst")
                if served and not begun:
                    begun.append(time.monotonic())
                if served >= args.burst:
                    finished.append(time.monotonic())
                    done.set()
                    return
                time.sleep(0.05)

        os.rename(work / "staged", work / "burst" / "incoming")
        moved = time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        burst = Reads()
        passes = 0
        while not done.is_set():
            read_pass(views, burst, done)
            passes += 1
            if time.monotonic() - moved > 1800:
                raise SystemExit(f"the burst was not indexed within 30 minutes; see {log}")
        watcher.join()
        indexed = finished[0] - moved
        cpu = cpu_seconds(daemon.pid) - cpu_before
    finally:
        daemon.stop()
    q = quiet.seconds()
    # Reads while files were being indexed: from the first served to the last.
    b = burst.seconds(since=begun[0] if begun else 0.0, until=finished[0] if finished else None)
    print(
        f"{args.read_files} files read per pass ({args.rows}x{args.rows}, "
        f"{staged.bytes / staged.files / 1e6:.2f} MB each), workers={args.workers}"
    )
    print(
        f"burst: {args.burst} new files indexed in {indexed:.2f} s from the rename "
        f"({args.burst / indexed:.0f} files/s, settle {args.settle} s included), "
        f"daemon CPU {cpu:.1f} s"
    )
    if not b:
        print("no read ended during the burst: use more --burst files")
        return 1
    print(f"{'first read':<22}{'reads':>8}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, values in (("quiet", q), ("during the burst", b)):
        print(
            f"{name:<22}{len(values):>8}{_quantile(values, 0.5) * 1e3:>10.3f}"
            f"{_quantile(values, 0.95) * 1e3:>10.3f}{values[-1] * 1e3:>10.3f}"
        )
    # Reads completed per second of wall time (page drops included): how much the reader
    # got done meanwhile, which latencies of the reads that happened do not show.
    window = (finished[0] if finished else time.monotonic()) - (begun[0] if begun else moved)
    quiet_rate, burst_rate = len(q) / quiet_elapsed, len(b) / window
    print(
        f"burst/quiet: p50 {_quantile(b, 0.5) / _quantile(q, 0.5):.2f}x, "
        f"p95 {_quantile(b, 0.95) / _quantile(q, 0.95):.2f}x; reads/s {burst_rate:.0f} vs "
        f"{quiet_rate:.0f} ({burst_rate / quiet_rate:.2f}x; {passes} pass(es) during the burst)"
    )
    log_problems(log)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
