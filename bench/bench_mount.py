"""Benchmark reading through the mount against reading the originals, and first-open latency.

See ``bench/README.md``. Needs root and /dev/fuse (a real mount). In one invocation:

1. builds ``--files`` synthetic 512x512 16-bit CT files (``synth.build_tree``, 0.5 MB each)
   and a configuration with one folder bound to Basic;
2. starts ``deidfs run`` (the console script, as a user runs it) and waits until every file
   is indexed and visible in the mount;
3. reads every original once (warm-up), then every original again, timed: open, read 4 KiB,
   read the rest, close; then every view of the mount the same way, each for the first
   time (nothing of the mount in the page cache); prints MB/s, files/s, the ratio mount /
   raw and the latency of each first open (the ``open`` call, and open + the first 4 KiB):
   p50, p99, max;
4. with ``--cold`` (root): both again after dropping the page cache;
5. with ``--restart``: stops the daemon, starts it again (the index persists, the header
   cache starts empty) and reads every view again, first opens included;
6. with ``--large``: one multi-frame file of ``--large-mb`` MB read whole, as raw read, through
   deidfs and through a plain passthrough mfusepy mount of the same source (the same
   binding, libfuse and mount options: what FUSE in Python costs without deidfs).

Nothing passes or fails on time: the ratios are measured against the raw read of the same
files in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import Daemon, drop_caches, log_problems, proc_status, wait_settled
from synth import build_tree, write_multiframe

CONFIG = """\
[daemon]
mountpoint = "{mnt}"
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
LARGE_FOLDER = """
[folders.large]
path = "{large}"
profile = "Basic"
"""
CHUNK = 1 << 20
FIRST = 4096


@dataclass
class Pass:
    """One timed read of a set of files: open, 4 KiB, the rest, close; each file once."""

    name: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    open_s: list[float] = field(default_factory=list)  #: the open() call, per file
    first_s: list[float] = field(default_factory=list)  #: open() + the first 4 KiB, per file

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def files_s(self) -> float:
        return self.files / self.seconds


