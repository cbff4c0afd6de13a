"""Benchmark indexing: a daemon started on files it has never seen, its restart, and its RSS.

See ``bench/README.md``. In one invocation:

1. writes ``--files`` distinct synthetic CT instances (``synth.write_instances``: the
   realistic header of ``synth.ct_template``, ``--rows`` x ``--cols`` 16-bit pixels);
2. baselines, each over every file: a walk of the tree with ``lstat`` (the least any indexer
   does), a read of each file's first 16 KiB, and ``render_path`` of each file in this
   process on one thread (the parse every new file costs, without the daemon);
3. starts ``deidfs run`` on a new state directory (an empty index) and times it until every
   file is served (``deidfs status`` over the control socket): files/s, ratios against the
   baselines, the daemon's CPU time and its RSS;
4. stops it and starts it again: the time until every file is served from the index (nothing
   parsed again);
5. unless ``--rss-files 0``: writes ``--rss-files`` (100,000) small instances
   (``--rss-rows`` x ``--rss-rows`` pixels), indexes them with a new daemon and prints its
   VmRSS once everything is indexed, its peak (VmHWM), and again after a restart.

Needs root and /dev/fuse. Nothing passes or fails on time: the ratios are measured against
the baselines of the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError
from deidfs.ops.control_client import call
from deidfs.view.render import Layout, render_path
from synth import Tree, write_instances

CONFIG = """\
[daemon]
mountpoint = "{work}/mnt"
state_dir = "{state}"
export_dir = "{work}/export"
control_socket = "{state}/control.sock"
metrics_address = ""
settle_seconds = {settle}
workers = {workers}
cache_mib = {cache_mib}

[folders.ct]
path = "{src}"
profile = "Basic"
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def deidfs_exe() -> str:
    """The ``deidfs`` console script next to this interpreter, as a user runs it."""
    return shutil.which("deidfs", path=str(Path(sys.executable).parent)) or "deidfs"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of a process; empty once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Run:
    """One daemon run until every file is served."""

    started: float = 0.0  #: monotonic time of the spawn
    mounted: float = 0.0  #: seconds from spawn to the control socket answering "ready"
    served: float = 0.0  #: seconds from spawn to every file served and nothing queued
    cpu: float = 0.0  #: daemon CPU seconds at that point
    rss_kib: int = 0  #: VmRSS then
    hwm_kib: int = 0  #: VmHWM (peak RSS) then
    rendered: int = 0
    reused: int = 0
    withheld: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  #: (seconds, served)


class Daemon:
    """``deidfs run`` for one configuration file, with its log in ``log``."""

    def __init__(self, config: Path, socket: Path, log: Path) -> None:
        self.config = config
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        with open(self.log, "ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                [deidfs_exe(), "--config", str(self.config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return started

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            reply = call(self.socket, "status", timeout=10.0)
        except DeidfsError:
            return None
        return reply.result if reply.ok else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def wait_served(self, want: int, started: float, timeout: float) -> Run:
        """Poll ``status`` until ``want`` files are served or withheld and nothing is queued."""
        run = Run(started=started)
        deadline = started + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}; see {self.log}")
            st = self.status()
            now = time.monotonic()
            if st is not None:
                if not run.mounted and st.get("ready"):
                    run.mounted = now - started
                folders = st["folders"]
                done = sum(f["visible"] + f["duplicates"] + f["withheld_total"] for f in folders)
                run.samples.append((now - started, done))
                if done >= want and st["index"]["backlog"] == 0:
                    run.served = now - started
                    run.cpu = cpu_seconds(self.pid)
                    mem = proc_status(self.pid)
                    run.rss_kib, run.hwm_kib = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
                    run.rendered = st["index"]["rendered"]
                    run.reused = st["index"]["reused"]
                    run.withheld = sum(f["withheld_total"] for f in folders)
                    return run
            if now > deadline:
                raise SystemExit(
                    f"not every file was served within {timeout:.0f} s; see {self.log}"
                )
            time.sleep(0.05)


@dataclass(frozen=True)
class Baseline:
    name: str
    seconds: float


def _timed(name: str, fn: Any) -> Baseline:
    t0 = time.perf_counter()
    fn()
    return Baseline(name, time.perf_counter() - t0)


def _files(root: Path) -> list[str]:
    return sorted(os.path.join(top, name) for top, _dirs, names in os.walk(root) for name in names)


