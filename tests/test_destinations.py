"""Exports to DICOM nodes: ``[destinations.*]``, ``deidfs export --to-destination``, C-STORE
to a real Orthanc (Debian's package) started here on loopback ports with its own storage."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conftest import run_cli, sample_file
from deidfs.config.load import load_config
from deidfs.config.model import ConfigInvalid, DestinationKind
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.export.destinations import STATE_NAME, state_dir_of
from deidfs.export.send import send_folder
from deidfs.ops.metrics import Metrics

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: Debian's orthanc-dicomweb: STOW-RS at /dicom-web/studies.
DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)
MARKER = "ZZLEAKMARKER"
#: Originals: studies of two patients, series in them, instances per series.
STUDIES = 3
SERIES = 2
INSTANCES = 3

needs_orthanc = pytest.mark.skipif(not os.access(ORTHANC, os.X_OK), reason="no Orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """A private Orthanc: its own configuration, storage and loopback ports."""

    def __init__(
        self,
        root: Path,
        *,
        check_called_aet: bool = False,
        accepted: list[str] | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.users = users or {}
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = "ORTHANCTEST"
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "deidfs-test",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "DicomAet": self.aet,
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "DicomServerEnabled": True,
                    "HttpServerEnabled": True,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": bool(users),
                    "RegisteredUsers": users or {},
                    "DicomAlwaysAllowStore": True,
                    "DicomCheckCalledAet": check_called_aet,
                    "DicomModalities": {},
                    "Plugins": [DICOMWEB] if os.path.exists(DICOMWEB) else [],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "StorageCompression": False,
                    "SaveJobs": False,
                    "HttpThreadsCount": 4,
                    **({"AcceptedTransferSyntaxes": accepted} if accepted else {}),
                    **(
                        {
                            "DicomTlsEnabled": True,
                            "DicomTlsCertificate": str(tls[0]),
                            "DicomTlsPrivateKey": str(tls[1]),
                            "DicomTlsTrustedCertificates": str(tls[0]),
                            "DicomTlsRemoteCertificateRequired": False,
                        }
                        if tls
                        else {}
                    ),
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115  (kept by the process)
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "orthanc.log").read_text()[-2000:]
            try:
                self.get("/system")
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        pytest.fail("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def _open(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=10)  # noqa: S310  (http on loopback)

    def get(self, path: str) -> Any:
        with self._open(path) as r:
            return json.loads(r.read())

    def raw(self, path: str) -> bytes:
        with self._open(path) as r:
            return bytes(r.read())

    def instances(self) -> dict[str, dict[str, Any]]:
        """Every instance stored, by SOP Instance UID: its tags and its parents' UIDs."""
        out: dict[str, dict[str, Any]] = {}
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = {"id": oid, **tags}
        return out


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    node = Orthanc(tmp_path / "orthanc")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def write_sources(root: Path) -> list[str]:
    """Originals with identifying values (and a marker) in studies and series."""
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    rels = []
    for st in range(STUDIES):
        for se in range(SERIES):
            for i in range(INSTANCES):
                ds = base.copy()
                ds.PatientID = f"{MARKER}-PID-{st % 2}"
                ds.PatientName = f"{MARKER}^Name{st % 2}"
                ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.9{st}"
                ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.9{st}.{se}"
                ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9{st}.{se}.{i}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = i + 1
                rel = f"{MARKER}_{st}/s{se}/im{i}.dcm"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(root / rel)
                rels.append(rel)
    (root / "notes.txt").write_text("not a DICOM file\n")  # refused: never sent
    return rels


