"""Benchmark ``deidfs export`` against ``cp -r`` of the same tree, and 2 workers against 1.

See ``bench/README.md``. Builds the synthetic CT tree of ``synth.py`` (1,000 files
of 0.5 MB by default), configures it as a folder, reads it once to warm the page cache, then
runs in this one invocation: ``cp -r``; ``deidfs export`` with 1 and 2 workers, fsync on (the
default) and off; a re-run that finds everything in place; and the export of indexed files as
the daemon runs it (in its process, with the headers its indexing rendered). Prints seconds,
MB/s, throughput ratios against ``cp -r`` and the speedup of 2 workers over 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_anonymize import Timing, _count_files, _warm
from deidfs.config.load import load_config
from deidfs.deid.plan import compile_plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.export.folder import export_folder
from deidfs.export.selection import walk_sources
from deidfs.secret import read_key_file
from deidfs.view.render import SourceStat, View, render_path
from synth import Tree, build_tree

CONFIG = """\
[daemon]
mountpoint = "{work}/mnt"
state_dir = "{work}/state"
export_dir = "{work}/export"
control_socket = "{work}/state/control.sock"
metrics_address = ""

[folders.ct]
path = "{src}"
profile = "Basic"
"""


def _export_argv(config: Path, out: Path, extra: list[str]) -> list[str]:
    # The console script next to this interpreter, as a user runs it.
    exe = shutil.which("deidfs", path=str(Path(sys.executable).parent)) or "deidfs"
    return [exe, "--config", str(config), "export", "ct", "--to", str(out), "--quiet", *extra]


def _best(name: str, repeat: int, once: Callable[[int], tuple[float, int]]) -> Timing:
    """The fastest of ``repeat`` runs (each into a new output): other work on the machine
    only ever slows a run down."""
    runs = []
    for i in range(repeat):
        subprocess.run(["sync"], check=True)  # earlier runs' dirty pages must not slow this one
        runs.append(once(i))
    seconds, files = min(runs)
    return Timing(name, seconds, files)


def _command(
    argv_of: Callable[[Path], list[str]], out_of: Callable[[int], Path]
) -> Callable[[int], tuple[float, int]]:
    def once(i: int) -> tuple[float, int]:
        out = out_of(i)
        argv = argv_of(out)
        start = time.monotonic()
        proc = subprocess.run(argv, check=False, capture_output=True)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
            raise SystemExit(f"{argv[0]} failed with exit code {proc.returncode}")
        return seconds, _count_files(out)

    return once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000, help="number of files (1000)")
    parser.add_argument("--studies", type=int, default=4, help="studies (4)")
    parser.add_argument("--series", type=int, default=2, help="series per study (2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, the best kept (1)")
    parser.add_argument(
        "--workdir", help="where the tree and outputs go (default: $TMPDIR); same disk for all"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-export-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.monotonic()
        tree = build_tree(src, args.files, args.studies, args.series)
        print(
            f"built {tree.files} files, {tree.bytes / 1e6:.0f} MB in "
            f"{time.monotonic() - t0:.1f} s under {work}"
        )
        state = work / "state"
        state.mkdir(mode=0o700)
        key = state / "secret.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        config = work / "deidfs.toml"
        config.write_text(CONFIG.format(work=work, src=src))
        _warm(src)
        n = args.repeat

        def fresh(name: str) -> Callable[[int], Path]:
            return lambda i: work / f"{name}-{i}"

        timings = [
            _best(
                "cp -r",
                n,
                _command(lambda out: ["cp", "-r", str(src), str(out)], fresh("cp")),
            ),
            _best(
                "cp -r; sync",
                n,
                _command(
                    lambda out: ["sh", "-c", f"cp -r '{src}' '{out}' && sync"], fresh("cp-sync")
                ),
            ),
        ]
        runs = [
            ("deidfs export --workers 1", "w1", ["--workers", "1"]),
            ("deidfs export --workers 2", "w2", ["--workers", "2"]),
            ("... --workers 1 --no-fsync", "w1-nofsync", ["--workers", "1", "--no-fsync"]),
            ("... --workers 2 --no-fsync", "w2-nofsync", ["--workers", "2", "--no-fsync"]),
        ]
        for name, dirname, extra in runs:
            timings.append(
                _best(
                    name,
                    n,
                    _command(
                        lambda out, extra=extra: _export_argv(config, out, extra), fresh(dirname)
                    ),
                )
            )
        timings.append(
            _best(
                "re-run, nothing new (2)",
                n,
                _command(
                    lambda out: _export_argv(config, out, ["--workers", "2"]),
                    lambda i: work / "w2-0",
                ),
            )
        )
        timings += _indexed(config, work, key, n)
        _table(timings, tree)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _indexed(config_path: Path, work: Path, key: Path, repeat: int) -> list[Timing]:
    """Exports of indexed files as the daemon runs them: in its process, with the headers
    its indexing rendered (its header cache) instead of rendering them again."""
    config = load_config(config_path)
    folder = config.folders["ct"]
    plan = compile_plan(config.profiles[folder.profile])
    pseudo = Pseudonymizer(read_key_file(key))
    cache: dict[tuple[str, SourceStat], View] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, rel in walk_sources(str(folder.path))[0]:  # what indexing does
            view = render_path(path, plan, pseudo, folder.layout, PurePosixPath(rel))
            cache[(path, view.source)] = view
    timings = []
    for name, dirname, durable in (
        ("indexed, in the daemon", "indexed", True),
        ("indexed, in the daemon, no fsync", "indexed-nofsync", False),
    ):

        def once(i: int, dirname: str = dirname, durable: bool = durable) -> tuple[float, int]:
            start = time.monotonic()
            summary = export_folder(
                config,
                "ct",
                pseudo,
                to=work / f"{dirname}-{i}",
                durable=durable,
                cached=lambda path, state: cache.get((path, state)),
            )
            return time.monotonic() - start, summary.files

        timings.append(_best(name, repeat, once))
    return timings


def _table(timings: list[Timing], tree: Tree) -> None:
    by_name = {t.name: t for t in timings}
    cp = by_name["cp -r"]
    print()
    header = f"{'run':<34}{'seconds':>9}{'files':>7}{'files/s':>9}{'MB/s':>8}{'x cp -r':>9}"
    print(header)
    print("-" * len(header))
    for t in timings:
        print(
            f"{t.name:<34}{t.seconds:9.2f}{t.files_out:7d}{tree.files / t.seconds:9.0f}"
            f"{tree.bytes / 1e6 / t.seconds:8.0f}{cp.seconds / t.seconds:9.2f}"
        )
    print()
    pairs = (
        ("deidfs export --workers 1", "deidfs export --workers 2", "fsync"),
        ("... --workers 1 --no-fsync", "... --workers 2 --no-fsync", "no fsync"),
    )
    for one, two, what in pairs:
        speedup = by_name[one].seconds / by_name[two].seconds
        print(f"speedup of --workers 2 over --workers 1 ({what}): {speedup:.2f}x")
    print(f"CPUs here: {os.cpu_count()}")
    print("ratios are throughput ratios (cp -r's time / this run's time) on the same tree of")
    print(f"{tree.files} files, {tree.bytes / 1e6:.0f} MB, measured in this one run; files")
    print("counts the files in the output tree (the manifest excluded)")


if __name__ == "__main__":
    raise SystemExit(main())
