"""Benchmark pixel masks: masked against unmasked views, and compressed redaction per frame.

See ``bench/README.md``. In one run:

1. builds ``--files`` synthetic 512x512 16-bit CT files (0.5 MB of pixel data each);
2. serves every file through ``render`` + ``read_view`` in 128 KiB reads (as FUSE reads),
   without a mask (Basic) and with a CT mask of two rectangles, alternating, ``--rounds``
   times, and prints the best MB/s of each and their ratio;
3. with ``--mount`` (root and /dev/fuse), does the same through a real deidfs mount: two
   folders holding the same files, one bound to Basic, one to the masked profile, each file
   read once per folder and round, alternating;
4. renders pydicom's compressed sample files with and without a mask covering a tenth of the
   image and prints the redaction time per frame (decode, zero, RLE encode).
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
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from deidfs.deid.plan import Plan, compile_plan
from deidfs.deid.profiles import BASIC, Mask, Profile, Rect
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.view.render import SourceStat, read_view, render, render_path
from synth import write_minimal_ct

READ = 128 * 1024
MASK = Mask(rects=(Rect(0, 0, 512, 40), Rect(350, 470, 162, 42)), modality="CT")
MASKED = Profile("Masked", base="Basic", apply_masks=True, masks=(MASK,))
MASKED_TOML = """
[profiles.Masked]
base = "Basic"
apply_masks = true