def _walk_lstat(root: Path) -> None:
    for top, _dirs, names in os.walk(root):
        for name in names:
            os.lstat(os.path.join(top, name))


def _read_heads(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 16384)
        finally:
            os.close(fd)


def _render_all(files: list[str], root: Path) -> None:
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    pseudo = Pseudonymizer(bytes(range(32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            render_path(
                path, plan, pseudo, Layout.DICOM, PurePosixPath(os.path.relpath(path, root))
            )


def drop_caches() -> bool:
    """Empty the page cache (root only); False if not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def wait_settled(settle: float, newest_ns: int) -> None:
    """Sleep until the newest file is older than ``settle``: an initial scan then takes every
    file at once, as it does for files that were there before the daemon started."""
    age = (time.time_ns() - newest_ns) / 1e9
    if age < settle + 0.1:
        time.sleep(settle + 0.1 - age)


def write_config(work: Path, name: str, src: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    state = work / f"state-{name}"
    config = work / f"{name}.toml"
    config.write_text(
        CONFIG.format(
            work=work,
            state=state,
            src=src,
            settle=args.settle,
            workers=args.workers,
            cache_mib=args.cache_mib,
        )
    )
    return config, state / "control.sock"


def log_problems(log: Path) -> None:
    """Print the daemon log's ERROR and WARNING lines (a run with them is suspect)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return
    bad = [x for x in lines if " ERROR " in x or " WARNING " in x or x.startswith("Traceback")]
    if bad:
        print(f"{len(bad)} ERROR/WARNING line(s) in {log.name}:")
        for line in bad[:10]:
            print(f"  {line}")


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def index_part(work: Path, args: argparse.Namespace) -> None:
    src = work / "src"
    t0 = time.monotonic()
    tree = write_instances(src, args.files, rows=args.rows, columns=args.cols)
    subprocess.run(["sync"], check=True)
    print(
        f"wrote {tree.files} files ({args.rows}x{args.cols} pixels), "
        f"{tree.bytes / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s under {work}"
    )
    files = _files(src)
    cold = args.cold and drop_caches()
    if args.cold and not cold:
        print("--cold: cannot drop the page cache (not root?); caches stay warm")
    baselines = []
    for name, fn in (
        ("walk + lstat", lambda: _walk_lstat(src)),
        ("read first 16 KiB", lambda: _read_heads(files)),
        ("render_path, 1 thread", lambda: _render_all(files, src)),
    ):
        if cold:
            drop_caches()
        baselines.append(_timed(name, fn))
    config, socket = write_config(work, "index", src, args)
    daemon = Daemon(config, socket, work / "daemon-index.log")
    wait_settled(args.settle, max(os.lstat(p).st_mtime_ns for p in files))
    if cold:
        drop_caches()
    try:
        first = daemon.wait_served(tree.files, daemon.start(), args.timeout)
        daemon.stop()
        again = daemon.wait_served(tree.files, daemon.start(), args.timeout)
        restart_rss = proc_status(daemon.pid).get("VmRSS", 0)
    finally:
        daemon.stop()
    _index_table(tree, baselines, first, again, restart_rss, args, cold)
    log_problems(daemon.log)


def _index_table(
    tree: Tree,
    baselines: list[Baseline],
    first: Run,
    again: Run,
    restart_rss: int,
    args: argparse.Namespace,
    cold: bool,
) -> None:
    render = next(b for b in baselines if b.name.startswith("render_path"))
    indexing = first.served - first.mounted
    print()
    cache = "page cache dropped" if cold else "page cache warm"
    print(
        f"indexing {tree.files} files from cold ({cache}; "
        f"workers = {args.workers}, cache_mib = {args.cache_mib}, settle_seconds = {args.settle})"
    )
    header = f"{'run':<40}{'seconds':>9}{'files/s':>10}{'x render':>10}"
    print(header)
    print("-" * len(header))
    for b in baselines:
        print(
            f"{b.name:<40}{b.seconds:9.2f}{tree.files / b.seconds:10.0f}"
            f"{render.seconds / b.seconds:10.2f}"
        )
    rows = (
        ("deidfs run: start to every file served", first.served),
        ("deidfs run: mounted to every file served", indexing),
        ("restart: start to every file served", again.served),
    )
    for name, seconds in rows:
        print(
            f"{name:<40}{seconds:9.2f}{tree.files / seconds:10.0f}{render.seconds / seconds:10.2f}"
        )
    print()
    print(
        f"first run: mounted after {first.mounted:.2f} s; {first.rendered} rendered, "
        f"{first.reused} reused, {first.withheld} withheld; daemon CPU {first.cpu:.1f} s "
        f"({first.cpu / tree.files * 1000:.2f} ms per file); "
        f"RSS {_mib(first.rss_kib)}, peak {_mib(first.hwm_kib)}"
    )
    print(
        f"restart: mounted after {again.mounted:.2f} s; {again.rendered} rendered, "
        f"{again.reused} reused from the index; daemon CPU {again.cpu:.1f} s; "
        f"RSS {_mib(restart_rss)}"
    )
    print(
        "x render: throughput ratio against render_path of every file in one thread of this "
        "process (its time / the row's time), measured in this run"
    )


def rss_part(work: Path, args: argparse.Namespace) -> None:
    src = work / "rss-src"
    t0 = time.monotonic()
    tree = write_instances(src, args.rss_files, rows=args.rss_rows, columns=args.rss_rows)
    subprocess.run(["sync"], check=True)
    print(
        f"\nwrote {tree.files} files ({args.rss_rows}x{args.rss_rows} pixels), "
        f"{tree.bytes / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s"
    )
    wait_settled(args.settle, time.time_ns())
    config, socket = write_config(work, "rss", src, args)
    daemon = Daemon(config, socket, work / "daemon-rss.log")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            if daemon.proc is not None:
                rss = proc_status(daemon.pid).get("VmRSS")
                if rss:
                    samples.append(rss)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        started = daemon.start()
        sampler.start()
        first = daemon.wait_served(tree.files, started, args.timeout)
        time.sleep(1.0)  # let the last index writes and frees settle
        after = proc_status(daemon.pid)
        cache = (daemon.status() or {}).get("cache", {})
        daemon.stop()
        again = daemon.wait_served(tree.files, daemon.start(), args.timeout)
        restart = proc_status(daemon.pid)
    finally:
        stop.set()
        daemon.stop()
    log_problems(daemon.log)
    target = 300 * 1024
    print(
        f"RSS with {tree.files} indexed files (cache_mib = {args.cache_mib}, "
        f"workers = {args.workers}):"
    )
    print(
        f"  after indexing: VmRSS {_mib(after.get('VmRSS', 0))} "
        f"({after.get('VmRSS', 0) / target:.2f}x the 300 MB target), "
        f"peak VmHWM {_mib(after.get('VmHWM', 0))}, sampled max {_mib(max(samples, default=0))}"
    )
    print(
        f"  header cache then: {cache.get('entries', 0)} headers, "
        f"{cache.get('bytes', 0) / 1048576:.0f} MiB as the cache counts them "
        f"(bound: cache_mib = {args.cache_mib})"
    )
    print(
        f"  indexing took {first.served:.1f} s ({tree.files / first.served:.0f} files/s, "
        f"daemon CPU {first.cpu:.1f} s); a restart served them all after {again.served:.2f} s "
        f"({again.reused} from the index), VmRSS then {_mib(restart.get('VmRSS', 0))}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000, help="files to index (10000)")
    parser.add_argument("--rows", type=int, default=512, help="pixel rows of those (512)")
    parser.add_argument("--cols", type=int, default=512, help="pixel columns of those (512)")
    parser.add_argument(
        "--rss-files", type=int, default=100_000, help="files of the RSS part (100000; 0: skip)"
    )
    parser.add_argument("--rss-rows", type=int, default=64, help="their rows = columns (64)")
    parser.add_argument("--workers", type=int, default=2, help="[daemon] workers (2)")
    parser.add_argument("--cache-mib", type=int, default=32, help="[daemon] cache_mib (32)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="[daemon] settle_seconds (2.0, the default)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before each part (root)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per daemon run (3600 s)")
    parser.add_argument("--workdir", help="parent of the work directory (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (the daemon mounts)")
        return 1

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-index-", dir=args.workdir))
    try:
        if args.files > 0:
            index_part(work, args)
        if args.rss_files > 0:
            rss_part(work, args)
    finally:
        for mnt in work.glob("mnt"):
            subprocess.run(["fusermount3", "-u", "-q", str(mnt)], check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
