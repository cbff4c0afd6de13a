"""The long reliability profile: load on a real mount, then a fuzz campaign.

The same code as the CI tests (``tests/test_reliability.py``, ``tests/test_fuzz.py``) with
long parameters; see bench/README.md. Needs root and /dev/fuse, like the mount tests.

    .venv/bin/python bench/soak.py                      # 16 readers, 2,000 files, 10 min
    .venv/bin/python bench/soak.py --duration 60 --fuzz-seconds 60   # a quicker look
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> int:
    sys.path.insert(0, str(TESTS))
    from conftest import Daemon  # the tests' daemon harness
    from test_fuzz import FuzzWorker, campaign
    from test_reliability import LoadSettings, check_load, run_load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readers", type=int, default=16, help="concurrent readers (default 16)")
    p.add_argument("--files", type=int, default=2000, help="files in the folder (default 2000)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument(
        "--change-interval",
        type=float,
        default=0.05,
        help="seconds between two changes of the folder (default 0.05)",
    )
    p.add_argument(
        "--in-place",
        type=float,
        default=0.2,
        help="share of replacements rewritten in place (default 0.2)",
    )
    p.add_argument(
        "--fuzz-seconds", type=float, default=300.0, help="seconds of fuzzing (default 300)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of changes and mutations")
    p.add_argument("--workdir", help="parent of the work directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="deidfs-soak-", dir=args.workdir))
    failed = False
    try:
        if args.duration > 0:
            settings = LoadSettings(
                readers=args.readers,
                files=args.files,
                duration=args.duration,
                change_interval=args.change_interval,
                in_place=args.in_place,
                seed=args.seed,
                converge_timeout=120.0,
            )
            d = Daemon(root=work / "daemon")
            print(f"load: {args.readers} readers, {args.files} files, {args.duration:.0f} s ...")
            started = time.monotonic()
            try:
                result = run_load(d, settings, work / "load")
            finally:
                d.cleanup()
            print(f"load run took {time.monotonic() - started:.0f} s in all")
            for line in result.lines():
                print(f"  {line}")
            for example in result.wrong_examples:
                print(f"  wrong: {example}")
            for line in result.daemon_errors[:20]:
                print(f"  daemon error: {line}")
            try:
                check_load(result)
                print("load: PASS")
            except AssertionError as exc:
                failed = True
                print(f"load: FAIL {exc}")
        if args.fuzz_seconds > 0:
            print(f"fuzz: {args.fuzz_seconds:.0f} s ...")
            worker = FuzzWorker()
            try:
                stats = campaign(worker, args.fuzz_seconds, seed=args.seed)
            finally:
                worker.close()
            for line in stats.lines():
                print(f"  {line}")
            print(f"  worker restarts (hangs, crashes): {worker.restarts}")
            for finding in stats.findings[:20]:
                print(f"  finding: {finding}")
            if stats.findings:
                failed = True
            print(f"fuzz: {'FAIL' if stats.findings else 'PASS'}")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