[[profiles.Masked.masks]]
modality = "CT"
rects = [[0, 0, 512, 40], [350, 470, 162, 42]]
"""
COMPRESSED = (
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "693_J2KI.dcm",
    "examples_jpeg2k.dcm",
    "examples_ybr_color.dcm",
)


def serve_all(files: list[Path], plan: Plan, pseudo: Pseudonymizer, fast: bool = True) -> int:
    """Render and read every file as a FUSE reader would; returns bytes served."""
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            with open(fd, "rb", closefd=False) as f:
                view = render(f, SourceStat.of(os.fstat(fd)), plan, pseudo, fast=fast)
            at = 0
            while at < view.size:
                at += len(read_view(view, fd, at, READ))
        finally:
            os.close(fd)
        total += view.size
    return total


def read_tree(root: Path) -> int:
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            while chunk := f.read(READ):
                total += len(chunk)
    return total


def best_rates(runs: dict[str, Callable[[], int]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best MB/s of each run over ``rounds`` alternating rounds; (MB/s, seconds)."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            size = run()
            dt = time.perf_counter() - t0
            rate = size / dt / 1e6
            if name not in best or rate > best[name][0]:
                best[name] = (rate, dt)
    return best


def print_pair(title: str, best: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}")
    for name, (rate, dt) in best.items():
        print(f"  {name:10s} {rate:8.1f} MB/s  ({dt:.2f} s)")
    ratio = best["masked"][0] / best["unmasked"][0]
    print(f"  masked / unmasked throughput: {ratio:.2f}x")


def bench_mount(work: Path, files: list[Path], rounds: int) -> None:
    basic_dir, masked_dir = work / "basic", work / "masked"
    for d in (basic_dir, masked_dir):
        d.mkdir()
        for f in files:
            os.link(f, d / f.name)
    mnt, state = work / "mnt", work / "state"
    config = work / "deidfs.toml"
    config.write_text(
        f'[daemon]\nmountpoint = "{mnt}"\nstate_dir = "{state}"\nexport_dir = "{work}/export"\n'
        f'control_socket = "{state}/control.sock"\nmetrics_address = ""\n'
        "settle_seconds = 0.2\n\n"
        f'[folders.basic]\npath = "{basic_dir}"\nprofile = "Basic"\n\n'
        f'[folders.masked]\npath = "{masked_dir}"\nprofile = "Masked"\n' + MASKED_TOML
    )
    best: dict[str, tuple[float, float]] = {}
    for n in range(rounds):
        # A new daemon (and mount) per round: every read is a first read of its view, with
        # nothing in the kernel's page cache of the mount or in the daemon's header cache.
        log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed after the daemon stops
        proc = subprocess.Popen(
            [sys.executable, "-m", "deidfs", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            if not _wait_served(proc, mnt, len(files)):
                print("\nmount: daemon did not serve every file; see", work / "daemon.log")
                return
            order = ["unmasked", "masked"] if n % 2 == 0 else ["masked", "unmasked"]
            for name in order:
                folder = mnt / ("basic" if name == "unmasked" else "masked")
                t0 = time.perf_counter()
                size = read_tree(folder)
                dt = time.perf_counter() - t0
                rate = size / dt / 1e6
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, dt)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    best = {k: best[k] for k in ("unmasked", "masked")}
    print_pair(f"through the mount, first reads ({len(files)} files, best of {rounds})", best)


def _wait_served(proc: subprocess.Popen[bytes], mnt: Path, want: int) -> bool:
    deadline = time.monotonic() + 120
    while True:
        counts = [
            sum(1 for _ in (mnt / f).rglob("*.dcm")) if (mnt / f).is_dir() else 0
            for f in ("basic", "masked")
        ]
        if counts == [want, want]:
            return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def bench_compressed(pseudo: Pseudonymizer, repeat: int) -> None:
    from pydicom import dcmread

    print("\ncompressed sources: redaction time per frame (render with mask - without)")
    print(f"  {'file':32s} {'syntax':28s} {'frames':>6s} {'size':>9s} {'ms/frame':>9s}")
    for name in COMPRESSED:
        path = Path(str(get_testdata_file(name)))
        ds = dcmread(path, stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        mask = Mask(rects=(Rect(0, 0, cols, max(1, rows // 10)),))
        masked = compile_plan(Profile("M", apply_masks=True, masks=(mask,)))
        plain = compile_plan(Profile("P"))
        times = {}
        for label, plan in (("plain", plain), ("masked", masked)):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                render_path(path, plan, pseudo)
                best = min(best, time.perf_counter() - t0)
            times[label] = best
        per_frame = (times["masked"] - times["plain"]) / frames * 1000
        ts = ds.file_meta.TransferSyntaxUID.name[:28]
        print(f"  {name:32s} {ts:28s} {frames:6d} {rows}x{cols:<5d} {per_frame:9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--mount", action="store_true", help="also through a real mount (root)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="deidfs-bench-pixels-", dir=args.workdir))
    try:
        src = work / "src"
        src.mkdir()
        rng = np.random.default_rng(7)
        files = []
        for n in range(args.files):
            path = src / f"ct{n:05d}.dcm"
            write_minimal_ct(path, rng, n)
            files.append(path)
        read_tree(src)  # warm the page cache
        pseudo = Pseudonymizer(bytes(range(32)))
        basic, masked = compile_plan(BASIC), compile_plan(MASKED)
        best = best_rates(
            {
                "unmasked": lambda: serve_all(files, basic, pseudo),
                "masked": lambda: serve_all(files, masked, pseudo),
            },
            args.rounds,
        )
        size = sum(p.stat().st_size for p in files) / len(files) / 1e6
        print_pair(
            f"render + read_view ({len(files)} CT files of {size:.2f} MB, best of {args.rounds})",
            best,
        )
        # The same on the reference path (pydicom parse, engine, encoder) for both: what the
        # patching itself costs, apart from the fast path (which declines pixel rules).
        best = best_rates(
            {
                "unmasked": lambda: serve_all(files, basic, pseudo, fast=False),
                "masked": lambda: serve_all(files, masked, pseudo, fast=False),
            },
            args.rounds,
        )
        print_pair(f"render(fast=False) + read_view (best of {args.rounds})", best)
        if args.mount:
            bench_mount(work, files, args.rounds)
        bench_compressed(pseudo, repeat=3)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