def write_config(
    tmp_path: Path,
    src: Path,
    node: Orthanc | None,
    *,
    called_ae: str | None = None,
    port: int | None = None,
    extra: str = "",
    web: str = "",
) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    key = state / "secret.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    path = tmp_path / "deidfs.toml"
    dest = ""
    if node is not None:
        dest = f"""
# the research PACS
[destinations.pacs]
kind = "dicom"
ae_title = "DEIDFS"
called_ae = "{called_ae or node.aet}"
host = "127.0.0.1"
port = {port or node.dicom_port}
retries = 2
backoff_seconds = 0.1
timeout_seconds = 5
batch_size = 5
{extra}

[destinations.web]
kind = "dicomweb"
url = "http://127.0.0.1:{node.http_port}/dicom-web"
retries = 1
backoff_seconds = 0.1
batch_size = 8
{web}
"""
    path.write_text(
        f"""\
[daemon]
mountpoint = "{tmp_path / "mnt"}"
state_dir = "{state}"
export_dir = "{tmp_path / "export"}"
control_socket = "{tmp_path / "control.sock"}"
metrics_address = ""

[folders.ct]
path = "{src}"
profile = "Basic"
{dest}"""
    )
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    write_sources(root)
    return root


def folder_export(tmp_path: Path, config: Path) -> dict[str, bytes]:
    """The folder export of the same folder (the mount's bytes), by view path."""
    done = run_cli(
        ["--config", str(config), "export", "ct", "--to", str(tmp_path / "out")],
        tmp_path / "logs",
        "folder-export",
    )
    assert done.returncode == 0, done.stderr
    root = tmp_path / "out" / "ct"
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*.dcm")
        if not p.name.startswith(".")
    }


def dataset_bytes(part10: bytes) -> bytes:
    """A Part 10 file's bytes after its file meta group (what C-STORE carries)."""
    assert part10[128:132] == b"DICM"
    at = 132
    group_length = int.from_bytes(part10[at + 8 : at + 12], "little")
    return part10[at + 12 + group_length :]


# -- configuration --------------------------------------------------------------------------
def test_destinations_are_parsed_and_checked_with_file_line_and_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        textwrap.dedent(
            """\
            [destinations.pacs]
            kind = "dicom"
            called_ae = "PACS"
            host = "pacs.example.org"
            port = 11112
            tls = true
            ca_file = "ca.pem"

            [destinations.web]
            kind = "dicomweb"
            url = "https://pacs.example.org/dicom-web/"
            token_file = "/etc/deidfs/token"
            """
        )
    )
    config = load_config(good)
    pacs, web = config.destinations["pacs"], config.destinations["web"]
    assert pacs.kind is DestinationKind.DICOM
    assert (pacs.ae_title, pacs.called_ae, pacs.host, pacs.port) == (
        "DEIDFS",
        "PACS",
        "pacs.example.org",
        11112,
    )
    assert pacs.tls
    assert pacs.ca_file == tmp_path / "ca.pem"
    assert web.kind is DestinationKind.DICOMWEB
    assert web.url == "https://pacs.example.org/dicom-web"
    assert web.token_file == Path("/etc/deidfs/token")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        textwrap.dedent(
            """\
            [destinations.a]
            kind = "dicom"
            called_ae = "AN AE TITLE LONGER THAN 16"
            host = "127.0.0.1"
            port = 70000
            cert_file = "c.pem"

            [destinations.b]
            kind = "dicomweb"
            url = "https://user:secret@pacs/dicom-web"
            token_file = "t"
            basic_auth_file = "b"
            called_ae = "X"

            [destinations.c]
            host = "x"
            """
        )
    )
    with pytest.raises(ConfigInvalid) as info:
        load_config(bad)
    got = {(e.line, e.key) for e in info.value.errors}
    assert got == {
        (3, "destinations.a.called_ae"),
        (5, "destinations.a.port"),
        (6, "destinations.a.cert_file"),
        (10, "destinations.b.url"),
        (12, "destinations.b.basic_auth_file"),
        (13, "destinations.b.called_ae"),
        (15, "destinations.c.kind"),
    }, str(info.value)
    assert "secret" not in str(info.value).replace("https://user:secret@", "")


