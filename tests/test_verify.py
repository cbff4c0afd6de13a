"""``verify``: served files against their originals (leaks, UIDs, pixel data, other files)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from conftest import SAMPLE_NAMES, Daemon, run_cli, sample_file
from deidfs.cli.main import main
from deidfs.config.load import load_config
from deidfs.config.model import FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, HIPAA, Profile, Rule
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.deid.tags import format_tag, parse_tag
from deidfs.evidence.findings import Verification
from deidfs.evidence.report import render_folder
from deidfs.evidence.verify import verify_tree
from deidfs.secret import load_or_create_key
from deidfs.view.render import Layout, render_path, write_view
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
    # What an option keeps is listed, never a finding; the direct identifiers among it
    # (device serial numbers, station names, UIDs) fail until the profile accepts them.
    assert all(k.source.startswith("option ") for k in result.kept)
    assert bool(result.kept) == bool(profile.options)
    if result.failing_kept:
        assert name in ("options", "retain_uids")
        accepting = replace(profile, accepted=frozenset(parse_tag(k.tag) for k in result.kept))
        result = run(folder, accepting, tmp_path / "tree")
        assert not result.failing_kept
        assert all(k.accepted for k in result.kept)
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
    # The same export is faithful to the profile that made it, which keeps a direct
    # identifier: not a leak, but no pass until the profile accepts it.
    result = run(folder_of(originals, "Keeping"), keeping, tmp_path / "tree")
    assert result.findings == ()
    assert {(k.keyword, k.source, k.direct) for k in result.failing_kept} == {
        ("PatientName", "custom rule", "name"),
        ("OtherPatientIDs", "custom rule", "id"),
    }
    assert not result.ok
    accepting = replace(keeping, accepted=frozenset({0x00100010, 0x00101000}))
    assert run(folder_of(originals, "Keeping"), accepting, tmp_path / "tree").ok


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


# -- issue 16.2: bytes judged by what they are; identifiers the profile keeps --------------
PLANTED = "Planted^Leaky^MRK0555"  #: a patient's name, also written under a kept tag
DEVICE = "Stent Deployer MRK0556"  #: a description Retain Device Identity keeps
#: Values that must never reach any output of verify.
SECRETS = ("MRK0555", "Planted", "Leaky", "MRK0556", "Stent", "Doe", "Roe", "PID-000")
ENCODINGS = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "big": ExplicitVRBigEndian,
}


def _element_bytes(tag: int, vr: str, value: bytes, ts: str) -> bytes:
    """One element as ``ts`` encodes it (values of even length)."""
    order = "big" if ts == ExplicitVRBigEndian else "little"
    head = (tag >> 16).to_bytes(2, order) + (tag & 0xFFFF).to_bytes(2, order)
    if ts == ImplicitVRLittleEndian:
        return head + len(value).to_bytes(4, order) + value
    return head + vr.encode() + len(value).to_bytes(2, order) + value


def _plant(path: Path, tag: int, vr: str, value: bytes, ts: str) -> None:
    """Insert an element at the start of a served file's data set (its first tag is later)."""
    data = path.read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")  # after the file meta group
    order = "big" if ts == ExplicitVRBigEndian else "little"
    first = int.from_bytes(data[start : start + 2], order) << 16 | int.from_bytes(
        data[start + 2 : start + 4], order
    )
    assert first > tag
    path.write_bytes(data[:start] + _element_bytes(tag, vr, value, ts) + data[start:])


def _verify_config(tmp_path: Path, source: Path, profile_lines: str = "") -> list[str]:
    cfg = tmp_path / "deidfs.toml"
    cfg.write_text(CONFIG.format(root=tmp_path, path=source) + profile_lines)
    return ["--config", str(cfg), "verify", "ct", "--export"]


def _export_configured(tmp_path: Path) -> Pseudonymizer:
    config = load_config(tmp_path / "deidfs.toml")
    pseudo = Pseudonymizer(load_or_create_key(config.daemon.state_dir))
    folder = config.folders["ct"]
    dest = tmp_path / "export" / "ct"
    if dest.exists():
        shutil.rmtree(dest)
    export_tree(folder, config.profiles[folder.profile], pseudo, dest)
    return pseudo


