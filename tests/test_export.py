"""``deidfs export``: mount bytes, selection, idempotence, manifest, crashes, full disks."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pydicom
import pytest

import deidfs.export.commits as export_commits
import deidfs.export.files as export_files
import deidfs.export.folder as export_module
import deidfs.export.folder_run as export_run
import deidfs.export.selection as export_selection
import deidfs.export.workers as export_workers
import deidfs.export.writer as export_writer
from conftest import Daemon, sample_file
from deidfs.cli import common
from deidfs.cli.main import main
from deidfs.config.model import Config, DaemonConfig, FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import DeidfsError, NotFound, ProfileError, Refused
from deidfs.evidence.verify import verify_tree
from deidfs.export.errors import ExportRefused
from deidfs.export.files import is_temp_name
from deidfs.export.folder import export_folder
from deidfs.export.manifest import is_manifest_name
from deidfs.export.selection import Selection
from deidfs.export.summary import ExportStopped, ExportSummary
from deidfs.ops.control import ControlServer
from deidfs.ops.control_protocol import ErrorCode, ExportRequest, Reply, Request
from deidfs.view.render import Layout, render_path, write_view

KEY = bytes(range(32))
PSEUDO = Pseudonymizer(KEY)

#: The originals: (relative path, PatientID, PatientName, study number, accession).
PATIENTS = {
    "alpha": ("PAT-ALPHA-0001", "Alphason^Anna"),
    "beta": ("PAT-BETA-0002", "Betamann^Bert"),
}
STUDIES = {  # study number -> (patient, accession, directory name)
    1: ("alpha", "ACC-STUDY-0001", "alphason_anna/chest_ct"),
    2: ("alpha", "ACC-STUDY-0002", "alphason_anna/head_ct"),
    3: ("beta", "ACC-STUDY-0003", "betamann_bert/abdomen_ct"),
}
INSTANCES = 2  #: files per study


def study_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.7{n}"


def sop_uid(n: int, i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.7{n}.1.{i}"


def write_sources(root: Path) -> dict[str, int]:
    """The originals of a folder; returns {relative path: study number}."""
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    made: dict[str, int] = {}
    for n, (patient, accession, directory) in STUDIES.items():
        pid, name = PATIENTS[patient]
        for i in range(INSTANCES):
            ds = base.copy()
            ds.PatientID = pid
            ds.PatientName = name
            ds.AccessionNumber = accession
            ds.StudyInstanceUID = study_uid(n)
            ds.SeriesInstanceUID = f"{study_uid(n)}.1"
            ds.SOPInstanceUID = sop_uid(n, i)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            rel = f"{directory}/im{i}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(root / rel)
            made[rel] = n
    (root / "notes.txt").write_text("not a DICOM file\n")
    shutil.copy(root / "alphason_anna/chest_ct/im0.dcm", root / ".hidden.dcm")
    shutil.copy(root / "alphason_anna/chest_ct/im0.dcm", root / "arriving.dcm.part")
    (root / "link.dcm").symlink_to(root / "alphason_anna/chest_ct/im0.dcm")
    return made


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    write_sources(root)
    return root


SOURCES = sorted(f"{d}/im{i}.dcm" for _, _, d in STUDIES.values() for i in range(INSTANCES))


def make_config(tmp_path: Path, src: Path, layout: Layout = Layout.DICOM) -> Config:
    profiles = dict(BUILTIN_PROFILES)
    profiles["Off"] = BUILTIN_PROFILES["Basic"].derive("Off", enabled=False)
    return Config(
        daemon=DaemonConfig(
            mountpoint=tmp_path / "mnt",
            export_dir=tmp_path / "export",
            state_dir=tmp_path / "state",
            control_socket=tmp_path / "control.sock",
            metrics_address="",
        ),
        folders={"ct": FolderConfig(id="ct", path=src, profile="Basic", layout=layout)},
        profiles=profiles,
    )


def write_config_file(tmp_path: Path, src: Path) -> Path:
    """A TOML configuration for the CLI, with the test key in its state directory."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    key = state / "secret.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    path = tmp_path / "deidfs.toml"
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