def read_files(name: str, paths: list[str]) -> Pass:
    """Read each file whole, as a viewer opening a file does: header first, then the rest."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    out = Pass(name)
    clock = time.perf_counter
    started = clock()
    for path in paths:
        t0 = clock()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        t1 = clock()
        try:
            n = os.readv(fd, [view[:FIRST]])
            t2 = clock()
            while got := os.readv(fd, [view]):
                n += got
        finally:
            os.close(fd)
        out.open_s.append(t1 - t0)
        out.first_s.append(t2 - t0)
        out.bytes += n
        out.files += 1
    out.seconds = clock() - started
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def print_passes(title: str, passes: list[Pass], base: Pass) -> None:
    """A table of passes; ``x raw`` is ``base``'s time / the row's time (the same files)."""
    print(f"\n{title}")
    header = (
        f"{'read':<36}{'seconds':>8}{'files/s':>9}{'MB/s':>8}{'x raw':>7}"
        f"{'open p50/p99/max ms':>26}{'open+4KiB p50/p99/max ms':>29}"
    )
    print(header)
    print("-" * len(header))
    for p in passes:
        ratio = f"{base.seconds / p.seconds:7.2f}"
        opens = "/".join(_ms(_quantile(p.open_s, q)) for q in (0.5, 0.99, 1.0))
        firsts = "/".join(_ms(_quantile(p.first_s, q)) for q in (0.5, 0.99, 1.0))
        print(
            f"{p.name:<36}{p.seconds:8.2f}{p.files_s:9.0f}{p.mb_s:8.0f}{ratio}"
            f"{opens:>26}{firsts:>29}"
        )


def _views(root: Path) -> list[str]:
    return sorted(os.path.join(top, name) for top, _dirs, names in os.walk(root) for name in names)


def start_served(daemon: Daemon, listed: dict[Path, int], timeout: float) -> float:
    """Start the daemon; wait until every file is served, nothing is queued and the mount
    lists ``listed[folder]`` files in each folder. Returns the seconds it took."""
    started = daemon.start()
    daemon.wait_served(sum(listed.values()), started, timeout)
    deadline = time.monotonic() + timeout
    while any(len(_views(folder)) < want for folder, want in listed.items()):
        if time.monotonic() > deadline:
            raise SystemExit(f"the mount does not list every file; see {daemon.log}")
        time.sleep(0.1)
    # A restart re-checks every file the initial scan finds: wait until that is done too.
    quiet = 0
    while quiet < 5:
        st = daemon.status()
        quiet = quiet + 1 if st is not None and st["index"]["backlog"] == 0 else 0
        time.sleep(0.2)
    return time.monotonic() - started


def _cache_line(daemon: Daemon) -> str:
    st = daemon.status() or {}
    cache = st.get("cache", {})
    index = st.get("index", {})
    return (
        f"header cache: {cache.get('entries', 0)} entries, "
        f"{cache.get('bytes', 0) / 1048576:.1f} MiB, {cache.get('hits', 0)} hits, "
        f"{cache.get('misses', 0)} misses; index: {index.get('rendered', 0)} rendered, "
        f"{index.get('reused', 0)} reused"
    )


# -- the plain passthrough mount -------------------------------------------------------------


def serve_passthrough(source: str, mountpoint: str) -> int:
    """Run a read-only passthrough mfusepy mount of ``source`` (foreground, until unmounted).

    The same binding, libfuse and mount options as deidfs; the operations are lstat, a
    listing, open, pread and close of the source: FUSE in Python with nothing else.
    """
    from deidfs.fusefs import load_mfusepy, mount_options

    mfusepy = load_mfusepy()

    class Passthrough:
        use_ns = True

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            st = os.lstat(source + path)
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_blocks")
            attrs = {k: int(getattr(st, k)) for k in keys}
            for t in ("st_atime", "st_mtime", "st_ctime"):
                attrs[t] = int(getattr(st, f"{t}_ns"))
            return attrs

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(source + path)]

        def open(self, path: str, flags: int) -> int:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EROFS, "read-only")
            return os.open(source + path, os.O_RDONLY | os.O_CLOEXEC)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    options = mount_options(allow_other=False)
    options.update(fsname="passthrough", subtype="passthrough")
    # libfuse3 returns the signal number (RuntimeError) when a signal ended the loop.
    with contextlib.suppress(RuntimeError):
        mfusepy.FUSE(Passthrough(), mountpoint, foreground=True, nothreads=False, **options)
    return 0


def _set_read_ahead(mountpoint: Path, kib: int = 1024) -> None:
    """What deidfs does after mounting (root only): 512 KiB-1 MiB read requests."""
    dev = os.stat(mountpoint).st_dev
    try:
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        print(f"read-ahead of the passthrough mount left at the default: {exc.strerror}")


def _drop_file_cache(path: str) -> None:
    """Drop one file's cached pages (a mount's, here), so the next read is a first read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def passthrough_mount(source: Path, mountpoint: Path, log_path: Path) -> Iterator[Path]:
    """A passthrough mount of ``source`` at ``mountpoint`` (own process), unmounted after."""
    mountpoint.mkdir()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-passthrough", str(source), str(mountpoint)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mountpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the passthrough mount did not come up; see {log_path}")
                time.sleep(0.05)
            _set_read_ahead(mountpoint)
            yield mountpoint
        finally:
            subprocess.run(["fusermount3", "-u", "-q", str(mountpoint)], check=False)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def large_part(work: Path, view: str, large: Path, rounds: int) -> None:
    source = large / "multiframe.dcm"
    with passthrough_mount(large, work / "mnt-pt-large", work / "passthrough.log") as pt:
        through = str(pt / source.name)
        best: dict[str, Pass] = {}
        for _ in range(rounds):
            runs = (("raw read", str(source)), ("deidfs", view), ("passthrough mfusepy", through))
            for name, path in runs:
                if name != "raw read":
                    _drop_file_cache(path)  # a first read through the mount, every round
                p = read_files(name, [path])
                if name not in best or p.seconds < best[name].seconds:
                    best[name] = p
    raw, deid, passthrough = best["raw read"], best["deidfs"], best["passthrough mfusepy"]
    print(
        f"\none {raw.bytes / 1e6:.0f} MB multi-frame file read whole (source in the page cache, "
        f"first reads through the mounts; best of {rounds})"
    )
    header = f"{'read':<24}{'seconds':>8}{'MB/s':>8}{'x raw':>8}{'x passthrough':>15}"
    print(header)
    print("-" * len(header))
    for p in (raw, deid, passthrough):
        print(
            f"{p.name:<24}{p.seconds:8.3f}{p.mb_s:8.0f}{raw.seconds / p.seconds:8.2f}"
            f"{passthrough.seconds / p.seconds:15.2f}"
        )