# -- C-STORE to Orthanc ---------------------------------------------------------------------
@needs_orthanc
def test_every_served_file_arrives_with_its_bytes_and_grouping(
    tmp_path: Path, src: Path, orthanc: Orthanc
) -> None:
    config = write_config(tmp_path, src, orthanc)
    served = folder_export(tmp_path, config)
    assert len(served) == STUDIES * SERIES * INSTANCES
    done = run_cli(
        ["--config", str(config), "export", "ct", "--to-destination", "pacs"],
        tmp_path / "logs",
        "send",
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(served)} files stored there" in done.stdout
    assert "refused" in done.stdout  # notes.txt: withheld, never sent
    stored = orthanc.instances()
    views = {
        str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID): (rel, data)
        for rel, data in served.items()
    }
    assert set(stored) == set(views)
    for uid, (rel, data) in views.items():
        inst = stored[uid]
        # The layout is <PatientID'>/<StudyUID'>/<SeriesUID'>/<SOPUID'>.dcm: the grouping
        # the mount shows is the grouping Orthanc made.
        patient, study, series, _ = rel.split("/")
        assert (inst["PatientID"], inst["StudyInstanceUID"], inst["SeriesInstanceUID"]) == (
            patient,
            study,
            series,
        )
        got = orthanc.raw(f"/instances/{inst['id']}/file")
        assert dataset_bytes(got) == dataset_bytes(data)  # the served bytes, as they are
    assert len(orthanc.get("/studies")) == STUDIES
    assert len(orthanc.get("/series")) == STUDIES * SERIES
    assert len(orthanc.get("/patients")) == 2
    # The manifest and the state name view paths only.
    where = state_dir_of(load_config(config), "pacs", "ct")
    manifests = sorted(where.glob(".deidfs-manifest-*.jsonl"))
    assert len(manifests) == 1
    lines = [json.loads(x) for x in manifests[0].read_text().splitlines()]
    files = [x for x in lines if x["type"] == "file"]
    assert {x["path"] for x in files} == set(served)
    assert {x["result"] for x in files} == {"stored"}
    assert {x["status"] for x in files} == {"0x0000"}
    for text in (manifests[0].read_text(), (where / STATE_NAME).read_text(), done.stderr):
        assert MARKER not in text
    # A re-run sends nothing.
    again = run_cli(
        ["--config", str(config), "export", "ct", "--to-destination", "pacs"],
        tmp_path / "logs",
        "send-again",
    )
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout
    assert len(sorted(where.glob(".deidfs-manifest-*.jsonl"))) == 1


