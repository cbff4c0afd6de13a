"""``verify``: served files against their originals (leaks, UIDs, pixel data, other files)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import SAMPLE_NAMES, Daemon, sample_file
from deidfs.cli.main import main
from deidfs.config import FolderConfig, load_config
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, HIPAA, Profile, Rule
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.render import Layout, render_path, write_view
from deidfs.report import render_folder
from deidfs.secret import load_or_create_key
from deidfs.verify import Verification, verify_tree
from leak_corpus import KEY, UID_ROOT, build_leak_dataset, make_image, write_source

MARKED_NAME = "Marker^Leaky^MRK0777771"


def build_originals(root: Path) -> Path:
    """Two patients' images (one referencing another), the leak corpus, pydicom samples."""
    folder = root / "originals"
    study = f"{UID_ROOT}50"
    first = make_image(f"{study}.1.1", study=study, series=f"{study}.1", patient_name=MARKED_NAME)
    write_source(folder, "p1/first.dcm", first)
    second = make_image(f"{study}.1.2", study=study, series=f"{study}.1", patient_name=MARKED_NAME)
    ref = Dataset()
    ref.ReferencedSOPClassUID = first.SOPClassUID
    ref.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])
    second.OtherPatientIDs = "OTHER-ID-42"
    write_source(folder, "p1/second.dcm", second)
    other = make_image(
        f"{UID_ROOT}60.1.1",
        study=f"{UID_ROOT}60",
        series=f"{UID_ROOT}60.1",
        patient_id="PID-0002",
        patient_name="Roe^Richard",
        PatientWeight="81.5",
        PatientSex="M",
    )
    write_source(folder, "p2/image.dcm", other)
    corpus = build_leak_dataset()
    write_source(folder, "corpus/leak.dcm", corpus.ds)
    for name in (*SAMPLE_NAMES, "image_dfl.dcm"):  # the last one is deflated
        shutil.copyfile(sample_file(name), folder / name)
    (folder / "notes.txt").write_text("Doe^John, PID-0001\n")
    return folder


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_originals(tmp_path_factory.mktemp("verify"))


def folder_of(path: Path, profile: str = "Basic", layout: Layout = Layout.DICOM) -> FolderConfig:
    return FolderConfig(id="ct", path=path, profile=profile, layout=layout)


def export_tree(folder: FolderConfig, profile: Profile, pseudo: Pseudonymizer, dest: Path) -> int:
    """Write every view the way ``deidfs export`` does; returns the number of files."""
    n = 0
    for outcome in render_folder(folder, compile_plan(profile), pseudo):
        if outcome.view is None:
            continue
        out = dest / outcome.view.relpath
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(outcome.path, os.O_RDONLY)
        try:
            with open(out, "wb") as f:
                write_view(outcome.view, fd, f)
        finally:
            os.close(fd)
        n += 1
    return n


def run(folder: FolderConfig, profile: Profile, tree: Path) -> Verification:
    return verify_tree(folder, compile_plan(profile), Pseudonymizer(KEY), tree)


def kinds(result: Verification) -> set[tuple[str, str]]:
    return {(f.kind.value, f.keyword) for f in result.findings}


PROFILES = {
    "Basic": BASIC,
    "HIPAA": HIPAA,
    "options": BASIC.derive(
        "Options",
        options=frozenset(
            {
                Option.RETAIN_SAFE_PRIVATE,
                Option.CLEAN_DESCRIPTORS,
                Option.RETAIN_DEVICE_IDENTITY,
                Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
                Option.CLEAN_STRUCTURED_CONTENT,
            }
        ),
    ),
    "retain_uids": BASIC.derive("Uids", options=frozenset({Option.RETAIN_UIDS})),
}


@pytest.mark.parametrize("name", list(PROFILES))
def test_a_faithful_export_passes(originals: Path, tmp_path: Path, name: str) -> None:
    """No finding on correct output, leak corpus included: every exemption is sound."""
    profile = PROFILES[name]
    folder = folder_of(originals, profile.name)
    served = export_tree(folder, profile, Pseudonymizer(KEY), tmp_path / "tree")
    result = run(folder, profile, tmp_path / "tree")
    assert result.findings == (), kinds(result)
    assert result.ok
    assert result.matched == served == result.served_files == 8
    assert result.withheld == 1  # notes.txt
    assert result.not_served == 0
    assert result.values_searched > 500
    assert result.pixel_checked == 7  # every image; rtplan has no pixels
    if profile is not PROFILES["retain_uids"]:
        assert result.uids_checked > 20
        assert result.references_checked >= 1  # second.dcm -> first.dcm