[profiles.Off]
base = "Basic"
enabled = false
"""
    )
    return path


def expected(src: Path, rel: str, profile: str = "Basic") -> tuple[str, bytes]:
    """(view path, bytes) the mount serves for one source: render + write_view."""
    plan = compile_plan(BUILTIN_PROFILES[profile])
    view = render_path(src / rel, plan, PSEUDO, Layout.DICOM, PurePosixPath(rel))
    with tempfile.TemporaryFile() as out, open(src / rel, "rb") as s:
        write_view(view, s.fileno(), out)
        out.seek(0)
        return str(view.relpath), out.read()


def expected_tree(src: Path, rels: list[str] = SOURCES, profile: str = "Basic") -> dict[str, bytes]:
    return dict(expected(src, rel, profile) for rel in rels)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but manifests, by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not is_manifest_name(p.name)
    }


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def manifests(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(".deidfs-manifest-*") if is_manifest_name(p.name))


def header_value(data: bytes, keyword: str) -> str:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.get(keyword, ""))


def run_export(config: Config, **kwargs: Any) -> ExportSummary:
    return export_folder(config, "ct", PSEUDO, **kwargs)


# -- bytes, idempotence, manifest ---------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_export_writes_the_mount_bytes_and_a_manifest(
    src: Path, tmp_path: Path, workers: int
) -> None:
    config = make_config(tmp_path, src)
    summary = run_export(config, workers=workers)
    dest = tmp_path / "export" / "ct"
    want = expected_tree(src)
    assert tree(dest) == want
    assert summary.destination == str(dest)
    assert (summary.written, summary.unchanged, summary.failed) == (6, 0, 0)
    assert summary.files == 6
    assert summary.refused == (("not_dicom", 1),)
    assert summary.skipped == 3  # dotfile, partial transfer, symbolic link
    assert summary.sources == 7
    assert temp_files(tmp_path) == []
    [manifest] = manifests(dest)
    assert summary.manifest == str(manifest)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    files, tail = lines[:-1], lines[-1]
    assert [f["path"] for f in files] == sorted(want)
    for entry in files:
        data = want[entry["path"]]
        assert entry["type"] == "file"
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["status"] == "written"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            assert entry[keyword] == header_value(data, keyword) != ""
        assert entry["profile"] == "Basic"
        assert entry["plan_digest"] == compile_plan(BUILTIN_PROFILES["Basic"]).digest
        assert entry["deidfs_version"] == export_run.__version__
        assert entry["time"].endswith("Z")
    assert tail["type"] == "summary"
    assert (tail["files"], tail["written"], tail["unchanged"], tail["failed"]) == (6, 6, 0, 0)
    assert tail["refused"] == {"not_dicom": 1}


def test_a_second_run_writes_nothing(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    run_export(config)
    dest = tmp_path / "export" / "ct"

    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            p.relative_to(dest).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in dest.rglob("*")
        }

    before = snapshot()
    again = run_export(config, workers=2)
    assert (again.written, again.unchanged, again.files) == (0, 6, 6)
    assert again.manifest == ""
    assert snapshot() == before  # no new file, nothing rewritten, no second manifest


def test_cli_says_when_nothing_is_new(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config_file(tmp_path, src)
    assert main(["--config", str(cfg), "export", "ct", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "written          6" in out
    assert "manifest: " in out
    assert main(["--config", str(cfg), "export", "ct", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing new: all 6 files were already in place; no manifest written" in out
    assert main(["--config", str(cfg), "export", "ct", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_a_later_export_lists_files_already_in_place(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    first = run_export(config, selection=Selection(accession=("ACC-STUDY-0001",)))
    assert first.written == 2
    time.sleep(1.1)  # manifests are named by the second
    second = run_export(config)
    assert (second.written, second.unchanged) == (4, 2)
    dest = tmp_path / "export" / "ct"
    assert len(manifests(dest)) == 2
    lines = [json.loads(line) for line in Path(second.manifest).read_text().splitlines()]
    statuses = sorted(entry["status"] for entry in lines[:-1])
    assert statuses == ["unchanged"] * 2 + ["written"] * 4
    for entry in lines[:-1]:
        data = (dest / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_manifest_holds_no_original_identifier_and_verify_passes(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    summary = run_export(config)
    text = Path(summary.manifest).read_text()
    originals: list[str] = [str(src), "im0.dcm", "notes.txt"]
    for n, (patient, accession, directory) in STUDIES.items():
        pid, name = PATIENTS[patient]
        originals += [pid, *name.split("^"), accession, study_uid(n), f"{study_uid(n)}.1"]
        originals += [sop_uid(n, i) for i in range(INSTANCES)]
        originals += directory.split("/")
    for value in originals:
        assert value not in text
        assert value.lower() not in text.lower()
    base = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    for keyword in ("StudyDate", "InstitutionName", "FrameOfReferenceUID"):
        assert str(base.get(keyword)) not in text
    # verify reads the manifest as an "other file" and searches it for every original value.
    result = verify_tree(
        config.folders["ct"],
        compile_plan(BUILTIN_PROFILES["Basic"]),
        PSEUDO,
        Path(summary.destination),
    )
    assert result.ok, result.findings
    assert (result.matched, result.other_files) == (6, 1)


def test_profile_override(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    summary = run_export(config, profile="HIPAA", to=tmp_path / "hipaa")
    assert tree(tmp_path / "hipaa" / "ct") == expected_tree(src, profile="HIPAA")
    assert summary.profile == "HIPAA"
    assert '"profile":"HIPAA"' in Path(summary.manifest).read_text()
    assert expected_tree(src, profile="HIPAA") != expected_tree(src)


def test_sources_naming_one_view_export_the_first_by_path(src: Path, tmp_path: Path) -> None:
    # Same SOP Instance UID, other pixels: the mount serves the first source by path.
    ds = pydicom.dcmread(src / "betamann_bert/abdomen_ct/im1.dcm")
    pixels = bytearray(ds.PixelData)
    pixels[:64] = bytes(64)
    ds.PixelData = bytes(pixels)
    ds.save_as(src / "aaa_first.dcm")
    config = make_config(tmp_path, src)
    summary = run_export(config, workers=2)
    assert summary.duplicates == 1
    rel, data = expected(src, "aaa_first.dcm")
    assert tree(tmp_path / "export" / "ct")[rel] == data
    assert expected(src, "betamann_bert/abdomen_ct/im1.dcm") != (rel, data)


def test_a_duplicate_that_lands_first_leaves_the_winner_written(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loser (later by path) is written first when the sources come in reverse order:
    # the winner then takes the target it created in this run, and the run wrote the file.
    ds = pydicom.dcmread(src / "betamann_bert/abdomen_ct/im1.dcm")
    pixels = bytearray(ds.PixelData)
    pixels[:64] = bytes(64)
    ds.PixelData = bytes(pixels)
    ds.save_as(src / "aaa_first.dcm")
    real_walk = export_module.walk_sources

    def reversed_walk(root: str) -> tuple[list[tuple[str, str]], int]:
        files, skipped = real_walk(root)
        return files[::-1], skipped

    monkeypatch.setattr(export_module, "walk_sources", reversed_walk)
    summary = run_export(make_config(tmp_path, src), workers=1)
    assert (summary.duplicates, summary.replaced) == (1, 0)
    rel, data = expected(src, "aaa_first.dcm")
    assert tree(tmp_path / "export" / "ct")[rel] == data
    rows = [json.loads(line) for line in Path(summary.manifest).read_text().splitlines()]
    assert {r.get("status") for r in rows if r.get("path") == str(rel)} == {"written"}


# -- selection ----------------------------------------------------------------------------------
def served(src: Path, rel: str, keyword: str) -> str:
    return header_value(expected(src, rel)[1], keyword)


SELECTIONS: dict[str, tuple[Callable[[Path, Path], Selection], list[int]]] = {
    "original study": (lambda s, m: Selection(study=(study_uid(2),)), [2]),
    "served study": (lambda s, m: Selection(study=(PSEUDO.uid(study_uid(2)),)), [2]),
    "two studies": (lambda s, m: Selection(study=(study_uid(1), study_uid(3))), [1, 3]),
    "original patient": (lambda s, m: Selection(patient=("PAT-ALPHA-0001",)), [1, 2]),
    "served patient": (
        lambda s, m: Selection(
            patient=(served(s, "betamann_bert/abdomen_ct/im0.dcm", "PatientID"),)
        ),
        [3],
    ),
    "original accession": (lambda s, m: Selection(accession=("ACC-STUDY-0003",)), [3]),
    "patient and accession": (
        lambda s, m: Selection(patient=("PAT-ALPHA-0001",), accession=("ACC-STUDY-0002",)),
        [2],
    ),
    "source directory": (lambda s, m: Selection(path=("alphason_anna/",)), [1, 2]),
    "absolute source directory": (
        lambda s, m: Selection(path=(str(s / "betamann_bert"),)),
        [3],
    ),
    "served study directory": (
        lambda s, m: Selection(
            path=(str(PurePosixPath(expected(s, "alphason_anna/head_ct/im0.dcm")[0]).parents[1]),)
        ),
        [2],
    ),
    "absolute mount directory": (
        lambda s, m: Selection(
            path=(str(m / PurePosixPath(expected(s, "alphason_anna/chest_ct/im1.dcm")[0]).parent),)
        ),
        [1],
    ),
    "served study and source path": (
        lambda s, m: Selection(
            study=(PSEUDO.uid(study_uid(1)), study_uid(3)), path=("betamann_bert",)
        ),
        [3],
    ),
}


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_selection(src: Path, tmp_path: Path, name: str) -> None:
    make, studies = SELECTIONS[name]
    config = make_config(tmp_path, src)
    selection = make(src, tmp_path / "mnt" / "ct")
    summary = run_export(config, selection=selection)
    rels = [rel for rel in SOURCES if any(rel.startswith(STUDIES[n][2]) for n in studies)]
    assert tree(tmp_path / "export" / "ct") == expected_tree(src, rels)
    assert summary.selected == summary.written == len(rels)
    lines = Path(summary.manifest).read_text().splitlines()
    assert len(lines) == len(rels) + 1


def test_a_single_file_by_its_original_path(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    rel = "alphason_anna/head_ct/im1.dcm"
    run_export(config, selection=Selection(path=(rel,)), workers=2)
    assert tree(tmp_path / "export" / "ct") == expected_tree(src, [rel])


@pytest.mark.parametrize(
    "selection",
    [
        Selection(study=("1.2.3.4.5",)),
        Selection(study=(study_uid(1), "1.2.3.4.5")),  # one known, one not: still nothing
        Selection(patient=("NOBODY",)),
        Selection(accession=("ACC-NONE",)),
        Selection(path=("no/such/dir",)),
        Selection(path=("/somewhere/else",)),
        Selection(path=("../src",)),
        Selection(patient=("PAT-BETA-0002",), study=(study_uid(1),)),  # not together
        Selection(study=("  ",)),
    ],
    ids=lambda s: ",".join(f"{k}={len(v)}" for k, v in s.kinds()),
)
def test_a_selector_matching_nothing_writes_nothing(
    src: Path, tmp_path: Path, selection: Selection
) -> None:
    config = make_config(tmp_path, src)
    with pytest.raises(NotFound) as caught:
        run_export(config, selection=selection)
    assert caught.value.exit_code == 66
    assert "1.2.3.4.5" not in str(caught.value)  # values are named by position only
    assert not (tmp_path / "export").exists()


# -- bad input and exit codes -------------------------------------------------------------------
def test_unknown_folder_profile_disabled_profile(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    with pytest.raises(NotFound, match="no folder 'nope'"):
        export_folder(config, "nope", PSEUDO)
    with pytest.raises(NotFound, match="no profile named 'Nope'"):
        run_export(config, profile="Nope")
    with pytest.raises(ProfileError, match="disabled"):
        run_export(config, profile="Off")
    with pytest.raises(ExportRefused) as refused:
        run_export(config, to=tmp_path / "elsewhere", confine=True)
    assert refused.value.exit_code == 77
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["export", "nope"], 66),
        (["export", "ct", "--profile", "Nope"], 66),
        (["export", "ct", "--profile", "Off"], 78),
        (["export", "ct", "--study", "1.2.3.4.5"], 66),
        (["export", "ct", "--path", "/elsewhere"], 66),
    ],
)
def test_cli_exit_codes(
    src: Path, tmp_path: Path, argv: list[str], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config_file(tmp_path, src)
    assert main(["--config", str(cfg), *argv]) == code
    assert capsys.readouterr().err.startswith("deidfs: ")
    assert not (tmp_path / "export").exists()


def test_cli_without_configuration_exits_78(tmp_path: Path) -> None:
    assert main(["export", "ct"]) == 78


def test_destination_that_is_a_file_exits_73(src: Path, tmp_path: Path) -> None:
    cfg = write_config_file(tmp_path, src)
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    assert main(["--config", str(cfg), "export", "ct", "--to", str(taken)]) == 73
    assert taken.read_text() == "a file\n"


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (root only); all unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_read_only_destination_exits_73_and_leaves_nothing(
    src: Path,
    tmp_path: Path,
    mount_tmpfs: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = write_config_file(tmp_path, src)
    target = mount_tmpfs("ro,size=1m")
    assert main(["--config", str(cfg), "export", "ct", "--to", str(target)]) == 73
    assert "Read-only file system" in capsys.readouterr().err
    assert list(target.iterdir()) == []


def many_sources(root: Path, n: int) -> dict[str, bytes]:
    """``n`` CT files under ``root``; returns what the mount serves, by view path."""
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    rels = []
    for i in range(n):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        rel = f"series{i % 3}/im{i:03d}.dcm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(root / rel)
        rels.append(rel)
    return expected_tree(root, rels)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_stops_with_complete_files_and_no_temporary_file(
    tmp_path: Path,
    mount_tmpfs: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    want = many_sources(src, 120)  # about 4 MB of views
    assert sum(map(len, want.values())) > 3 * 1024 * 1024
    cfg = write_config_file(tmp_path, src)
    target = mount_tmpfs("size=2m")
    argv = ["--config", str(cfg), "export", "ct", "--to", str(target), "--workers", workers]
    assert main(argv) == 75
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err
    assert "run the same export again to resume" in captured.err
    assert "short" not in captured.err  # a short write on a full disk is finished, not lost
    have = tree(target / "ct")
    assert 0 < len(have) < len(want)
    for rel, data in have.items():
        assert data == want[rel]  # complete, never partial
    assert temp_files(target) == []
    assert manifests(target / "ct") == []


def test_a_source_changing_during_export_is_tried_again(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_writer.write_view_fd
    changes = {"left": 1}

    def touching(view: Any, src_fd: int, out: int) -> None:
        real(view, src_fd, out)
        if changes["left"]:
            changes["left"] -= 1
            st = os.fstat(src_fd)
            os.utime(src_fd, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a writer came by

    monkeypatch.setattr(export_writer, "write_view_fd", touching)
    summary = run_export(make_config(tmp_path, src))
    assert (summary.written, summary.failed) == (6, 0)
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)


def test_a_source_that_keeps_changing_is_reported_failed(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_writer.write_view_fd
    victim = os.stat(src / SOURCES[0]).st_ino

    def touching(view: Any, src_fd: int, out: int) -> None:
        real(view, src_fd, out)
        st = os.fstat(src_fd)
        if st.st_ino == victim:
            os.utime(src_fd, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    monkeypatch.setattr(export_writer, "write_view_fd", touching)
    summary = run_export(make_config(tmp_path, src))
    assert (summary.written, summary.failed) == (5, 1)
    dest = tmp_path / "export" / "ct"
    assert tree(dest) == expected_tree(src, SOURCES[1:])
    assert temp_files(tmp_path) == []


@pytest.mark.slow
def test_sigkill_mid_export_then_the_next_run_completes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    want = many_sources(src, 150)
    cfg = write_config_file(tmp_path, src)
    dest = tmp_path / "export" / "ct"
    code = (
        "import sys; from pathlib import Path; import deidfs.cli.common as c;"
        f"c.DEFAULT_CONFIG_PATH = Path({str(tmp_path / 'none.toml')!r});"
        "from deidfs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEIDFS_CONFIG"}
    argv = ["--config", str(cfg), "export", "ct", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--workers", "1"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(dest.rglob("*.dcm"))) < 5 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export ended before it could be killed"
    visible = {rel: data for rel, data in tree(dest).items() if not is_temp_name(Path(rel).name)}
    assert 0 < len(visible) < len(want)
    for rel, data in visible.items():
        assert data == want[rel]  # complete, never partial
    assert manifests(dest) == []
    hidden = [p for p in dest.rglob(".*") if p.is_file()]
    assert all(is_temp_name(p.name) for p in hidden)
    # One more left by a dead writer, wherever the kill came: the next run removes it.
    (dest / f".deidfs-{proc.pid}-0123456789ab.tmp").write_bytes(b"partial")
    assert main([*argv, "--workers", "2"]) == 0
    assert tree(dest) == want
    assert temp_files(dest) == []
    [manifest] = manifests(dest)
    assert len(manifest.read_text().splitlines()) == len(want) + 1


def test_workers_start_through_a_fork_server_when_threads_run(src: Path, tmp_path: Path) -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait, name="a daemon's thread")
    other.start()
    try:
        assert export_workers.pool_context().get_start_method() == "forkserver"
        summary = run_export(make_config(tmp_path, src), workers=2)
    finally:
        release.set()
        other.join()
    assert summary.written == 6
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)
    assert export_workers.pool_context().get_start_method() == "fork"


def test_a_stop_request_cancels_and_leaves_no_temporary_file(src: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(ExportStopped) as caught:
        run_export(make_config(tmp_path, src), stop=stop, workers=2)
    assert caught.value.exit_code == 75
    assert caught.value.summary is not None
    assert not caught.value.summary.complete
    assert temp_files(tmp_path) == []


def test_summary_json_round_trip() -> None:
    summary = ExportSummary(
        folder="ct",
        profile="Basic",
        plan_digest="d",
        destination="/x/ct",
        sources=9,
        selected=8,
        files=7,
        written=3,
        replaced=1,
        unchanged=4,
        failed=1,
        duplicates=1,
        refused=(("not_dicom", 1),),
        bytes=123,
        seconds=1.5,
        manifest="/x/ct/.deidfs-manifest-20260101T000000Z.jsonl",
    )
    data = json.loads(json.dumps(summary.to_json()))
    for key in ("folder", "destination", "files", "written", "unchanged", "failed", "bytes"):
        assert key in data
    assert ExportSummary.from_json(data) == summary
    as_fields = json.loads(json.dumps(dataclasses.asdict(summary)))
    assert ExportSummary.from_json(as_fields) == summary


def test_a_destination_inside_the_folder_is_refused(src: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, src)
    for to in (src, src / "exports"):
        with pytest.raises(ExportRefused, match="inside watched folder 'ct'") as refused:
            run_export(config, to=to)
        assert refused.value.exit_code == 77
    assert not (src / "ct").exists()
    assert not (src / "exports").exists()


def test_views_the_caller_holds_are_not_rendered_again(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    held = {}
    for rel in SOURCES:
        view = render_path(src / rel, plan, PSEUDO, Layout.DICOM, PurePosixPath(rel))
        held[(str(src / rel), view.source)] = view

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered although the view was held")

    monkeypatch.setattr(export_workers, "render", no_render)
    monkeypatch.setattr(export_writer, "render", no_render)
    config = make_config(tmp_path, src)
    summary = run_export(
        config,
        selection=Selection(study=(study_uid(1), PSEUDO.uid(study_uid(3)))),
        cached=lambda path, state: held.get((path, state)),
    )
    assert summary.written == 4
    rels = [rel for rel in SOURCES if not rel.startswith("alphason_anna/head_ct")]
    assert tree(tmp_path / "export" / "ct") == expected_tree(src, rels)
    # Held views are for the folder's own profile: another profile renders (here: fails).
    other = run_export(
        config, profile="HIPAA", to=tmp_path / "h", cached=lambda p, s: held.get((p, s))
    )
    assert (other.written, other.failed) == (0, 7)  # every source went to render


def test_header_walk_reads_what_pydicom_reads() -> None:
    # Every local pydicom test file (never a download) that renders.
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    walked = 0
    for profile in ("Basic",):
        plan = compile_plan(BUILTIN_PROFILES[profile])
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    view = render_path(path, plan, PSEUDO, Layout.FLAT)
            except Refused:  # withheld, or not DICOM at all
                continue
            ids = export_selection.served_ids(view)
            ds = pydicom.dcmread(io.BytesIO(view.header), stop_before_pixels=True, force=True)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
                assert getattr(ids, keyword) == str(ds.get(keyword, "")).strip(" \x00"), path
            try:
                export_selection._walk_values(view.header, export_selection._ID_TAGS)
                walked += 1
            except export_selection._Malformed:
                pass  # deflated: read by pydicom above
    assert walked > 100


# -- through the daemon's control socket --------------------------------------------------------
def test_via_daemon_without_a_daemon_exits_69(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config_file(tmp_path, src)
    assert main(["--config", str(cfg), "export", "ct", "--via-daemon"]) == 69
    assert "not running" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def export_handler(config: Config) -> Callable[[Request], Reply]:
    """The daemon's ``export`` command, as the service wires it."""

    def handle(request: Request) -> Reply:
        try:
            req = ExportRequest.from_args(request.args)
        except ValueError as exc:
            return Reply.failure(ErrorCode.BAD_REQUEST, str(exc))
        try:
            summary = export_folder(
                config,
                req.folder,
                PSEUDO,
                selection=Selection(req.study, req.patient, req.accession, req.path),
                to=Path(req.to) if req.to else None,
                profile=req.profile,
                workers=req.workers,
                confine=True,
            )
        except NotFound as exc:
            return Reply.failure(ErrorCode.NOT_FOUND, str(exc))
        except DeidfsError as exc:
            return Reply.failure(ErrorCode.FAILED, str(exc), [f"exit_code={exc.exit_code}"])
        return Reply.success(summary.to_json())

    return handle