@needs_orthanc
@pytest.mark.parametrize("destination", ["pacs", "web"])  # C-STORE, STOW-RS
def test_anonymize_sends_what_it_would_write_and_a_rerun_sends_nothing(
    tmp_path: Path, src: Path, orthanc: Orthanc, destination: str
) -> None:
    config = write_config(tmp_path, src, orthanc)
    send = ["--config", str(config), "anonymize", str(src), "--profile", "Basic"]
    done = run_cli([*send, "--to-destination", destination], tmp_path / "logs", "anonymize-send")
    assert done.returncode == 0, done.stderr
    total = STUDIES * SERIES * INSTANCES
    assert f"deidfs anonymize: {total + 1} files (profile Basic) to destination {destination}" in (
        done.stdout
    )
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["stored", str(total)] in rows, done.stdout
    assert ["refused", "1", "not_dicom", "1"] in rows, done.stdout  # notes.txt: never sent
    # What --to writes with the same key and profile is what Orthanc holds.
    out = tmp_path / "anon"
    wrote = run_cli(
        ["--config", str(config), "anonymize", str(src), "--profile", "Basic", "--to", str(out)],
        tmp_path / "logs",
        "anonymize-write",
    )
    assert wrote.returncode == 0, wrote.stderr
    written = {
        str(pydicom.dcmread(p).SOPInstanceUID): p.read_bytes()
        for p in out.rglob("*.dcm")
        if not p.name.startswith(".")
    }
    assert len(written) == total
    stored = orthanc.instances()
    assert set(stored) == set(written)
    for uid, data in written.items():
        got = orthanc.raw(f"/instances/{stored[uid]['id']}/file")
        assert dataset_bytes(got) == dataset_bytes(data)
    where = state_dir_of(load_config(config), destination, ".anonymize")
    manifests = sorted(where.glob(".deidfs-manifest-*.jsonl"))
    assert len(manifests) == 1
    lines = [json.loads(x) for x in manifests[0].read_text().splitlines()]
    assert sorted(x["result"] for x in lines if x["type"] == "file") == ["stored"] * total
    assert lines[-1]["refused"] == {"not_dicom": 1}
    for text in (manifests[0].read_text(), (where / STATE_NAME).read_text(), done.stderr):
        assert MARKER not in text
    assert str(src) not in manifests[0].read_text()
    # A re-run sends nothing: Orthanc sees no new instance.
    changes_before = orthanc.get("/changes?limit=1000")["Last"]
    again = run_cli([*send, "--to-destination", destination], tmp_path / "logs", "anonymize-again")
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout
    assert any(
        r[:2] == ["already", str(total)]
        for r in [line.split() for line in again.stdout.splitlines()]
    ), again.stdout
    changes = orthanc.get(f"/changes?since={changes_before}&limit=1000")["Changes"]
    assert [c for c in changes if c["ChangeType"] == "NewInstance"] == []
    assert len(sorted(where.glob(".deidfs-manifest-*.jsonl"))) == 1
    # One place at a time; the destination is one of the configuration.
    both = run_cli(
        [*send, "--to", str(out), "--to-destination", destination], tmp_path / "logs", "both"
    )
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
    unknown = run_cli([*send, "--to-destination", "nowhere"], tmp_path / "logs", "nowhere")
    assert unknown.returncode == os.EX_NOINPUT, unknown.stderr
    assert "no destination 'nowhere'" in unknown.stderr


@needs_orthanc
def test_a_node_stopped_mid_export_gets_every_file_once_after_the_rerun(
    tmp_path: Path, src: Path, orthanc: Orthanc
) -> None:
    config_path = write_config(tmp_path, src, orthanc)
    config = load_config(config_path)
    total = STUDIES * SERIES * INSTANCES
    metrics = Metrics(process_collectors=False)

    def kill_after(stored: int) -> None:
        if stored >= 7 and orthanc.proc is not None:
            orthanc.stop()  # kill -9 between two batches' files

    sleeps: list[float] = []
    first = send_folder(
        config,
        "ct",
        "pacs",
        PSEUDO,
        metrics=metrics,
        on_stored=kill_after,
        sleep=sleeps.append,
    )
    assert first.error
    assert "pacs" in first.error
    assert first.stored == 7  # killed inside the second association
    assert first.failed == total - first.stored
    assert sleeps == [0.1, 0.2]  # backoff, then the export gives up
    sent = metrics.export_sent
    assert sent.labels("pacs", "stored")._value.get() == first.stored
    assert sent.labels("pacs", "failed")._value.get() == first.failed
    orthanc.start()  # same storage: what was stored is there
    before = orthanc.instances()
    assert len(before) == first.stored
    changes_before = orthanc.get("/changes?limit=1000")["Last"]
    done = run_cli(
        ["--config", str(config_path), "export", "ct", "--to-destination", "pacs"],
        tmp_path / "logs",
        "rerun",
    )
    assert done.returncode == 0, done.stderr
    assert f"{total - first.stored} with" not in done.stdout
    after = orthanc.instances()
    assert len(after) == total
    # Only the files not stored before were sent: Orthanc saw one new instance for each.
    changes = orthanc.get(f"/changes?since={changes_before}&limit=1000")["Changes"]
    new = [c for c in changes if c["ChangeType"] == "NewInstance"]
    assert len(new) == total - first.stored
    lines = done.stdout.splitlines()
    assert any(x.split()[:2] == ["stored", str(total - first.stored)] for x in lines), done.stdout
    assert any(x.split()[:2] == ["already", str(first.stored)] for x in lines), done.stdout