def test_a_served_copy_edited_to_hold_an_original_value_is_found(
    originals: Path, tmp_path: Path
) -> None:
    folder = folder_of(originals)
    pseudo = Pseudonymizer(KEY)
    tree = tmp_path / "tree"
    export_tree(folder, BASIC, pseudo, tree)
    view = render_path(originals / "p2" / "image.dcm", compile_plan(BASIC), pseudo)
    path = tree / view.relpath
    data = path.read_bytes()
    token = pseudo.token("PID-0002", "patient").encode()  # what Basic serves as the name
    assert data.count(token) >= 2  # Patient ID and Patient's Name (and the path)
    leaked = b"Roe^Richard".ljust(len(token))
    at = data.index(token, data.index(b"\x10\x00\x10\x00"))  # (0010,0010) Patient's Name
    path.write_bytes(data[:at] + leaked + data[at + len(token) :])
    result = run(folder, BASIC, tree)
    assert not result.ok
    assert kinds(result) == {("value_in_header", "PatientName")}
    (finding,) = result.findings
    assert finding.tag == "(0010,0010)"
    assert finding.file == pseudo.token(str(originals / "p2" / "image.dcm"), "path")


def test_an_export_made_with_a_keeping_rule_is_found(originals: Path, tmp_path: Path) -> None:
    """A custom rule keeping a marker-bearing attribute, checked against the folder's Basic."""
    keeping = BASIC.derive(
        "Keeping",
        rules=(
            Rule.parse("PatientName", "keep", "marker"),
            Rule.parse("OtherPatientIDs", "keep"),
            Rule.parse("PatientWeight", "keep"),
        ),
    )
    folder = folder_of(originals)
    export_tree(folder, keeping, Pseudonymizer(KEY), tmp_path / "tree")
    result = run(folder, BASIC, tmp_path / "tree")
    found = kinds(result)
    assert ("value_in_header", "PatientName") in found
    assert ("value_in_header", "OtherPatientIDs") in found
    assert ("value_retained", "PatientWeight") in found  # a number: checked structurally
    assert {k for k, _ in found} == {"value_in_header", "value_retained"}
    # The same export is correct for the profile that made it.
    assert run(folder_of(originals, "Keeping"), keeping, tmp_path / "tree").ok