def _no_secret(*outputs: str) -> None:
    for text in outputs:
        for secret in SECRETS:
            assert secret not in text


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the planted values
@pytest.mark.parametrize(
    ("tag", "vr"),
    [(0x00080008, "CS"), (0x00080008, "PN"), (0x00001030, "AE")],
    ids=["name-as-image-type", "name-as-image-type-PN", "name-as-command"],
)
@pytest.mark.parametrize("ts", list(ENCODINGS.values()), ids=list(ENCODINGS))
def test_a_leak_planted_under_a_mistagged_attribute_is_found(
    tmp_path: Path, tag: int, vr: str, ts: str
) -> None:
    """The source holds a patient's name under a tag Basic keeps (Image Type, or a command
    element). The engine removes it, so verify passes what it serves; a served copy that
    holds it again is a leak: found, exit 1, and no value in any output. Before, the
    misplaced copy counted as kept and exempted the name itself from the search."""
    src = tmp_path / "src"
    ds = make_image(f"{UID_ROOT}80.1.1", patient_name=PLANTED)
    value = PLANTED.encode() + b" "
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[tag] = DataElement(tag, vr, value)
    if ts == ImplicitVRLittleEndian and vr == "PN":
        pytest.skip("implicit VR writes no VR: the same file as the CS case")
    if ts == ExplicitVRBigEndian and tag >> 16 == 0:
        pytest.skip("command elements are written little endian: no servable source")
    write_source(src, "a.dcm", ds, ts)
    base = _verify_config(tmp_path, src)
    pseudo = _export_configured(tmp_path)
    (served,) = (tmp_path / "export" / "ct").rglob("*.dcm")
    assert b"MRK0555" not in served.read_bytes()  # the engine removed the misplaced copy
    done = run_cli(base, tmp_path, "faithful")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: no findings" in done.stdout
    _plant(served, tag, vr, value, ts)  # hand-edited: the misplaced copy served again
    done = run_cli(base, tmp_path, "planted")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "value_in_header" in done.stdout
    assert "value_untrusted" in done.stdout
    assert format_tag(tag) in done.stdout
    _no_secret(done.stdout, done.stderr)
    done = run_cli([*base, "--json"], tmp_path, "planted-json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    token = pseudo.token(str(src / "a.dcm"), "path")
    untrusted = [f for f in doc["findings"] if f["kind"] == "value_untrusted"]
    assert [(f["tag"], f["file"]) for f in untrusted] == [(format_tag(tag), token)]
    reason = "misplaced" if tag >> 16 == 0 else ("vr" if vr == "PN" else "repertoire")
    assert untrusted[0]["reason"] == reason
    assert any(f["kind"] == "value_in_header" for f in doc["findings"])
    _no_secret(done.stdout, done.stderr)


KEEP_NAME = """
[[profiles.Nominal.rules]]
id = "PatientName"
act = "keep"
note = "study needs names"
"""


def test_a_rule_keeping_patients_name_fails_unless_accepted(tmp_path: Path) -> None:
    """A faithful export under a profile that keeps Patient's Name: no leak, but a direct
    identifier kept by a custom rule, exit 1, until the profile lists it as accepted."""
    src = tmp_path / "src"
    for n in (1, 2):
        write_source(src, f"{n}.dcm", make_image(f"{UID_ROOT}81.1.{n}", patient_name=PLANTED))
    base = _verify_config(tmp_path, src, KEEP_NAME)
    _export_configured(tmp_path)
    done = run_cli(base, tmp_path, "kept-name")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if "PatientName" in x]
    assert "(0010,0010)" in line
    assert "custom rule" in line
    assert "2 files" in line
    assert "FAIL: direct identifier (name), not accepted" in line
    assert "findings:" not in done.stdout  # no leak: the profile keeps it
    _no_secret(done.stdout, done.stderr)
    done = run_cli([*base, "--json"], tmp_path, "kept-name-json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert doc["findings"] == []
    assert doc["kept"] == [
        {
            "tag": "(0010,0010)",
            "keyword": "PatientName",
            "source": "custom rule",
            "files": 2,
            "direct": "name",
            "accepted": False,
            "fails": True,
        }
    ]
    _no_secret(done.stdout, done.stderr)
    # Accepted: served on purpose, shown as such, exit 0.
    base = _verify_config(
        tmp_path, src, KEEP_NAME.replace("[[", 'accepted = ["(0010,0010)"]\n[[', 1)
    )
    done = run_cli(base, tmp_path, "accepted-name")
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if "PatientName" in x]
    assert line.rstrip().endswith("accepted")
    assert "ok: no findings" in done.stdout
    _no_secret(done.stdout, done.stderr)
    done = run_cli([*base, "--json"], tmp_path, "accepted-name-json")
    assert done.returncode == 0
    (kept,) = json.loads(done.stdout)["kept"]
    assert (kept["accepted"], kept["fails"]) == (True, False)
    cfg = base[1]
    done = run_cli(["--config", cfg, "report", "Nominal"], tmp_path, "report")
    assert done.returncode == 0, done.stderr
    assert "| Accepted identifiers (served on purpose) | (0010,0010) |" in done.stdout
    (row,) = [x for x in done.stdout.splitlines() if x.startswith("| (0010,0010) |")]
    assert "accepted" in row
    _no_secret(done.stdout, done.stderr)