# -- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="CT files of 0.5 MB (1000)")
    parser.add_argument("--cold", action="store_true", help="also from a cold page cache")
    parser.add_argument(
        "--restart", action="store_true", help="also after a restart (empty header cache)"
    )
    parser.add_argument(
        "--large", action="store_true", help="a large multi-frame file, also via passthrough"
    )
    parser.add_argument("--large-mb", type=int, default=128, help="its size in MB (128)")
    parser.add_argument(
        "--no-passthrough", action="store_true", help="skip the passthrough mount of the files"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --large, best (3)")
    parser.add_argument("--workers", type=int, default=2, help="[daemon] workers (2)")
    parser.add_argument("--cache-mib", type=int, default=32, help="[daemon] cache_mib (32)")
    parser.add_argument("--settle", type=float, default=2.0, help="[daemon] settle_seconds (2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per daemon start (600 s)")
    parser.add_argument("--workdir", help="parent of the work directory (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--serve-passthrough", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_passthrough:
        return serve_passthrough(*args.serve_passthrough)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (a real mount)")
        return 1

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-mount-", dir=args.workdir))
    daemon: Daemon | None = None
    try:
        src, mnt, state = work / "src", work / "mnt", work / "state"
        t0 = time.monotonic()
        tree = build_tree(src, args.files)
        print(
            f"built {tree.files} files, {tree.bytes / 1e6:.0f} MB in "
            f"{time.monotonic() - t0:.1f} s under {work}"
        )
        text = CONFIG.format(
            mnt=mnt,
            state=state,
            work=work,
            src=src,
            settle=args.settle,
            workers=args.workers,
            cache_mib=args.cache_mib,
        )
        large = work / "large"
        if args.large:
            large.mkdir()
            frames = -(-args.large_mb * 1_000_000 // (512 * 512 * 2))
            size = write_multiframe(large / "multiframe.dcm", frames)
            print(f"wrote a multi-frame file of {frames} frames, {size / 1e6:.0f} MB")
            text += LARGE_FOLDER.format(large=large)
        config = work / "deidfs.toml"
        config.write_text(text)
        subprocess.run(["sync"], check=True)
        daemon = Daemon(config, state / "control.sock", work / "daemon.log")
        originals = sorted(str(p) for p in src.rglob("*.dcm"))
        wait_settled(args.settle, max(os.lstat(p).st_mtime_ns for p in originals))
        print(
            f"deidfs run: workers = {args.workers}, cache_mib = {args.cache_mib}, "
            f"settle_seconds = {args.settle}"
        )
        listed = {mnt / "ct": tree.files}
        if args.large:
            listed[mnt / "large"] = 1
        took = start_served(daemon, listed, args.timeout)
        views = _views(mnt / "ct")
        print(f"{len(views)} files served and listed {took:.1f} s after the start")
        print(f"daemon RSS: {proc_status(daemon.pid).get('VmRSS', 0) / 1024:.0f} MiB")
        print(_cache_line(daemon))

        read_files("warm-up", originals)
        raw = read_files("raw read (page cache warm)", originals)
        mount = read_files("mount, first reads (source warm)", views)
        passes = [raw, mount]
        if not args.no_passthrough:
            with passthrough_mount(src, work / "mnt-pt", work / "passthrough.log") as pt:
                through = [str(pt / os.path.relpath(p, src)) for p in originals]
                passes.append(read_files("passthrough mfusepy, first reads", through))
        print_passes(
            f"{tree.files} CT files of {tree.bytes / tree.files / 1e6:.2f} MB, read whole one "
            "after another",
            passes,
            raw,
        )
        print(_cache_line(daemon))
        if args.cold:
            _cold(originals, views)
        if args.restart:
            daemon.stop()
            took = start_served(daemon, listed, args.timeout)
            print(f"\nrestarted: every file served again {took:.1f} s after the start")
            again = read_files("after a restart, first reads", _views(mnt / "ct"))
            print_passes(
                "after a restart (the index persists, the header cache is empty)",
                [raw, again],
                raw,
            )
            print(_cache_line(daemon))
        if args.large:
            large_part(work, _views(mnt / "large")[0], large, args.rounds)
    finally:
        if daemon is not None:
            daemon.stop()
            log_problems(daemon.log)
        for m in (work / "mnt", work / "mnt-pt", work / "mnt-pt-large"):
            subprocess.run(["fusermount3", "-u", "-q", str(m)], check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _cold(originals: list[str], views: list[str]) -> None:
    """Both reads again after dropping the page cache: the sources' pages and the mount's
    (and the kernel's cached names and attributes of the mount) go."""
    if not drop_caches():
        print("\n--cold: cannot drop the page cache (not root?)")
        return
    raw = read_files("raw read (page cache dropped)", originals)
    drop_caches()
    mount = read_files("mount, first reads (cache dropped)", views)
    print_passes(
        "from a cold page cache (sync; echo 3 > /proc/sys/vm/drop_caches before each)",
        [raw, mount],
        raw,
    )


if __name__ == "__main__":
    raise SystemExit(main())