def test_changed_pixels_and_inconsistent_uids_are_found(originals: Path, tmp_path: Path) -> None:
    folder = folder_of(originals)
    pseudo = Pseudonymizer(KEY)
    tree = tmp_path / "tree"
    export_tree(folder, BASIC, pseudo, tree)
    plan = compile_plan(BASIC)
    first = render_path(originals / "p1" / "first.dcm", plan, pseudo)
    second = render_path(originals / "p1" / "second.dcm", plan, pseudo)
    # A pixel byte flipped in the first image.
    path = tree / first.relpath
    data = bytearray(path.read_bytes())
    data[len(first.header) + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    # The second image's reference to the first replaced by another UID of the same length.
    served_first = pseudo.uid(f"{UID_ROOT}50.1.1").encode()
    path = tree / second.relpath
    data = bytearray(path.read_bytes())
    at = data.index(served_first)
    data[at + len(served_first) - 1] = (
        ord("1") if data[at + len(served_first) - 1] != ord("1") else ord("2")
    )
    path.write_bytes(bytes(data))
    # The third image served without its pixel data.
    third = render_path(originals / "p2" / "image.dcm", plan, pseudo)
    (tree / third.relpath).write_bytes((tree / third.relpath).read_bytes()[: len(third.header)])
    result = run(folder, BASIC, tree)
    found = kinds(result)
    differs = {f.file for f in result.findings if f.kind.value == "pixel_data_differs"}
    assert differs == {
        pseudo.token(str(originals / "p1" / "first.dcm"), "path"),
        pseudo.token(str(originals / "p2" / "image.dcm"), "path"),
    }
    assert ("reference_unresolved", "ReferencedSOPInstanceUID") in found
    assert ("uid_inconsistent", "ReferencedSOPInstanceUID") in found
    assert ("uid_inconsistent", "SOPInstanceUID") in found  # both places are named


def test_other_files_in_the_tree_are_searched(originals: Path, tmp_path: Path) -> None:
    folder = folder_of(originals)
    tree = tmp_path / "tree"
    export_tree(folder, BASIC, Pseudonymizer(KEY), tree)
    (tree / "manifest.jsonl").write_text('{"path": "x.dcm", "size": 1}\n')
    assert run(folder, BASIC, tree).ok  # a PHI-free side file is fine
    (tree / "manifest.jsonl").write_text('{"accession": "ACC12345"}\n')
    result = run(folder, BASIC, tree)
    assert kinds(result) == {("value_in_other_file", "AccessionNumber")}
    assert result.other_files == 1
    (tree / "manifest.jsonl").unlink()
    shutil.copyfile(originals / "p2" / "image.dcm", tree / "stray.dcm")
    result = run(folder, BASIC, tree)
    found = kinds(result)
    assert ("no_original", "") in found
    assert ("value_in_other_file", "PatientID") in found


def test_digests_in_a_manifest_are_not_taken_for_values(tmp_path: Path) -> None:
    """rtplan.dcm's DeviceSerialNumber ``9999`` occurs, by chance, inside a hex digest."""
    (tmp_path / "in").mkdir()
    shutil.copyfile(sample_file("rtplan.dcm"), tmp_path / "in" / "rtplan.dcm")
    folder = folder_of(tmp_path / "in")
    tree = tmp_path / "tree"
    export_tree(folder, BASIC, Pseudonymizer(KEY), tree)
    digest = "ab" * 10 + "a9999f" + "cd" * 19
    line = f'{{"type": "file", "path": "x.dcm", "sha256": "{digest}", "plan_digest": "{digest}"}}\n'
    manifest = tree / ".deidfs-manifest-20261122T074214Z.jsonl"
    manifest.write_text(line)
    result = run(folder, BASIC, tree)
    assert result.ok, result.findings
    assert result.other_files == 1
    # The same digits anywhere else in a manifest, or in a file that is no manifest, count.
    manifest.write_text(line.replace('"x.dcm"', '"serial_9999_x.dcm"'))
    assert kinds(run(folder, BASIC, tree)) == {("value_in_other_file", "DeviceSerialNumber")}
    manifest.rename(tree / "notes.jsonl")
    (tree / "notes.jsonl").write_text(line)
    assert kinds(run(folder, BASIC, tree)) == {("value_in_other_file", "DeviceSerialNumber")}


def test_a_date_inside_a_longer_number_is_no_finding(tmp_path: Path) -> None:
    """A pseudonymous UID's 39 digits hold any 8-digit date by chance, now and then."""
    src = tmp_path / "src"
    write_source(src, "a.dcm", make_image(f"{UID_ROOT}71.1.1"))  # born 19700215
    folder = folder_of(src)
    tree = tmp_path / "tree"
    export_tree(folder, BASIC, Pseudonymizer(KEY), tree)
    side = tree / "uids.txt"
    side.write_text("2.25.3141592653197002155897932384626433\n")
    result = run(folder, BASIC, tree)
    assert result.ok, result.findings
    assert result.other_files == 1
    for leak in ("born 19700215\n", "19700215\n", "197002151230\n", "1970-02-15\n"):
        side.write_text(leak)  # alone, or at the start of a date-time: a leak
        assert kinds(run(folder, BASIC, tree)) == {("value_in_other_file", "PatientBirthDate")}


def test_original_values_in_served_paths_are_found(tmp_path: Path) -> None:
    """Mirror layout keeps the originals' names; one that carries an ID is a finding."""
    src = tmp_path / "src"
    write_source(src, "PID-0001/a.dcm", make_image(f"{UID_ROOT}70.1.1"))
    folder = folder_of(src, layout=Layout.MIRROR)
    export_tree(folder, BASIC, Pseudonymizer(KEY), tmp_path / "tree")
    result = run(folder, BASIC, tmp_path / "tree")
    assert kinds(result) == {("value_in_path", "PatientID")}


def test_findings_never_carry_a_value_or_path(originals: Path, tmp_path: Path) -> None:
    keeping = BASIC.derive("Keeping", rules=(Rule.parse("PatientName", "keep"),))
    folder = folder_of(originals)
    export_tree(folder, keeping, Pseudonymizer(KEY), tmp_path / "tree")
    result = run(folder, BASIC, tmp_path / "tree")
    assert result.findings
    text = repr(result)
    for original in ("Marker", "Doe", "Roe", "PID-000", str(originals), "first.dcm", UID_ROOT):
        assert original not in text


CONFIG = """\
[daemon]
mountpoint = "{root}/mnt"
state_dir = "{root}/state"
export_dir = "{root}/export"
control_socket = "{root}/state/control.sock"
metrics_address = ""

[folders.ct]
path = "{path}"
profile = "Nominal"

[profiles.Nominal]
base = "Basic"
"""


def test_cli_verify(originals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "deidfs.toml"
    cfg.write_text(CONFIG.format(root=tmp_path, path=originals))
    config = load_config(cfg)
    base = ["--config", str(cfg), "verify", "ct"]
    assert main([*base, "--export"]) == 66  # no key yet: nothing was ever served
    pseudo = Pseudonymizer(load_or_create_key(config.daemon.state_dir))
    folder = config.folders["ct"]
    export_tree(folder, config.profiles["Nominal"], pseudo, tmp_path / "export" / "ct")
    capsys.readouterr()
    assert main([*base, "--export"]) == 0
    out = capsys.readouterr().out
    assert "ok: no findings" in out
    assert "8 checked against their originals" in out
    assert main(base) == os.EX_UNAVAILABLE  # nothing mounted
    assert "not mounted" in capsys.readouterr().err
    # A leak: an edited copy in an export tree named explicitly.
    elsewhere = tmp_path / "copy"
    shutil.copytree(tmp_path / "export" / "ct", elsewhere)
    view = render_path(originals / "p2" / "image.dcm", compile_plan(BASIC), pseudo)
    path = elsewhere / view.relpath
    data = path.read_bytes()
    token = pseudo.token("PID-0002", "patient").encode()
    at = data.index(token, data.index(b"\x10\x00\x10\x00"))
    path.write_bytes(data[:at] + b"Roe^Richard".ljust(len(token)) + data[at + len(token) :])
    assert main([*base, "--export", str(elsewhere)]) == 1
    out = capsys.readouterr().out
    assert "value_in_header" in out
    assert "PatientName" in out
    assert "Roe" not in out
    assert str(originals) not in out
    assert main([*base, "--export", str(elsewhere), "--json"]) == 1
    assert '"kind": "value_in_header"' in capsys.readouterr().out
    assert main([*base, "--export", str(tmp_path / "export")]) == 0  # an export directory
    assert f"at {tmp_path / 'export' / 'ct'}:" in capsys.readouterr().out


@pytest.mark.fuse
def test_verify_a_real_mount(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory().start()
    originals = build_originals(tmp_path / "src")
    for path in sorted(originals.rglob("*.dcm")):
        d.add(path, str(path.relative_to(originals)))
    d.wait_views(8)
    config = d.config()
    folder = config.folders["samples"]
    pseudo = Pseudonymizer(load_or_create_key(d.state))
    result = verify_tree(folder, compile_plan(config.profiles[folder.profile]), pseudo, d.folder)
    assert result.findings == (), kinds(result)
    assert result.matched == 8
    assert result.pixel_checked == 7
    assert main(["--config", str(d.config_path), "verify", "samples"]) == 0


def test_sequences_dummied_where_their_iod_requires_them_are_no_finding(tmp_path: Path) -> None:
    """X/D and X/Z/D keep a Type 1 sequence's items, de-identified (Waveform Annotation
    Sequence in an ECG, Referenced Performed Procedure Step Sequence in a Segmentation):
    verify decides by the same place in the IOD, so their kept codes are no finding."""
    folder_path = tmp_path / "originals"
    for name in ("waveform_ecg.dcm", "liver_1frame.dcm"):
        ds = dcmread(sample_file(name))
        if name == "liver_1frame.dcm":
            step = Dataset()
            step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
            step.ReferencedSOPInstanceUID = f"{UID_ROOT}70.1"
            ds.ReferencedPerformedProcedureStepSequence = Sequence([step])
        write_source(folder_path, name, ds)
    folder = folder_of(folder_path)
    assert export_tree(folder, BASIC, Pseudonymizer(KEY), tmp_path / "tree") == 2
    served = {p.name: dcmread(p) for p in (tmp_path / "tree").rglob("*") if p.is_file()}
    ecg = next(ds for ds in served.values() if ds.Modality == "ECG")
    seg = next(ds for ds in served.values() if ds.Modality == "SEG")
    assert len(ecg.WaveformAnnotationSequence) > 0
    assert len(seg.ReferencedPerformedProcedureStepSequence) == 1
    result = run(folder, BASIC, tmp_path / "tree")
    assert result.findings == (), kinds(result)
