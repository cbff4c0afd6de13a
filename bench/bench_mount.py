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

7. unless ``--no-c``: the C floor. ``bench/passthrough.c`` (libfuse3's high-level API,
   built here with gcc and pkg-config fuse3) serves the same files (hard links) with
   deidfs's mount options and read-ahead; in alternating rounds both mounts are read with
   the same loop after dropping the page cache and warming the sources: first reads with 1
   and ``--readers`` processes, second reads, open + 4 KiB p50/p99, ``ls -lR``, the large
   file; then first reads, pass after pass, while ``--burst-files`` new files are copied
   into each tree, until deidfs has indexed them all (C: until the copy ends); the row is
   the median pass. Prints each as a ratio deidfs / C beside the raw figures.

Nothing passes or fails on time: the ratios are measured against the raw read (or the C
passthrough) of the same files in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import Daemon, drop_caches, log_problems, proc_status, wait_settled
from synth import build_tree, write_instances, write_multiframe

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
BURST_PASSES = 60  #: at most this many read passes during a burst


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
    from deidfs.mount.binding import load_mfusepy
    from deidfs.mount.lifecycle import mount_options

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


# -- deidfs against the C passthrough, in the same run ---------------------------------------

PASSTHROUGH_C = Path(__file__).resolve().parent / "passthrough.c"
APT_PACKAGES = ("gcc", "libfuse3-dev", "pkg-config")


def _have_c_toolchain() -> bool:
    if shutil.which("gcc") is None or shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "fuse3"], check=False).returncode == 0


def build_passthrough(out: Path, read_buf: bool) -> Path:
    """Compile ``passthrough.c`` with gcc against libfuse3; installs the packages it needs
    with apt-get (the bench's own set-up) when gcc, pkg-config or fuse3.pc are missing."""
    if not _have_c_toolchain():
        print(f"installing {' '.join(APT_PACKAGES)} with apt-get (for bench/passthrough.c)")
        apt = ["apt-get", "install", "-y", "-q", *APT_PACKAGES]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(apt, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(apt, env=env, check=True)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()
    define = ["-DPT_READ_BUF"] if read_buf else []
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", *define, str(PASSTHROUGH_C), "-o", str(out), *flags],
        check=True,
    )
    return out


def _fuse_o(options: dict[str, object]) -> str:
    return ",".join(k if v is True else f"{k}={v}" for k, v in options.items() if v is not False)


