"""Benchmark ``deidfs anonymize --cluster`` against the same command in one process.

See ``bench/README.md``. Writes ``--files`` synthetic CT instances (``synth.write_instances``:
the realistic header, small images), then runs ``deidfs anonymize`` on them, each
configuration once per round (``--repeat`` rounds, the fastest run of each kept), and prints
files/s and ratios against the single-process run measured in the same invocation:

- ``single``: ``--workers 1``, everything in one process (the baseline);
- ``pool``: ``--workers N`` (this machine's worker processes, N = CPUs), for reference;
- ``local:1``: a Dask LocalCluster of one worker process with one thread: the same work as
  ``single`` but through the engine, so the difference is the engine's overhead;
- ``local:N``: a LocalCluster of N worker processes.

Each run is the ``deidfs`` console script as a user runs it. The seconds of a run are split
into the cluster's start-up (the command's ``ready in`` figure: LocalCluster and its worker
processes), and the processing (the summary's figure: listing aside, from the first task to
the last result settled); wall time is the whole command, Python's start included.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from synth import write_instances

SUMMARY = re.compile(r"deidfs anonymize: (\d+) files in ([\d.]+) s")
READY = re.compile(r"ready in ([\d.]+) s")


@dataclass(frozen=True)
class Timing:
    name: str
    wall: float  #: the whole command
    startup: float  #: the cluster's start (0 without one)
    processing: float  #: the command's own figure: first task to last result
    cpu: float  #: user + system CPU seconds of the command and all its processes
    files: int


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _run(name: str, argv: list[str], out: Path) -> Timing:
    subprocess.run(["sync"], check=True)  # earlier runs' dirty pages must not slow this one
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    summary = SUMMARY.search(proc.stdout)
    if summary is None:
        raise SystemExit(f"{name}: no summary line in its output")
    ready = READY.search(proc.stderr)
    return Timing(
        name,
        wall,
        float(ready.group(1)) if ready else 0.0,
        float(summary.group(2)),
        cpu,
        int(summary.group(1)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000, help="number of files (10,000)")
    parser.add_argument("--size", type=int, default=64, help="image rows and columns (64)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="N of pool and local:N (CPUs)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="files per task (256)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every run, the fastest kept (3)"
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="flush files to disk as deidfs does by default (without: every run --no-fsync, "
        "so that other work on a shared disk does not drown the engine in the figures)",
    )
    parser.add_argument("--workdir", help="where the files go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-cluster-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.monotonic()
        tree = write_instances(src, args.files, rows=args.size, columns=args.size)
        print(
            f"wrote {tree.files} files, {tree.bytes / 1e6:.0f} MB in "
            f"{time.monotonic() - t0:.1f} s under {work}"
        )
        key = work / "secret.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        exe = shutil.which("deidfs", path=str(Path(sys.executable).parent)) or "deidfs"
        base = [exe, "anonymize", str(src), "--profile", "Basic", "--key-file", str(key)]
        if not args.fsync:
            base.append("--no-fsync")
        n = args.workers
        batch = ["--batch-size", str(args.batch_size)]
        runs = {
            "single (--workers 1)": ["--workers", "1"],
            f"pool (--workers {n})": ["--workers", str(n)],
            "--cluster local:1": ["--cluster", "local:1", *batch],
            f"--cluster local:{n}": ["--cluster", f"local:{n}", *batch],
        }
        best: dict[str, Timing] = {}
        digests: dict[str, str] = {}
        for round_no in range(args.repeat):
            for name, extra in runs.items():
                out = work / f"out-{round_no}-{len(best)}"
                timing = _run(name, [*base, "--to", str(out), *extra], out)
                if round_no == 0:
                    digests[name] = _tree_digest(out)
                shutil.rmtree(out)
                if name not in best or timing.wall < best[name].wall:
                    best[name] = timing
        if len(set(digests.values())) != 1:
            raise SystemExit("the outputs differ between runs: not the same bytes")
        _table(list(best.values()), tree.files, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _table(timings: list[Timing], files: int, args: argparse.Namespace) -> None:
    single = timings[0]
    local1 = next(t for t in timings if t.name == "--cluster local:1")
    print()
    header = (
        f"{'run':<24}{'wall s':>8}{'start s':>9}{'work s':>8}{'cpu s':>7}{'files/s':>9}"
        f"{'work f/s':>10}{'x single':>10}{'work x':>8}"
    )
    print(header)
    print("-" * len(header))
    for t in timings:
        print(
            f"{t.name:<24}{t.wall:8.2f}{t.startup:9.2f}{t.processing:8.2f}{t.cpu:7.2f}"
            f"{files / t.wall:9.0f}{files / t.processing:10.0f}"
            f"{single.wall / t.wall:10.2f}{single.processing / t.processing:8.2f}"
        )
    overhead = (local1.processing - single.processing) / files * 1000
    cpu_overhead = (local1.cpu - single.cpu) / files * 1000
    print()
    print(
        f"engine overhead per file: {overhead:.2f} ms of work time, {cpu_overhead:.2f} ms of "
        "CPU (local:1 against single: one"
    )
    print(
        "  process rendering and writing either way; CPU includes the scheduler and the "
        "worker process)"
    )
    print(
        f"  {-(-files // args.batch_size)} tasks of up to {args.batch_size} files; "
        + ("files flushed to disk (--fsync)" if args.fsync else "every run --no-fsync")
    )
    print(
        "wall = the whole command; start = the cluster's start-up (LocalCluster and its "
        "workers); work = the"
    )
    print(
        "  command's own figure (first task to last result settled); ratios are throughput "
        "ratios against"
    )
    print(
        f"  the single-process run of this invocation, each row the fastest of {args.repeat} "
        f"run(s); every output tree had the same SHA-256s ({files} files)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
