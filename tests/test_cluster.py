"""``--cluster``: ``deidfs anonymize`` and ``deidfs export`` on real Dask clusters.

Every run is the command in its own process against a real cluster: a LocalCluster of two
worker processes started by this module (its scheduler inspected for names), the command's
own ``local:2``, a scheduler and workers started as ``dask scheduler``/``dask worker``
processes (killed mid-run), and one over TLS with certificates made here. The reference is
the same command without ``--cluster`` in one process: every output file must have the same
SHA-256, and the counts must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conftest import sample_file
from deidfs import __version__
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError
from deidfs.export.cluster_config import (
    ClusterOptions,
    KeyFile,
    KeyInTask,
    key_source,
    parse_address,
)
from deidfs.export.cluster_tasks import Batch, Work, WorkerRefused, partition, run_batch_task
from deidfs.export.files import is_temp_name
from deidfs.export.workers import Job
from deidfs.view.render import Layout

distributed = pytest.importorskip("distributed")

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REPO = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).with_name("dask_preload.py")
UID_ROOT = "1.2.826.0.1.3680043.8.498.4711"
#: (directory, PatientID, PatientName): values the suite's closing log scan looks for too.
PATIENTS = (
    ("needle-dir-alpha", "QZXLOG18001", "QZXLOG18011^Alpha"),
    ("needle-dir-beta", "QZXLOG18002", "QZXLOG18012^Beta"),
    ("needle-dir-gamma", "QZXLOG18003", "QZXLOG18013^Gamma"),
)
SERIES = 2
INSTANCES = 3
#: What no task name, scheduler record or log line may hold.
NEEDLES = re.compile(rf"(?i)needle|qzxlog|{re.escape(UID_ROOT)}|{KEY.hex()}")
SUMMARY_ROW = re.compile(r"^  (\w+)\s+(\d+)(?:\s{3}(.*))?$")


# -- sources and references ---------------------------------------------------------------------
def make_sources(root: Path) -> None:
    """18 CT files in 6 series directories, a file that is not DICOM, a truncated one, a
    dotfile, and a second source of one view name (another view) in a later directory."""
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    for p, (directory, patient_id, name) in enumerate(PATIENTS):
        for s in range(SERIES):
            for i in range(INSTANCES):
                ds = base.copy()
                ds.PatientID = patient_id
                ds.PatientName = name
                ds.StudyInstanceUID = f"{UID_ROOT}.{p}"
                ds.SeriesInstanceUID = f"{UID_ROOT}.{p}.{s}"
                ds.SOPInstanceUID = f"{UID_ROOT}.{p}.{s}.{i}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = root / directory / f"series-{s}" / f"needle-file-{i}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path)
    first = root / "needle-dir-alpha" / "series-0" / "needle-file-0.dcm"
    (root / "needle-dir-alpha" / "needle-notes.txt").write_text("not a DICOM file\n")
    data = first.read_bytes()
    (root / "needle-dir-beta" / "needle-truncated.dcm").write_bytes(data[:1000])
    (root / "needle-dir-beta" / ".needle-hidden.dcm").write_bytes(data)
    # The same SOP Instance UID with another value the profile keeps: another view under
    # the same name, and the first source by path wins it.
    copy = pydicom.dcmread(first)
    copy.KVP = "99"
    (root / "needle-dir-zeta").mkdir()
    copy.save_as(root / "needle-dir-zeta" / "needle-file-0.dcm")


def tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (dotfiles included), by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def counts(stdout: str) -> dict[str, int]:
    """The summary's rows (written, unchanged, refused, ...), and each refusal reason."""
    found: dict[str, int] = {}
    for line in stdout.splitlines():
        m = SUMMARY_ROW.match(line)
        if m is None:
            continue
        found[m.group(1)] = int(m.group(2))
        if m.group(1) == "refused" and m.group(3):
            for part in m.group(3).split(", "):
                reason, n = part.rsplit(" ", 1)
                found[f"refused:{reason}"] = int(n)
    return found


