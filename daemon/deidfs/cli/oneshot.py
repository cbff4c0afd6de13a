"""What ``deidfs anonymize`` and ``deidfs export`` share when they de-identify in this
process: the ``--cluster`` options (:func:`cluster_options`), the key's way to a cluster's
workers (:func:`cluster_key`), the runner of their work (this machine's worker processes
or a Dask cluster, :func:`run_with_runner`) and SIGTERM taken as Ctrl-C while they run
(:func:`sigterm_interrupts`), so that workers are shut down and temporary files removed.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from deidfs.export.cluster import ClusterRunner, connect
from deidfs.export.cluster_config import DEFAULT_BATCH_FILES, ClusterOptions, KeySource, prepare
from deidfs.export.workers import PoolRunner, Runner


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The ``--cluster`` options of ``args`` (``anonymize`` and ``export``), None without."""
    if args.cluster is None:
        return None
    return ClusterOptions(
        args.cluster,
        batch_files=args.batch_size or DEFAULT_BATCH_FILES,
        allow_plain_key=args.allow_plain_key,
        tls_ca_file=args.tls_ca_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def cluster_key(
    options: ClusterOptions | None, key: bytes, key_file: str | None
) -> KeySource | None:
    """How the workers of the cluster ``options`` name get ``key`` (None without a
    cluster): settled before anything is written, so a key that may not travel so stops
    the command first."""
    return prepare(options, key, key_file) if options is not None else None


def run_with_runner(
    options: ClusterOptions | None,
    key: KeySource | None,
    workers: int,
    quiet: bool,
    body: Callable[[Runner], int],
) -> int:
    """``body`` with a runner: this machine's ``workers`` processes, or (``options``) the
    cluster, connected for the time of ``body``."""
    if options is None:
        return body(PoolRunner(workers))
    assert key is not None
    with connect(options) as connection:
        runner = ClusterRunner(
            connection,
            key,
            batch_files=options.batch_files,
            stream=sys.stderr,
            quiet=quiet,
        )
        return body(runner)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, as Ctrl-C does; only when SIGTERM
    has its default action and this is the main thread (a caller's own handler stays)."""
    previous = signal.getsignal(signal.SIGTERM)
    own_handler = (
        previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    )
    if own_handler:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM: stop like Ctrl-C, so workers are shut down and temporary files removed.
    raise KeyboardInterrupt