@needs_orthanc
def test_a_refused_association_is_a_clear_error(tmp_path: Path, src: Path) -> None:
    node = Orthanc(tmp_path / "orthanc", check_called_aet=True)
    node.start()
    try:
        config = write_config(tmp_path, src, node, called_ae="WRONGAE")
        done = run_cli(
            ["--config", str(config), "export", "ct", "--to-destination", "pacs"],
            tmp_path / "logs",
            "refused",
        )
        assert done.returncode == os.EX_UNAVAILABLE, done.stderr
        assert "association rejected" in done.stderr
        assert "WRONGAE@127.0.0.1" in done.stderr
        assert "Called AE title not recognised" in done.stderr, done.stderr
        assert node.get("/instances") == []
    finally:
        node.stop()


@pytest.mark.skipif(os.path.exists("/etc/deidfs/deidfs.toml"), reason="a system configuration")
def test_anonymize_to_a_destination_needs_a_configuration(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    key = tmp_path / "secret.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    done = run_cli(
        [
            *("anonymize", str(src), "--profile", "Basic"),
            *("--key-file", str(key), "--to-destination", "pacs"),
        ],
        tmp_path / "logs",
        "no-config",
    )
    assert done.returncode == os.EX_CONFIG, done.stderr
    assert "--to-destination needs a configuration" in done.stderr


def test_an_unknown_destination_exits_66(tmp_path: Path, src: Path) -> None:
    config = write_config(tmp_path, src, None)
    done = run_cli(
        ["--config", str(config), "export", "ct", "--to-destination", "nowhere"],
        tmp_path / "logs",
        "unknown",
    )
    assert done.returncode == os.EX_NOINPUT, done.stderr
    assert "no destination 'nowhere'" in done.stderr


def test_an_unreachable_node_is_retried_then_exits_69(tmp_path: Path, src: Path) -> None:
    port = free_port()  # nothing listens there
    node = Orthanc(tmp_path / "orthanc")
    config = write_config(tmp_path, src, node, port=port)
    started = time.monotonic()
    done = run_cli(
        ["--config", str(config), "export", "ct", "--to-destination", "pacs"],
        tmp_path / "logs",
        "unreachable",
    )
    assert done.returncode == os.EX_UNAVAILABLE, done.stderr
    assert "could not be reached or aborted, 2 retries failed" in done.stderr
    assert time.monotonic() - started < 30


#: Lossless-compressed samples of pydicom (RLE, JPEG-LS Lossless, JPEG Lossless SV1 RGB, JPEG
#: 2000 Lossless): a node that takes Explicit VR Little Endian only gets them decoded.
LOSSLESS_SAMPLES = {
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
}


