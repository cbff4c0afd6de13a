"""Benchmark ``deidfs anonymize`` against ``cp -r`` and dicognito on synthetic CT files.

See ``bench/README.md``. Builds a tree of synthetic CT files, reads it once to warm the page
cache, then runs each tool on it (``--repeat`` rounds, each tool once per round, the fastest
run of each kept), and prints files/s, MB/s and ratios against ``cp -r`` and dicognito, all
measured in this one run on the same tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synth import Tree, build_tree


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: float
    files_out: int


def _count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _warm(root: Path) -> None:
    """Read every file once, as ``cat`` would, so every tool starts from a warm page cache."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass


def _timed(name: str, argv: list[str], out: Path, keep: bool) -> Timing:
    """Run ``argv`` once, writing ``out``; the output is removed afterwards unless ``keep``."""
    subprocess.run(["sync"], check=True)  # earlier runs' dirty pages must not slow this one
    start = time.monotonic()
    proc = subprocess.run(argv, check=False, capture_output=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    timing = Timing(name, seconds, _count_files(out))
    if not keep:
        shutil.rmtree(out)
    return timing


def _deidfs_argv(src: Path, out: Path, key: Path, extra: list[str]) -> list[str]:
    # The console script next to this interpreter, as a user runs it.
    exe = shutil.which("deidfs", path=str(Path(sys.executable).parent)) or "deidfs"
    argv = [exe, "anonymize", str(src), "--profile", "Basic", "--to", str(out)]
    return [*argv, "--key-file", str(key), "--quiet", *extra]


def _runs(
    src: Path, key: Path, dicognito: bool
) -> dict[str, tuple[Callable[[Path], list[str]], str]]:
    """Each tool's name: how to run it into an output directory, and that directory's name."""
    runs: dict[str, tuple[Callable[[Path], list[str]], str]] = {
        "cp -r": (lambda out: ["cp", "-r", str(src), str(out)], "out-cp"),
        "cp -r; sync": (
            lambda out: ["sh", "-c", f"cp -r '{src}' '{out}' && sync"],
            "out-cp-sync",
        ),
        "deidfs anonymize": (lambda out: _deidfs_argv(src, out, key, []), "out-deidfs"),
        "deidfs anonymize --no-fsync": (
            lambda out: _deidfs_argv(src, out, key, ["--no-fsync"]),
            "out-deidfs-nofsync",
        ),
    }
    if dicognito:
        if importlib.util.find_spec("dicognito") is None:
            print("dicognito is not installed (pip install -e '.[bench]'): skipped")
        else:
            # `python -m dicognito`: the console script of dicognito 0.19.0 fails to start.
            argv_d = [sys.executable, "-m", "dicognito", "--quiet", "--seed", "bench"]
            runs["dicognito"] = (
                lambda out: [*argv_d, "--output-directory", str(out), str(src)],
                "out-dicognito",
            )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000, help="number of files (1000)")
    parser.add_argument("--studies", type=int, default=4, help="studies (4)")
    parser.add_argument("--series", type=int, default=2, help="series per study (2)")
    parser.add_argument(
        "--workdir", help="where the tree and outputs go (default: $TMPDIR); same disk for all"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-dicognito", action="store_true", help="skip dicognito")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every tool, the fastest run kept (3)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.monotonic()
        tree = build_tree(src, args.files, args.studies, args.series)
        print(
            f"built {tree.files} files, {tree.bytes / 1e6:.0f} MB in "
            f"{time.monotonic() - t0:.1f} s under {work}"
        )
        key = work / "secret.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        _warm(src)

        runs = _runs(src, key, not args.no_dicognito)
        best: dict[str, Timing] = {}
        for round_no in range(args.repeat):
            last = round_no == args.repeat - 1
            for name, (argv_of, out_name) in runs.items():
                out = work / f"{out_name}-{round_no}"
                timing = _timed(name, argv_of(out), out, keep=args.keep and last)
                if name not in best or timing.seconds < best[name].seconds:
                    best[name] = timing
        _table(list(best.values()), tree, args.repeat)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _table(timings: list[Timing], tree: Tree, repeat: int) -> None:
    by_name = {t.name: t for t in timings}
    cp = by_name["cp -r"]
    dicognito = by_name.get("dicognito")
    print()
    header = f"{'tool':<30}{'seconds':>9}{'files':>7}{'files/s':>9}{'MB/s':>8}"
    header += f"{'x cp -r':>9}{'x dicognito':>13}"
    print(header)
    print("-" * len(header))
    for t in timings:
        vs_cp = cp.seconds / t.seconds
        vs_dicognito = f"{dicognito.seconds / t.seconds:13.2f}" if dicognito else f"{'-':>13}"
        print(
            f"{t.name:<30}{t.seconds:9.2f}{t.files_out:7d}{tree.files / t.seconds:9.0f}"
            f"{tree.bytes / 1e6 / t.seconds:8.0f}{vs_cp:9.2f}{vs_dicognito}"
        )
    print()
    print("ratios are throughput ratios (the other tool's time / this tool's time) on the same")
    print(f"tree of {tree.files} files, {tree.bytes / 1e6:.0f} MB, measured in this one run;")
    print(f"each row is the fastest of {repeat} run(s), the tools taking turns in each round")


if __name__ == "__main__":
    raise SystemExit(main())