def test_via_daemon_exports_with_the_daemons_key(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config_file(tmp_path, src)
    config = make_config(tmp_path, src)
    (tmp_path / "state" / "secret.key").unlink()  # the operator's shell cannot read a key
    server = ControlServer(tmp_path / "control.sock", {"export": export_handler(config)})
    server.start()
    try:
        base = ["--config", str(cfg), "export", "ct", "--via-daemon"]
        assert main([*base, "--patient", "PAT-BETA-0002"]) == 0
        out = capsys.readouterr().out
        assert "written          2" in out
        assert "manifest: " in out
        rels = [rel for rel in SOURCES if rel.startswith("betamann_bert/")]
        assert tree(tmp_path / "export" / "ct") == expected_tree(src, rels)
        assert main([*base, "--study", "1.2.3.4.5"]) == 66
        assert main([*base, "--to", str(tmp_path / "elsewhere")]) == 77
        assert main([*base, "--no-fsync"]) == 2
    finally:
        server.stop()
    assert not (tmp_path / "state" / "secret.key").exists()


# -- a real mount -------------------------------------------------------------------------------
@pytest.mark.fuse
def test_export_bytes_equal_the_bytes_the_mount_serves(
    daemon_factory: Callable[..., Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemon_factory().start()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        d.add(sample_file(name), f"in/{name}")
    views = d.wait_views(3)
    argv = ["--config", str(d.config_path), "export", "samples", "--workers", "2"]
    assert main(argv) == 0
    dest = d.export / "samples"
    exported = tree(dest)
    served = {p.relative_to(d.folder).as_posix(): p.read_bytes() for p in views}
    assert exported == served
    assert len(manifests(dest)) == 1
    assert main(["--config", str(d.config_path), "verify", "samples", "--export"]) == 0
    assert "ok: no findings" in capsys.readouterr().out
    # The same through the daemon, with its key: the key file is not this shell's business.
    via = d.export / "via"
    assert main([*argv, "--via-daemon", "--to", str(via)]) == 0
    assert "written          3" in capsys.readouterr().out
    assert tree(via / "samples") == served
    assert main([*argv, "--via-daemon", "--study", "1.2.3.4.5"]) == 66
    assert main([*argv, "--via-daemon", "--to", str(d.root / "outside")]) == 77
    assert not (d.root / "outside").exists()


# -- durable writes in groups -------------------------------------------------------------------
def _view_fsyncs(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[int]:
    """Record every fsync of a view's file (not of a directory, nor of the manifest in
    ``folder``) from now on."""
    fsynced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular and Path(os.readlink(f"/proc/self/fd/{fd}")).parent != folder:
            fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(export_writer.os, "fsync", fsync)
    return fsynced


def test_durable_files_are_flushed_in_groups_of_syncfs(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six views, groups of two: three syncfs calls and no fsync of a file, every file whole
    under its name, no temporary file left."""
    real = export_files._syncfs_function()
    assert real is not None  # glibc on Linux has syncfs
    calls: list[int] = []

    def counting(fd: int) -> int:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(export_commits, "MAX_PENDING", 2)
    monkeypatch.setattr(export_files, "_syncfs_function", lambda: counting)
    fsynced = _view_fsyncs(monkeypatch, tmp_path / "export" / "ct")
    summary = run_export(make_config(tmp_path, src), durable=True)
    assert (summary.written, summary.failed) == (6, 0)
    assert len(calls) == 3
    assert fsynced == []  # directories are still flushed one by one, files never
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)
    assert temp_files(tmp_path) == []


def test_a_failing_syncfs_falls_back_to_fsync_per_file(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_files, "_syncfs_function", lambda: lambda fd: -1)
    fsynced = _view_fsyncs(monkeypatch, tmp_path / "export" / "ct")
    summary = run_export(make_config(tmp_path, src), durable=True)
    assert (summary.written, summary.failed) == (6, 0)
    assert len(fsynced) == 6
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("durable", [True, False])
def test_durable_views_start_their_writeback_as_they_are_written(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """Each durable view's pages are handed to the disk right after it is written (the real
    sync_file_range call succeeds on each file); a writer that does not flush asks for none."""
    real = export_files._sync_file_range_function()
    assert real is not None  # glibc on Linux has sync_file_range
    returned: list[int] = []

    def counting(fd: int, offset: int, nbytes: int, flags: int) -> int:
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        returned.append(real(fd, offset, nbytes, flags))
        return returned[-1]

    monkeypatch.setattr(export_files, "_sync_file_range_function", lambda: counting)
    summary = run_export(make_config(tmp_path, src), durable=durable)
    assert (summary.written, summary.failed) == (6, 0)
    assert returned == ([0] * 6 if durable else [])
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)


# -- unnamed files ------------------------------------------------------------------------------
def test_views_have_no_name_until_they_are_flushed(src: Path, tmp_path: Path) -> None:
    """A durable view is written to an unnamed file (O_TMPFILE): until the group flush the
    directory holds no entry for it at all, so a killed writer leaves nothing behind."""
    out = tmp_path / "out"
    writer = export_writer.ExportWriter(out, durable=True)
    writer.check_root()
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    views = [writer.put_path(i, src / rel, plan, PSEUDO) for i, rel in enumerate(SOURCES)]
    before = [p for p in out.rglob("*") if p.is_file()]
    assert before == []  # directories exist, no file is named yet
    results = writer.finish()
    assert sorted(r.outcome.value for r in results if r.outcome) == ["written"] * 6
    for view in views:
        assert (out / view.relpath).stat().st_size == view.size
    assert temp_files(out) == []


def test_without_unnamed_files_named_temporaries_are_used(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No /proc (or no O_TMPFILE): dotfile temporaries renamed into place, the same result."""
    monkeypatch.setattr(export_writer, "_proc_fd_dir", lambda: None)
    out = tmp_path / "out"
    writer = export_writer.ExportWriter(out, durable=True)
    writer.check_root()
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    for i, rel in enumerate(SOURCES):
        writer.put_path(i, src / rel, plan, PSEUDO)
    assert len(temp_files(out)) == 6  # named, hidden, until the flush
    writer.finish()
    assert temp_files(out) == []
    summary = run_export(make_config(tmp_path, src), durable=True)
    assert (summary.written, summary.failed) == (6, 0)
    assert tree(tmp_path / "export" / "ct") == expected_tree(src)