@contextlib.contextmanager
def c_mount(
    binary: Path, source: Path, mountpoint: Path, log_path: Path, single: bool
) -> Iterator[Path]:
    """The C passthrough of ``source`` at ``mountpoint``, with deidfs's mount options and
    read-ahead (multithreaded like deidfs unless ``single``); unmounted after."""
    from deidfs.mount.lifecycle import mount_options

    options = mount_options(allow_other=False)
    options.update(fsname="passthrough-c", subtype="passthrough-c")
    # libfuse 3 takes use_ino in fuse_config only (mfusepy sets it there), never as -o.
    options.pop("use_ino", None)
    argv = [str(binary), str(source), str(mountpoint), "-f", "-o", _fuse_o(options)]
    if single:
        argv.append("-s")
    mountpoint.mkdir(exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mountpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the C passthrough did not mount; see {log_path}")
                time.sleep(0.02)
            _set_read_ahead(mountpoint)
            yield mountpoint
        finally:
            subprocess.run(["fusermount3", "-u", "-q", str(mountpoint)], check=False)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _read_share(paths: list[str]) -> Pass:
    return read_files("share", paths)


def read_parallel(name: str, paths: list[str], pool: Any, readers: int) -> Pass:
    """``readers`` processes of ``pool`` read an interleaved share of ``paths`` each."""
    started = time.perf_counter()
    parts = pool.map(_read_share, [paths[i::readers] for i in range(readers)])
    out = Pass(name, seconds=time.perf_counter() - started)
    for p in parts:
        out.files += p.files
        out.bytes += p.bytes
        out.open_s += p.open_s
        out.first_s += p.first_s
    return out


def _walk_lstat(root: Path) -> int:
    n = 0
    for top, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            os.lstat(os.path.join(top, name))
            n += 1
    return n


def _fresh(warm: list[str], meta: Sequence[Path] = ()) -> None:
    """Drop the page cache (the mounts' pages, names and attributes go with it), then read
    ``warm`` and stat ``meta`` again: the sources are warm, the mounts are not."""
    if not drop_caches():
        raise SystemExit("cannot drop the page cache (needs root)")
    if warm:
        read_files("warm", warm)
    for root in meta:
        _walk_lstat(root)


def _ls_lr(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-lR", str(root)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


@dataclass
class Side:
    """One mount's figures, one list entry per round."""

    name: str
    first1: list[Pass] = field(default_factory=list)
    first4: list[Pass] = field(default_factory=list)
    second: list[Pass] = field(default_factory=list)
    ls_s: list[float] = field(default_factory=list)
    large: list[Pass] = field(default_factory=list)
    burst: list[Pass] = field(default_factory=list)


@dataclass
class Tree2:
    """What one mount serves: the CT files, the root to list, the large file."""

    views: list[str]
    listed: Path
    large: str


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def c_rounds(
    sides: dict[str, Tree2],
    results: dict[str, Side],
    originals: list[str],
    large_source: str,
    meta: list[Path],
    rounds: int,
    readers: int,
) -> None:
    """Rounds in which each mount is measured once, the order alternating."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(readers) as pool:
        pool.map(abs, range(readers))  # the workers are up before anything is timed
        for r in range(rounds):
            names = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in names:
                tree, res = sides[name], results[name]
                _fresh(originals)
                res.first1.append(read_files(name, tree.views))
                res.second.append(read_files(name, tree.views))
                _fresh(originals)
                res.first4.append(read_parallel(name, tree.views, pool, readers))
                _fresh([], meta)
                res.ls_s.append(_ls_lr(tree.listed))
                _fresh([large_source])
                res.large.append(read_files(name, [tree.large]))
            print(f"round {r + 1}/{rounds} done")


def _copy_tree(stage: Path, dest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["cp", "-r", str(stage), str(dest)])


def _burst_passes(name: str, views: list[str], going: Callable[[], bool]) -> list[Pass]:
    """First reads of ``views``, pass after pass, for as long as ``going()`` says the load
    is on (at least one pass, at most ``BURST_PASSES``). Each file's cached pages are
    dropped before its pass, so every pass is of first reads; names and attributes stay
    cached on both mounts alike."""
    passes: list[Pass] = []
    while len(passes) < BURST_PASSES:
        for view in views:
            _drop_file_cache(view)
        passes.append(read_files(name, views))
        if not going():
            break
    return passes


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _rendered(daemon: Daemon) -> int:
    return int((daemon.status() or {}).get("index", {}).get("rendered", 0))


def burst_round(
    sides: dict[str, Tree2],
    results: dict[str, Side],
    originals: list[str],
    stage: Path,
    dests: dict[str, Path],
    daemon: Daemon,
    want: int,
) -> dict[str, str]:
    """First reads while ``stage`` is copied into each mount's source tree: deidfs indexes
    the new files as they arrive; the C passthrough only sees the copy. The reads are
    repeated for as long as that load lasts (deidfs: until every new file is indexed; C:
    until the copy ends), so the row covers the whole burst, not where one pass fell in it.
    Returns a note per side on the passes and the load they overlapped."""
    notes: dict[str, str] = {}
    for name, tree in sides.items():
        _fresh(originals)
        before = _rendered(daemon)

        def indexed(before: int = before) -> int:
            return _rendered(daemon) - before

        t0 = time.monotonic()
        cp = _copy_tree(stage, dests[name])
        if name == "deidfs":
            # Start reading once indexing is under way (the copy alone is C's whole load).
            while time.monotonic() - t0 < 30 and indexed() <= 0:
                time.sleep(0.01)
            started = indexed()
            passes = _burst_passes(name, tree.views, lambda: indexed() < want)
            done = indexed()
            notes[name] = (
                f"{len(passes)} passes in {time.monotonic() - t0:.1f} s, while "
                f"{done - started} of the {want} new files were indexed ({started} before the "
                "first pass began)"
            )
        else:
            passes = _burst_passes(name, tree.views, functools.partial(_running, cp))
            copying = cp.poll() is None
            notes[name] = f"{len(passes)} passes in {time.monotonic() - t0:.1f} s" + (
                ", the copy still running at the end" if copying else ", while the copy ran"
            )
        results[name].burst.extend(passes)
        cp.wait()
        if name == "deidfs":
            # Let indexing finish before anything else is measured.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                st = daemon.status() or {}
                if indexed() >= want and st.get("index", {}).get("backlog", 1) == 0:
                    break
                time.sleep(0.1)
            notes[name] += f"; all indexed {time.monotonic() - t0:.1f} s after the copy began"
    return notes


def _row(label: str, deid: float, c: float, unit: str, ratio: float, target: str) -> str:
    return f"{label:<40}{deid:>12.3f}{c:>12.3f}  {unit:<9}{ratio:>7.2f}x  {target}"


def print_c_table(
    results: dict[str, Side], files: int, rounds: int, notes: dict[str, str], how: str
) -> None:
    d, c = results["deidfs"], results["C"]

    def per_file(ps: list[Pass]) -> float:
        return _median([p.seconds / p.files * 1000 for p in ps])

    def q(ps: list[Pass], quant: float) -> float:
        return _median([_quantile(p.first_s, quant) * 1000 for p in ps])

    print(
        f"\ndeidfs against the C passthrough ({how}; the same mount options and read-ahead), "
        f"{files} CT files; medians of {rounds} round(s)"
    )
    print("speed ratios are C's time / deidfs's time (1.00x = as fast as C); latency ratios")
    print("are deidfs's / C's (1.00x = as short as C's)")
    header = f"{'measure':<40}{'deidfs':>12}{'C':>12}  {'unit':<9}{'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    rows = [
        ("first reads, 1 reader", per_file(d.first1), per_file(c.first1), "ms/file", ">= 0.85x"),
        ("first reads, 4 readers", per_file(d.first4), per_file(c.first4), "ms/file", ">= 0.85x"),
        ("second reads, 1 reader", per_file(d.second), per_file(c.second), "ms/file", ">= 0.9x"),
    ]
    for label, dv, cv, unit, target in rows:
        print(_row(label, dv, cv, unit, cv / dv, target))
    for quant, target in ((0.5, ""), (0.99, "<= 2x")):
        dv, cv = q(d.first1, quant), q(c.first1, quant)
        label = f"open + first 4 KiB p{round(quant * 100)}, first reads"
        print(_row(label, dv, cv, "ms", dv / cv, target))
    dv, cv = _median(d.ls_s) * 1000, _median(c.ls_s) * 1000
    print(_row("ls -lR of the tree", dv, cv, "ms", cv / dv, ">= 0.8x"))
    dl, cl = _median([p.mb_s for p in d.large]), _median([p.mb_s for p in c.large])
    size = d.large[0].bytes / 1e6
    print(
        _row(f"one {size:.0f} MB multi-frame file, first read", dl, cl, "MB/s", dl / cl, ">= 0.9x")
    )
    if d.burst and c.burst:
        dv, cv = per_file(d.burst), per_file(c.burst)
        print(_row("first reads during the burst, 1 reader", dv, cv, "ms/file", cv / dv, ">= 0.6x"))
        for name, note in notes.items():
            print(f"  burst, {name}: {note}")


# -- the run ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--files", type=int, help="CT files of 0.5 MB (1000; --quick 200)")
    parser.add_argument("--cold", action="store_true", help="also from a cold page cache")
    parser.add_argument(
        "--restart", action="store_true", help="also after a restart (empty header cache)"
    )
    parser.add_argument(
        "--large", action="store_true", help="a large multi-frame file, also via passthrough"
    )
    parser.add_argument("--large-mb", type=int, help="its size in MB (128; --quick 32)")
    parser.add_argument(
        "--no-passthrough", action="store_true", help="skip the mfusepy passthrough of the files"
    )
    parser.add_argument(
        "--no-c", action="store_true", help="skip the comparison with the C passthrough"
    )
    parser.add_argument(
        "--c-read-buf", action="store_true", help="build the C passthrough with read_buf"
    )
    parser.add_argument(
        "--c-single-thread", action="store_true", help="run the C passthrough with -s"
    )
    parser.add_argument("--readers", type=int, default=4, help="parallel reader processes (4)")
    parser.add_argument(
        "--burst-files", type=int, help="new files copied in during reads (10000; --quick 1000)"
    )
    parser.add_argument(
        "--burst-rows", type=int, default=256, help="their rows and columns of pixels (256)"
    )
    parser.add_argument("--rounds", type=int, help="rounds of --large and against C (3)")
    parser.add_argument("--workers", type=int, default=2, help="[daemon] workers (2)")
    parser.add_argument("--cache-mib", type=int, default=32, help="[daemon] cache_mib (32)")
    parser.add_argument("--settle", type=float, default=2.0, help="[daemon] settle_seconds (2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per daemon start (600 s)")
    parser.add_argument("--workdir", help="parent of the work directory (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--serve-passthrough", nargs=2, help=argparse.SUPPRESS)
    return parser


QUICK_HELP = "a run of under 2 minutes: 200 files, a 32 MB file, 1,000 new files"


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    for name, full, short in (
        ("files", 1000, 200),
        ("large_mb", 128, 32),
        ("burst_files", 10000, 1000),
        ("rounds", 3, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)


def _link_tree(src: Path, dest: Path) -> None:
    """``dest`` mirrors ``src`` with hard links: the same inodes (and page cache), in a tree
    deidfs does not watch."""
    for top, _dirs, names in os.walk(src):
        out = dest / os.path.relpath(top, src)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.link(os.path.join(top, name), out / name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_passthrough:
        return serve_passthrough(*args.serve_passthrough)
    _defaults(args)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (a real mount)")
        return 1
    with_c = not args.no_c
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
        with_large = args.large or with_c
        if with_large:
            large.mkdir()
            frames = -(-args.large_mb * 1_000_000 // (512 * 512 * 2))
            size = write_multiframe(large / "multiframe.dcm", frames)
            print(f"wrote a multi-frame file of {frames} frames, {size / 1e6:.0f} MB")
            text += LARGE_FOLDER.format(large=large)
        ctree, stage = work / "ctree", work / "stage"
        if with_c:
            _link_tree(src, ctree / "ct")
            _link_tree(large, ctree / "large")
            if args.burst_files:
                burst = write_instances(
                    stage, args.burst_files, rows=args.burst_rows, columns=args.burst_rows
                )
                print(
                    f"wrote {burst.files} new files of {burst.bytes / burst.files / 1e6:.2f} MB "
                    "to copy in during reads"
                )
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
        if with_large:
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
        if with_c:
            c_part(work, args, daemon, originals, mnt, src, ctree, stage, tree.files)
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
        for m in (work / "mnt", work / "mnt-pt", work / "mnt-pt-large", work / "mnt-c"):
            subprocess.run(["fusermount3", "-u", "-q", str(m)], check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def c_part(
    work: Path,
    args: argparse.Namespace,
    daemon: Daemon,
    originals: list[str],
    mnt: Path,
    src: Path,
    ctree: Path,
    stage: Path,
    files: int,
) -> None:
    """deidfs and the C passthrough of the same files, measured in alternating rounds."""
    t0 = time.monotonic()
    binary = build_passthrough(work / "passthrough", args.c_read_buf)
    how = (
        f"bench/passthrough.c, {'read_buf with an fd bufvec' if args.c_read_buf else 'pread'}, "
        f"{'single-threaded (-s)' if args.c_single_thread else 'multithreaded'}"
    )
    print(f"\nbuilt the C passthrough in {time.monotonic() - t0:.1f} s: {how}")
    large_source = str(work / "large" / "multiframe.dcm")
    with c_mount(
        binary, ctree, work / "mnt-c", work / "passthrough-c.log", args.c_single_thread
    ) as cm:
        sides = {
            "deidfs": Tree2(
                views=_views(mnt / "ct"), listed=mnt / "ct", large=_views(mnt / "large")[0]
            ),
            "C": Tree2(
                views=[str(cm / "ct" / os.path.relpath(p, src)) for p in originals],
                listed=cm / "ct",
                large=str(cm / "large" / "multiframe.dcm"),
            ),
        }
        if len(sides["deidfs"].views) != len(sides["C"].views):
            raise SystemExit("the two mounts do not list the same files")
        results = {name: Side(name) for name in sides}
        c_rounds(
            sides,
            results,
            originals,
            large_source,
            [src, ctree / "ct"],
            args.rounds,
            args.readers,
        )
        notes: dict[str, str] = {}
        if args.burst_files:
            notes = burst_round(
                sides,
                results,
                originals,
                stage,
                {"deidfs": src / "burst", "C": ctree / "burst"},
                daemon,
                args.burst_files,
            )
    print_c_table(results, files, args.rounds, notes, how)
    print(_cache_line(daemon))


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