@needs_orthanc
def test_explicit_little_endian_is_a_fallback_for_lossless_files_only(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    for i in range(2):
        ds = base.copy()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.95.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(src / f"implicit{i}.dcm", enforce_file_format=True)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.95.9"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.LossyImageCompression = "01"  # uncompressed, but once lossy: not converted either
    ds.save_as(src / "implicit-once-lossy.dcm", enforce_file_format=True)
    originals: dict[str, Any] = {}  # decoded pixels of each source, by its file name
    for i, name in enumerate(LOSSLESS_SAMPLES):
        ds = pydicom.dcmread(sample_file(name))
        assert ds.file_meta.TransferSyntaxUID == LOSSLESS_SAMPLES[name]
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.96.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / name, enforce_file_format=True)
        originals[name] = pydicom.dcmread(src / name).pixel_array
    # Lossy: JPEG Baseline, and RLE (a lossless syntax) of pixels once lossy-compressed.
    shutil.copy(sample_file("SC_rgb_jpeg_dcmtk.dcm"), src / "baseline.dcm")
    # JPEG 2000 (not "Lossless Only") that says nothing of loss: not known lossless.
    ds = pydicom.dcmread(sample_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.97.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(src / "j2k.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(sample_file("SC_rgb_rle.dcm"))
    ds.LossyImageCompression = "01"
    ds.save_as(src / "once-lossy-rle.dcm", enforce_file_format=True)
    node = Orthanc(tmp_path / "orthanc", accepted=[pydicom.uid.ExplicitVRLittleEndian])
    node.start()
    try:
        config = write_config(tmp_path, src, node)
        done = run_cli(
            ["--config", str(config), "export", "ct", "--to-destination", "pacs"],
            tmp_path / "logs",
            "fallback",
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("lossy-compressed, never converted") == 3, done.stderr
        assert done.stderr.count("its syntax may be lossy, never converted") == 1, done.stderr
        stored = node.instances()
        assert len(stored) == 2 + len(LOSSLESS_SAMPLES)  # the lossless files, converted
        by_modality: dict[str, int] = {}
        for inst in stored.values():
            meta = node.get(f"/instances/{inst['id']}/metadata?expand")
            assert meta["TransferSyntax"] == pydicom.uid.ExplicitVRLittleEndian
            by_modality[inst["Modality"]] = by_modality.get(inst["Modality"], 0) + 1
        assert by_modality == {"CT": 2, "MR": 3, "OT": 1}
        # The pixel values Orthanc holds are the decoded values of the source.
        served = folder_export(tmp_path, config)
        by_source = {}  # the SOP Instance UID served for each lossless source
        for data in served.values():
            view = pydicom.dcmread(io.BytesIO(data))
            if view.get("LossyImageCompression") == "01":
                continue
            for name, syntax in LOSSLESS_SAMPLES.items():
                if view.file_meta.TransferSyntaxUID == syntax:
                    by_source[str(view.SOPInstanceUID)] = name
        assert sorted(by_source.values()) == sorted(LOSSLESS_SAMPLES)
        assert set(by_source) <= set(stored)
        for uid, name in by_source.items():
            got = pydicom.dcmread(io.BytesIO(node.raw(f"/instances/{stored[uid]['id']}/file")))
            assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert "PixelData" in got
            assert not got["PixelData"].is_undefined_length
            arr = got.pixel_array
            assert arr.dtype == originals[name].dtype, name
            assert arr.shape == originals[name].shape, name
            assert (arr == originals[name]).all(), name
        where = state_dir_of(load_config(config), "pacs", "ct")
        manifest = next(where.glob(".deidfs-manifest-*.jsonl"))
        files = [json.loads(x) for x in manifest.read_text().splitlines()][:-1]
        assert sorted((f["result"], f["converted"]) for f in files) == [("failed", False)] * 4 + [
            ("stored", True)
        ] * (2 + len(LOSSLESS_SAMPLES))
        assert sorted(f["detail"] for f in files if f["result"] == "failed") == [
            "no presentation context accepted for its SOP class and syntax; its pixels are "
            "lossy-compressed, never converted"
        ] * 3 + [
            "no presentation context accepted for its SOP class and syntax; its syntax may be "
            "lossy, never converted"
        ]
    finally:
        node.stop()


# -- deidfs destination add | list | remove ---------------------------------------------------
def test_destination_add_list_remove_keep_comments(
    tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deidfs.cli.main import main

    cfg = write_config(tmp_path, src, None)
    cfg.write_text("# site configuration, kept by every edit\n" + cfg.read_text() + "\n# end\n")
    before = cfg.read_text()
    args = ["--config", str(cfg), "destination"]
    add = [*args, "add", "pacs", "--called-ae", "PACS", "--host", "pacs.local", "--port", "104"]
    assert main(add) == 0
    assert main([*args, "add", "web", "--kind", "dicomweb", "--url", "https://w/dicom-web"]) == 0
    config = load_config(cfg)
    assert config.destinations["pacs"].called_ae == "PACS"
    assert config.destinations["pacs"].port == 104
    assert config.destinations["web"].url == "https://w/dicom-web"
    text = cfg.read_text()
    assert text.startswith("# site configuration, kept by every edit\n")
    assert text.rstrip().endswith("# end")
    capsys.readouterr()
    assert main([*args, "list"]) == 0
    listed = capsys.readouterr().out
    assert "PACS@pacs.local:104" in listed
    assert "https://w/dicom-web" in listed
    assert main([*args, "add", "pacs", "--called-ae", "X", "--host", "h", "--port", "1"]) != 0
    bad = [*args, "add", "x", "--called-ae", "AN AE TITLE TOO LONG", "--host", "h", "--port", "1"]
    assert main(bad) == 78
    assert main([*args, "add", "y", "--url", "https://w"]) == 2  # --url is not for dicom
    assert main([*args, "remove", "pacs"]) == 0
    assert main([*args, "remove", "pacs"]) == 66
    assert main([*args, "remove", "web"]) == 0
    assert cfg.read_text() == before


# -- STOW-RS to Orthanc's DICOMweb plugin ---------------------------------------------------
needs_dicomweb = pytest.mark.skipif(
    not (os.access(ORTHANC, os.X_OK) and os.path.exists(DICOMWEB)), reason="no orthanc-dicomweb"
)


@needs_dicomweb
def test_stow_rs_stores_the_served_bytes_per_study_with_basic_auth(
    tmp_path: Path, src: Path
) -> None:
    node = Orthanc(tmp_path / "orthanc", users={"deidfs": "s3cret-pass"})
    node.start()
    try:
        auth = tmp_path / "web.auth"
        auth.write_text("deidfs:s3cret-pass\n")
        auth.chmod(0o600)
        config = write_config(tmp_path, src, node, web=f'basic_auth_file = "{auth}"')
        served = folder_export(tmp_path, config)
        done = run_cli(
            ["--config", str(config), "export", "ct", "--to-destination", "web"],
            tmp_path / "logs",
            "stow",
        )
        assert done.returncode == 0, done.stderr
        stored = node.instances()
        assert len(stored) == len(served)
        for inst in stored.values():
            got = node.raw(f"/instances/{inst['id']}/file")
            rel = "/".join((inst["PatientID"], inst["StudyInstanceUID"], inst["SeriesInstanceUID"]))
            rel += f"/{inst['SOPInstanceUID']}.dcm"
            assert dataset_bytes(got) == dataset_bytes(served[rel])
        assert "s3cret" not in done.stderr
        # The wrong password: 401, a clear error, nothing retried, exit 69.
        auth.write_text("deidfs:wrong\n")
        state = state_dir_of(load_config(config), "web", "ct") / STATE_NAME
        state.unlink()
        refused = run_cli(
            ["--config", str(config), "export", "ct", "--to-destination", "web"],
            tmp_path / "logs",
            "stow-401",
        )
        assert refused.returncode == os.EX_UNAVAILABLE, refused.stderr
        assert "HTTP 401" in refused.stderr
        assert "retries" not in refused.stderr
        assert "wrong" not in refused.stderr
    finally:
        node.stop()


# -- through the running daemon -------------------------------------------------------------
@needs_orthanc
@pytest.mark.fuse
def test_the_daemon_sends_the_views_it_serves_and_counts_them(
    daemon_factory: Any, orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    from deidfs.cli.main import main

    d = daemon_factory()
    port = free_port()
    text = d.config_path.read_text()
    text = text.replace('metrics_address = ""', f'metrics_address = "127.0.0.1:{port}"')
    text += textwrap.dedent(
        f"""
        [destinations.pacs]
        kind = "dicom"
        called_ae = "{orthanc.aet}"
        host = "127.0.0.1"
        port = {orthanc.dicom_port}
        retries = 0
        """
    )
    d.config_path.write_text(text)
    d.start()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        d.add(sample_file(name), f"in/{name}")
    (d.incoming / "notes.txt").write_text("not DICOM")
    views = d.wait_views(3)
    served = {
        str(pydicom.dcmread(io.BytesIO(v.read_bytes())).SOPInstanceUID): v.read_bytes()
        for v in views
    }
    argv = ["--config", str(d.config_path), "export", "samples", "--to-destination", "pacs"]
    assert main([*argv, "--via-daemon"]) == 0
    assert "3 files stored there" in capsys.readouterr().out
    stored = orthanc.instances()
    assert set(stored) == set(served)
    for uid, inst in stored.items():
        got = orthanc.raw(f"/instances/{inst['id']}/file")
        assert dataset_bytes(got) == dataset_bytes(served[uid])  # what the mount serves
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'deidfs_export_sent_total{destination="pacs",result="stored"} 3.0' in body
    # Once more: nothing is sent again.
    assert main([*argv, "--via-daemon"]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert len(orthanc.get("/instances")) == 3
    assert main([*argv, "--via-daemon", "--to", str(d.export)]) == 2


@needs_orthanc
def test_a_destination_pointed_at_another_node_gets_everything(
    tmp_path: Path, src: Path, orthanc: Orthanc
) -> None:
    config = write_config(tmp_path, src, orthanc)
    argv = ["--config", str(config), "export", "ct", "--to-destination", "pacs"]
    assert run_cli(argv, tmp_path / "logs", "first").returncode == 0
    other = Orthanc(tmp_path / "other")
    other.start()
    try:
        config = write_config(tmp_path, src, other)  # same name, another node
        done = run_cli(argv, tmp_path / "logs", "other")
        assert done.returncode == 0, done.stderr
        assert len(other.get("/instances")) == STUDIES * SERIES * INSTANCES
    finally:
        other.stop()


@needs_orthanc
def test_c_store_over_tls_verifies_the_node(tmp_path: Path, src: Path) -> None:
    def certificate(name: str) -> tuple[Path, Path]:
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key

    cert, key = certificate("node")
    stranger, _ = certificate("stranger")
    node = Orthanc(tmp_path / "orthanc", tls=(cert, key))
    node.start()
    try:
        argv = ["export", "ct", "--to-destination", "pacs"]
        # A node whose certificate our CA file does not vouch for gets nothing.
        config = write_config(tmp_path, src, node, extra=f'tls = true\nca_file = "{stranger}"')
        done = run_cli(["--config", str(config), *argv], tmp_path / "logs", "untrusted")
        assert done.returncode == os.EX_UNAVAILABLE, done.stderr
        assert "TLS: the node's certificate is not trusted" in done.stderr
        assert "retries failed" not in done.stderr  # not retried: it would not change
        assert node.get("/instances") == []
        config = write_config(tmp_path, src, node, extra=f'tls = true\nca_file = "{cert}"')
        done = run_cli(["--config", str(config), *argv], tmp_path / "logs", "tls")
        assert done.returncode == 0, done.stderr
        assert len(node.get("/instances")) == STUDIES * SERIES * INSTANCES
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, ("stored", "")),
        (0xB000, ("warning", "status 0xB000")),  # coercion of data elements
        (0xB007, ("warning", "status 0xB007")),
        (0xA900, ("failed", "status 0xA900")),  # data set does not match SOP class
        (0xC000, ("failed", "status 0xC000")),
        (0xA700, None),  # out of resources: temporary, the batch is tried again
        (0xA7FF, None),
    ],
)
def test_c_store_statuses(code: int, expected: tuple[str, str] | None) -> None:
    from deidfs.export.cstore import _status_result

    result = _status_result(code)
    assert (None if result is None else (result.status, result.detail)) == expected