def test_a_description_kept_by_an_option_is_listed_but_passes(tmp_path: Path) -> None:
    """Retain Device Identity keeps Device Description, which Basic removes: listed with
    the option that keeps it and its file count, not a direct identifier, exit 0."""
    src = tmp_path / "src"
    write_source(src, "a.dcm", make_image(f"{UID_ROOT}82.1.1", DeviceDescription=DEVICE))
    write_source(src, "b.dcm", make_image(f"{UID_ROOT}82.1.2"))
    base = _verify_config(tmp_path, src, 'options = ["retain_device_identity"]\n')
    _export_configured(tmp_path)
    done = run_cli(base, tmp_path, "kept-description")
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if "DeviceDescription" in x]
    assert "(0050,0020)" in line
    assert "option retain_device_identity" in line
    assert "1 file " in line
    assert line.rstrip().endswith("not direct")
    assert "ok: no findings" in done.stdout
    _no_secret(done.stdout, done.stderr)
    done = run_cli([*base, "--json"], tmp_path, "kept-description-json")
    assert done.returncode == 0
    doc = json.loads(done.stdout)
    assert doc["ok"] is True
    assert doc["kept"] == [
        {
            "tag": "(0050,0020)",
            "keyword": "DeviceDescription",
            "source": "option retain_device_identity",
            "files": 1,
            "direct": None,
            "accepted": False,
            "fails": False,
        }
    ]
    _no_secret(done.stdout, done.stderr)


def test_kept_identifiers_name_what_keeps_them(tmp_path: Path) -> None:
    """A disabled attribute, and a custom rule keeping a sequence Basic removes: each value
    served is listed with what keeps it (the rule on the enclosing sequence for the values
    inside it); the same attribute kept two ways is two entries."""
    src = tmp_path / "src"
    other = Dataset()
    other.PatientID = "OTHER-MRK0557"
    other.TypeOfPatientID = "TEXT"
    for n in (1, 2):
        ds = make_image(f"{UID_ROOT}83.1.{n}")
        if n == 1:
            ds.OtherPatientIDsSequence = Sequence([other])
        write_source(src, f"{n}.dcm", ds)
    profile = BASIC.derive(
        "Kept",
        disabled=frozenset({0x00100020}),
        rules=(Rule.parse("OtherPatientIDsSequence", "keep"),),
    )
    folder = folder_of(src, "Kept")
    export_tree(folder, profile, Pseudonymizer(KEY), tmp_path / "tree")
    result = run(folder, profile, tmp_path / "tree")
    assert result.findings == ()
    assert {(k.tag, k.source, k.files, k.direct) for k in result.kept} == {
        ("(0010,0020)", "disabled", 2, "id"),
        ("(0010,0020)", "custom rule on (0010,1002)", 1, "id"),
        ("(0010,0022)", "custom rule on (0010,1002)", 1, ""),
    }
    assert not result.ok
    accepting = replace(profile, accepted=frozenset({0x00100020}))
    result = run(folder, accepting, tmp_path / "tree")
    assert result.ok
    assert all(k.accepted for k in result.kept if k.direct)
    assert "MRK0557" not in repr(result)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the planted value
def test_a_short_untrusted_value_served_as_the_source_has_it_is_found(tmp_path: Path) -> None:
    """Too short to search for, a value Image Type cannot hold is checked structurally:
    served with the source's value where the engine removes it, it is a finding."""
    src = tmp_path / "src"
    ds = make_image(f"{UID_ROOT}84.1.1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[0x00080008] = DataElement(0x00080008, "CS", b"Ro^ ")
    write_source(src, "a.dcm", ds)
    folder = folder_of(src)
    export_tree(folder, BASIC, Pseudonymizer(KEY), tmp_path / "tree")
    assert run(folder, BASIC, tmp_path / "tree").ok  # removed by the engine
    (served,) = (tmp_path / "tree").rglob("*.dcm")
    _plant(served, 0x00080008, "CS", b"Ro^ ", ExplicitVRLittleEndian)
    result = run(folder, BASIC, tmp_path / "tree")
    assert kinds(result) == {("value_retained", "ImageType"), ("value_untrusted", "ImageType")}
    assert {f.reason for f in result.findings} == {"", "repertoire"}


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