def same_files_counted(cluster: dict[str, int], single: dict[str, int]) -> None:
    """Every file counts once: what the single run wrote is written or found unchanged."""
    assert cluster["written"] + cluster["unchanged"] == single["written"] + single["unchanged"]
    for row in ("refused", "failed", "duplicate", "skipped"):
        assert cluster[row] == single[row], row
    assert {k: v for k, v in cluster.items() if k.startswith("refused:")} == {
        k: v for k, v in single.items() if k.startswith("refused:")
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    make_sources(root / "src")
    key = root / "secret.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    return root


@pytest.fixture(scope="module")
def user_state(base: Path) -> dict[str, str]:
    """The environment of a run whose key is the per-user one (no --key-file): KEY."""
    state = base / "user-state"
    (state / "deidfs").mkdir(parents=True, mode=0o700)
    shutil.copy(base / "secret.key", state / "deidfs" / "secret.key")
    (state / "deidfs" / "secret.key").chmod(0o600)
    return {"XDG_STATE_HOME": str(state)}


@pytest.fixture(scope="module")
def reference(base: Path) -> tuple[dict[str, str], dict[str, int]]:
    """The single-process ``deidfs anonymize`` of the sources: its tree and its counts."""
    out = base / "reference"
    done = deidfs(base, "reference", *anonymize_argv(base, out), "--workers", "1")
    assert done.returncode == 0, done.stderr
    found = counts(done.stdout)
    assert found["written"] == len(PATIENTS) * SERIES * INSTANCES
    assert found["refused:not_dicom"] == 1
    assert found["refused:truncated"] == 1
    assert found["duplicate"] == 1
    assert found["skipped"] == 1
    return tree(out), found


def anonymize_argv(base: Path, out: Path, *, key: bool = True) -> list[str]:
    argv = ["anonymize", str(base / "src"), "--profile", "Basic", "--to", str(out)]
    return [*argv, "--key-file", str(base / "secret.key")] if key else argv


def deidfs(
    base: Path,
    name: str,
    *argv: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``deidfs ARGV`` in its own process, with no system configuration; its stderr is kept
    as ``<name>.stderr.log`` (the suite scans those for leak markers at its end)."""
    code = (
        "import sys; from pathlib import Path; import deidfs.cli.common as c;"
        f"c.DEFAULT_CONFIG_PATH = Path({str(base / 'none.toml')!r});"
        "from deidfs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    run_env = {k: v for k, v in os.environ.items() if k not in ("DEIDFS_CONFIG", "DEIDFS_KEY_FILE")}
    run_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=timeout,
        check=False,
    )
    (base / f"{name}.stderr.log").write_text(done.stderr)
    return done


def assert_no_needle(text: str, where: str) -> None:
    found = NEEDLES.findall(text)
    assert found == [], f"{where}: {found[:5]}"


@pytest.fixture(scope="module", autouse=True)
def _no_dask_thread_outlives_the_module() -> Iterator[None]:
    """distributed keeps one thread of its own (its offload executor) once a cluster ran in
    this process. Later tests fork export workers, which deidfs does only while the process
    has no other thread (else through a fork server): end it with this module."""
    yield
    offload = getattr(distributed.utils, "_offload_executor", None)
    if offload is not None:
        offload.shutdown(wait=True)
    left = [t.name for t in threading.enumerate() if t.name.startswith("Dask")]
    assert left == [], left


# -- a LocalCluster of this module, with fault injection ----------------------------------------
@pytest.fixture(scope="module")
def faults(base: Path) -> Path:
    path = base / "faults"
    path.mkdir()
    return path


#: A LocalCluster in a process of its own (distributed's threads would outlive it in this
#: one, and later tests fork worker pools only from a process without other threads). It
#: prints its scheduler's address and runs until its standard input closes.
LOCAL_CLUSTER = """
import json, logging, sys
import distributed
cluster = distributed.LocalCluster(
    n_workers=2,
    threads_per_worker=1,
    processes=True,
    host="127.0.0.1",
    dashboard_address=None,
    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    silence_logs=logging.ERROR,
    preload=[sys.argv[1]],
    env=json.loads(sys.argv[2]),  # also that of a worker the nanny starts again after a kill
)
print(cluster.scheduler_address, flush=True)
sys.stdin.read()
cluster.close()
"""

#: What a scheduler keeps of its tasks, read by a client in a process of its own: prefixes
#: (the dashboard's labels), the keys of its transition log (the task stream's names), the
#: logs it and its workers hold, its events. With "wait": first wait for two workers.
INSPECT = """
import json, sys
import distributed

def records(dask_scheduler):
    return {
        "prefixes": sorted(dask_scheduler.task_prefixes),
        "keys": [str(entry[0]) for entry in list(dask_scheduler.transition_log)],
    }

with distributed.Client(sys.argv[1], set_as_default=False, timeout=30) as client:
    if sys.argv[2:] == ["wait"]:
        client.wait_for_workers(2, timeout=30)
    found = client.run_on_scheduler(records)
    logs = [m for _, m in client.get_scheduler_logs(n=10000)]
    for worker_logs in client.get_worker_logs(n=10000).values():
        logs.extend(m for _, m in worker_logs)
    logs.extend(repr(e) for topic in client.get_events().values() for e in topic)
    found["text"] = "\\n".join(logs)
print(json.dumps(found))
"""


@dataclass
class LocalClusterProcess:
    """The address of the module's LocalCluster, and a look at its scheduler."""

    address: str

    def records(self, *, wait: bool = False) -> dict[str, Any]:
        argv = [sys.executable, "-c", INSPECT, self.address, *(["wait"] if wait else [])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=True)
        found: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return found

    def wait_for_workers(self) -> None:
        self.records(wait=True)


@pytest.fixture(scope="module")
def cluster(faults: Path) -> Iterator[LocalClusterProcess]:
    """Two worker processes (one thread each) with the fault preload; scheduler on loopback."""
    env = {
        "DEIDFS_TEST_FAULTS": str(faults),
        "PYTHONPATH": os.pathsep.join([str(REPO / "daemon"), str(REPO / "tests")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCAL_CLUSTER, str(PRELOAD), json.dumps(env)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        yield LocalClusterProcess(address)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- the tests ----------------------------------------------------------------------------------
def test_output_is_the_single_process_tree_and_nothing_names_a_source(
    base: Path, cluster: LocalClusterProcess, reference: tuple[dict[str, str], dict[str, int]]
) -> None:
    out = base / "out-plain"
    argv = [*anonymize_argv(base, out), "--cluster", cluster.address]
    done = deidfs(base, "plain", *argv, "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert tree(out) == reference[0]
    same_files_counted(counts(done.stdout), reference[1])
    assert counts(done.stdout)["written"] == reference[1]["written"]
    assert "key read by each worker" in done.stderr
    assert re.search(r"deidfs: (\d+)/\1 batches done", done.stderr)
    assert_no_needle(done.stdout + done.stderr, "the command's output")
    found = cluster.records()
    prefixes, keys, text = set(found["prefixes"]), found["keys"], found["text"]
    assert "deidfs-batch" in prefixes
    assert all(p.startswith("deidfs-") for p in prefixes), prefixes
    assert len([k for k in keys if k.startswith("deidfs-batch-")]) >= 10
    assert_no_needle("\n".join(sorted(prefixes)), "task prefixes")
    assert_no_needle("\n".join(keys), "task keys")
    assert_no_needle(text, "scheduler and worker logs")
    # Run again: everything is in place already.
    again = deidfs(base, "plain-again", *argv)
    assert again.returncode == 0, again.stderr
    assert counts(again.stdout)["unchanged"] == reference[1]["written"]
    assert tree(out) == reference[0]


@pytest.mark.parametrize(
    ("moment", "when"),
    [
        ("kill-worker-mid-batch", ""),
        ("kill-worker-after-batch", ""),
        # The batch left a view in a temporary file (two sources of one view): the killed
        # run's temporary file is removed, the second run's settled.
        ("kill-worker-after-batch", "pending"),
        # A batch's results lost with their worker before the command fetched them.
        ("kill-worker-on-fetch", ""),
    ],
)
def test_a_worker_killed_during_the_run_changes_nothing(
    base: Path,
    cluster: LocalClusterProcess,
    faults: Path,
    reference: tuple[dict[str, str], dict[str, int]],
    moment: str,
    when: str,
) -> None:
    cluster.wait_for_workers()
    out = base / f"out-{moment}-{when}"
    (faults / moment).write_text(f"{when}\n")
    argv = [*anonymize_argv(base, out), "--cluster", cluster.address]
    done = deidfs(base, f"{moment}-{when}", *argv, "--batch-size", "4")
    assert (faults / f"{moment}.taken").exists(), "no worker was killed"
    (faults / f"{moment}.taken").unlink()
    assert done.returncode == 0, done.stderr
    assert tree(out) == reference[0]  # no partial file, no temporary file left
    found = counts(done.stdout)
    same_files_counted(found, reference[1])
    if moment == "kill-worker-after-batch":
        # The killed batch's files were in place: its second run found them unchanged.
        assert found["unchanged"] > 0
    assert_no_needle(done.stdout + done.stderr, "the command's output")
    cluster.wait_for_workers()  # the nanny started the killed one again


def test_plain_tcp_with_the_key_in_the_task_is_refused_unless_allowed(
    base: Path,
    cluster: LocalClusterProcess,
    user_state: dict[str, str],
    reference: tuple[dict[str, str], dict[str, int]],
) -> None:
    out = base / "out-tcp-key"
    argv = [*anonymize_argv(base, out, key=False), "--cluster", cluster.address]
    refused = deidfs(base, "tcp-key-refused", *argv, env=user_state)
    assert refused.returncode == 78
    assert "plain tcp://" in refused.stderr
    assert "--allow-plain-key" in refused.stderr
    assert not out.exists()  # refused before anything was written
    allowed = deidfs(base, "tcp-key-allowed", *argv, "--allow-plain-key", env=user_state)
    assert allowed.returncode == 0, allowed.stderr
    assert "key sent in the tasks" in allowed.stderr
    assert tree(out) == reference[0]
    assert_no_needle(allowed.stdout + allowed.stderr, "the command's output")


def test_local_cluster_of_the_command(
    base: Path, user_state: dict[str, str], reference: tuple[dict[str, str], dict[str, int]]
) -> None:
    """``local:2``: the command starts and stops its own cluster; the key goes in the task."""
    out = base / "out-local"
    argv = [*anonymize_argv(base, out, key=False), "--cluster", "local:2", "--batch-size", "4"]
    done = deidfs(base, "local", *argv, env=user_state)
    assert done.returncode == 0, done.stderr
    assert "key sent in the tasks" in done.stderr
    assert tree(out) == reference[0]
    same_files_counted(counts(done.stdout), reference[1])
    assert_no_needle(done.stdout + done.stderr, "the command's output")


def test_export_on_the_cluster_writes_the_export_of_one_process(
    base: Path, cluster: LocalClusterProcess, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(base / "secret.key", state / "secret.key")
    (state / "secret.key").chmod(0o600)
    config = tmp_path / "deidfs.toml"
    config.write_text(
        f"""\
[daemon]
mountpoint = "{tmp_path / "mnt"}"
state_dir = "{state}"
export_dir = "{tmp_path / "export"}"
control_socket = "{tmp_path / "control.sock"}"
metrics_address = ""

[folders.ct]
path = "{base / "src"}"
profile = "Basic"
"""
    )
    single = deidfs(
        base, "export-single", "export", "ct", "--config", str(config), "--to", str(tmp_path / "a")
    )
    assert single.returncode == 0, single.stderr
    argv = ["export", "ct", "--config", str(config), "--cluster", cluster.address]
    on_cluster = deidfs(
        base,
        "export-cluster",
        *argv,
        "--to",
        str(tmp_path / "b"),
        "--key-file",
        str(base / "secret.key"),
        "--batch-size",
        "3",
    )
    assert on_cluster.returncode == 0, on_cluster.stderr
    a, b = tmp_path / "a" / "ct", tmp_path / "b" / "ct"

    def files(root: Path) -> dict[str, str]:
        return {k: v for k, v in tree(root).items() if not k.startswith(".deidfs-manifest-")}

    def manifest(root: Path) -> list[dict[str, Any]]:
        (path,) = root.glob(".deidfs-manifest-*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for field in ("time", "started", "finished"):
                row.pop(field, None)
        return rows

    assert files(a) == files(b)
    assert len(files(a)) == len(PATIENTS) * SERIES * INSTANCES
    assert manifest(a) == manifest(b)
    same_files_counted(counts(on_cluster.stdout), counts(single.stdout))
    assert_no_needle(on_cluster.stderr, "the command's stderr")
    # A selection scans on the cluster too: one patient, by its original ID.
    patient_id = PATIENTS[1][1]
    chosen = deidfs(
        base,
        "export-selection",
        *argv,
        "--to",
        str(tmp_path / "c"),
        "--key-file",
        str(base / "secret.key"),
        "--patient",
        patient_id,
    )
    assert chosen.returncode == 0, chosen.stderr
    assert "scanning" in chosen.stderr
    assert len(files(tmp_path / "c" / "ct")) == SERIES * INSTANCES
    # A key file that is not the configuration's key is refused before anything is done.
    other = tmp_path / "other.key"
    other.write_text(OTHER_KEY.hex() + "\n")
    other.chmod(0o600)
    wrong = deidfs(
        base, "export-wrong-key", *argv, "--to", str(tmp_path / "d"), "--key-file", str(other)
    )
    assert wrong.returncode == 78
    assert not (tmp_path / "d").exists()


# -- a scheduler and workers of their own: lost scheduler, TLS -----------------------------------
class DaskProcesses:
    """``dask scheduler`` and ``dask worker`` processes (killed at the end, whatever)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def start(self, *, tls: list[str] | None = None, faults: Path | None = None) -> DaskProcesses:
        tls = tls or []
        scheduler_file = self.root / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "daemon"), str(REPO / "tests")])
        if faults is not None:
            env["DEIDFS_TEST_FAULTS"] = str(faults)
        protocol = ["--protocol", "tls"] if tls else []
        scheduler = self._spawn(
            "scheduler",
            ["--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
            ["--scheduler-file", str(scheduler_file), *protocol, *tls],
            env,
        )
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            assert scheduler.poll() is None, "the scheduler exited"
            time.sleep(0.05)
        time.sleep(0.05)  # written at once, but let it be complete
        self.address = json.loads(scheduler_file.read_text())["address"]
        self._spawn(
            "worker",
            [self.address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
            ["--death-timeout", "10", "--preload", str(PRELOAD), *tls],
            env,
        )
        return self

    def _spawn(
        self, what: str, argv: list[str], more: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        with (self.root / f"dask-{what}.stderr.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"distributed.cli.dask_{what}", *argv, *more],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    @property
    def scheduler_pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.clear()


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    processes = DaskProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.stop()


def test_a_lost_scheduler_exits_75_and_a_second_run_completes(
    base: Path,
    dask_processes: DaskProcesses,
    tmp_path: Path,
    reference: tuple[dict[str, str], dict[str, int]],
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    dask_processes.start(faults=faults)
    (faults / "kill-scheduler").write_text(str(dask_processes.scheduler_pid))
    out = base / "out-lost"
    argv = [*anonymize_argv(base, out), "--cluster", dask_processes.address, "--batch-size", "3"]
    lost = deidfs(base, "lost", *argv, timeout=90)
    assert (faults / "kill-scheduler.taken").exists(), "the scheduler was not killed"
    assert lost.returncode == 75, lost.stderr
    assert "lost the connection to the cluster's scheduler" in lost.stderr
    assert "run the same command again" in lost.stderr
    assert_no_needle(lost.stdout + lost.stderr, "the command's output")
    dask_processes.stop()  # its workers too: nothing writes any more
    for rel in tree(out):  # what is in place is complete
        name = rel.rsplit("/", 1)[-1]
        assert is_temp_name(name) or tree(out)[rel] == reference[0][rel]
    dask_processes.start()
    again = deidfs(
        base, "lost-again", *anonymize_argv(base, out), "--cluster", dask_processes.address
    )
    assert again.returncode == 0, again.stderr
    assert tree(out) == reference[0]
    same_files_counted(counts(again.stdout), reference[1])


def _make_certificates(root: Path) -> dict[str, Path]:
    """A CA and one certificate it signs for 127.0.0.1 (scheduler, workers and client)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=root)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=deidfs test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (root / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "node.pem",
    )
    return {"ca": root / "ca.pem", "cert": root / "node.pem", "key": root / "node.key"}


def test_tls_carries_the_key_in_the_task(
    base: Path,
    dask_processes: DaskProcesses,
    tmp_path: Path,
    user_state: dict[str, str],
    reference: tuple[dict[str, str], dict[str, int]],
) -> None:
    certs = _make_certificates(tmp_path)
    tls = [
        "--tls-ca-file",
        str(certs["ca"]),
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    ]
    dask_processes.start(tls=tls)
    assert dask_processes.address.startswith("tls://")
    out = base / "out-tls"
    argv = [*anonymize_argv(base, out, key=False), "--cluster", dask_processes.address, *tls]
    done = deidfs(base, "tls", *argv, env=user_state)
    assert done.returncode == 0, done.stderr
    assert "key sent in the tasks" in done.stderr
    assert tree(out) == reference[0]
    same_files_counted(counts(done.stdout), reference[1])
    # Without certificates a tls:// scheduler is refused before anything is written.
    bare = deidfs(
        base,
        "tls-bare",
        *anonymize_argv(base, base / "out-tls-bare"),
        "--cluster",
        dask_processes.address,
    )
    assert bare.returncode == 78
    assert "--tls-ca-file" in bare.stderr
    assert not (base / "out-tls-bare").exists()


# -- without a cluster ---------------------------------------------------------------------------
def test_without_distributed_the_command_says_what_to_install(base: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['distributed'] = None;"  # as if not installed
        "from pathlib import Path; import deidfs.cli.common as c;"
        f"c.DEFAULT_CONFIG_PATH = Path({str(base / 'none.toml')!r});"
        "from deidfs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [*anonymize_argv(base, tmp_path / "out"), "--cluster", "local:2"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode == 69
    assert "pip install 'deidfs[cluster]'" in done.stderr


def test_other_commands_never_import_distributed(base: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import deidfs.cli.common as c;"
        f"c.DEFAULT_CONFIG_PATH = Path({str(base / 'none.toml')!r});"
        "from deidfs.cli.main import main\n"
        "for argv in (['anonymize', '--help'], ['export', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print('distributed' in sys.modules, 'dask' in sys.modules)\n"
    )
    argv = [*anonymize_argv(base, tmp_path / "out"), "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"
    assert "--cluster ADDRESS" in done.stdout
    assert "--allow-plain-key" in done.stdout
    assert "--tls-ca-file" in done.stdout
    assert done.stdout.count("--cluster ADDRESS") >= 2  # anonymize and export


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cluster", "local:2", "--workers", "2"], "--workers cannot be used with --cluster"),
        (["--batch-size", "4"], "--batch-size needs --cluster"),
        (["--allow-plain-key"], "--allow-plain-key needs --cluster"),
    ],
)
def test_usage_errors(base: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    done = deidfs(base, "usage", *anonymize_argv(base, tmp_path / "out"), *extra)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--key-file", "k"], "--key-file needs --cluster"),
        (["--cluster", "local:2", "--via-daemon"], "--via-daemon cannot be used with --cluster"),
        (["--cluster", "local:2", "--to-destination", "n"], "--to-destination cannot run on"),
    ],
)
def test_export_usage_errors(base: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    done = deidfs(
        base, "export-usage", "export", "ct", "--config", str(tmp_path / "x.toml"), *extra
    )
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.parametrize(
    "text", ["local:0", "local:x", "host:8786", "http://h:1", "tcp://h", "tcp://h:99999"]
)
def test_addresses_that_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="local:N"):
        parse_address(text)


def test_addresses() -> None:
    assert parse_address("local:3").local_workers == 3
    assert parse_address("tcp://10.0.0.5:8786").scheme == "tcp"
    assert parse_address("tls://scheduler.example.org:8786").scheme == "tls"
    assert parse_address("tls://[::1]:8786").scheme == "tls"


def test_the_key_travels_only_where_it_may(tmp_path: Path) -> None:
    tcp = ClusterOptions(parse_address("tcp://10.0.0.5:8786"))
    with pytest.raises(ConfigError, match="plain tcp://"):
        key_source(tcp, KEY, None)
    allowed = key_source(ClusterOptions(tcp.address, allow_plain_key=True), KEY, None)
    assert isinstance(allowed, KeyInTask)
    assert isinstance(key_source(ClusterOptions(parse_address("local:2")), KEY, None), KeyInTask)
    assert isinstance(key_source(ClusterOptions(parse_address("tls://h:1")), KEY, None), KeyInTask)
    by_file = key_source(tcp, KEY, "relative/secret.key")
    assert isinstance(by_file, KeyFile)
    assert os.path.isabs(by_file.path)
    for source in (allowed, by_file):
        assert KEY.hex() not in repr(source)
        assert repr(KEY) not in repr(source)


def test_batches_keep_directories_together_in_order() -> None:
    items = [(i, f"/s/{d}/f{i}", f"{d}/f{i}") for i, d in enumerate("aaabbcccccd")]
    batches = partition(items, 4)
    assert [b.number for b in batches] == list(range(len(batches)))
    assert [[i for i, _, _ in b.items] for b in batches] == [
        [0, 1, 2],
        [3, 4],
        [5, 6, 7, 8],
        [9, 10],
    ]
    assert [item for b in batches for item in b.items] == items
    assert all(len(b.items) <= 4 for b in batches)
    assert "/s/" not in repr(batches[0])
    small = partition([(i, f"/s/{i}/f", f"{i}/f") for i in range(5)], 2)
    assert [len(b.items) for b in small] == [2, 2, 1]


def _work(out: Path, key: KeyFile | KeyInTask, probe: str = "") -> Work:
    job = Job(
        compile_plan(BUILTIN_PROFILES["Basic"]),
        Pseudonymizer(KEY),
        out,
        Layout.DICOM,
        False,
        os.getpid(),
    )
    return Work.of(job, key, probe)


def test_work_travels_without_its_key_and_comes_back_whole(tmp_path: Path) -> None:
    job = Job(
        compile_plan(BUILTIN_PROFILES["Basic"]), Pseudonymizer(KEY), tmp_path, Layout.FLAT, True, 7
    )
    work = Work.of(job, KeyFile(str(tmp_path / "k"), Pseudonymizer(KEY).fingerprint()))
    assert all(name != "pseudo" for name, _ in work.values)
    assert work.bind(job.pseudo) == job
    assert "Work(Job" in repr(work)


def test_a_worker_refuses_another_key_or_version_or_output(base: Path, tmp_path: Path) -> None:
    src = base / "src" / PATIENTS[0][0] / "series-0" / "needle-file-0.dcm"
    batch = Batch(0, ((0, str(src), "needle-file-0.dcm"),))
    other = tmp_path / "other.key"
    other.write_text(OTHER_KEY.hex() + "\n")
    other.chmod(0o600)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WorkerRefused, match="another pseudonym key"):
        run_batch_task(_work(out, KeyFile(str(other), Pseudonymizer(KEY).fingerprint())), batch)
    in_task = KeyInTask(KEY, Pseudonymizer(KEY).fingerprint())
    old = _work(out, in_task)
    with pytest.raises(WorkerRefused, match="the same version"):
        run_batch_task(Work(old.kind, old.values, old.key, "0.0.0"), batch)
    with pytest.raises(WorkerRefused, match="output directory"):
        run_batch_task(_work(out, in_task, probe=".deidfs-1-000000000000.tmp"), batch)
    assert list(out.iterdir()) == []
    done = run_batch_task(_work(out, in_task), batch)
    assert [r.status for r in done.results] == ["written"]
    assert __version__ in repr(old)
