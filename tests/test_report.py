"""The Expert Determination report: decisions, residual risk of a real folder, withheld files."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from deidfs.cli.main import main
from deidfs.config.model import FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BASIC, Profile, Rule
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.evidence.html_page import class_size_chart, render_html
from deidfs.evidence.render import render_json, render_markdown, render_report, to_json_object
from deidfs.evidence.report import (
    DUPLICATE,
    ReportFormat,
    assess_folder,
    build_report,
)
from deidfs.view.render import Layout
from leak_corpus import KEY, UID_ROOT, file_meta, make_image, write_source

CHARACTERISTICS = BASIC.derive(
    "Characteristics", options=frozenset({Option.RETAIN_PATIENT_CHARACTERISTICS})
)
SUPPRESSED = CHARACTERISTICS.derive(
    "Suppressed",
    rules=(
        Rule.parse("PatientSex", "remove", "sex singles out patients in this cohort"),
        Rule.parse("(0010,1010)", "remove", "age singles out patients in this cohort"),
        Rule.parse("Manufacturer", "remove", "one scanner of its make"),
    ),
)
#: (patient id, name, sex, age, manufacturer): E is alone on (sex, age, manufacturer).
PATIENTS = (
    ("PID-ALPHA-1", "Alpha^Anna", "M", "045Y", "GE MEDICAL"),
    ("PID-BRAVO-2", "Bravo^Bert", "M", "045Y", "GE MEDICAL"),
    ("PID-CHARLIE-3", "Charlie^Cora", "F", "060Y", "SIEMENS"),
    ("PID-DELTA-4", "Delta^Dora", "F", "060Y", "SIEMENS"),
    ("PID-ECHO-5", "Echo^Emil", "F", "045Y", "PHILIPS"),
)
ORIGINAL_TEXTS = [
    *(p[0] for p in PATIENTS),
    *(p[1] for p in PATIENTS),
    "St Elsewhere Hospital",
    "House^Gregory",
    "ACC12345",
    "19700215",
    UID_ROOT,
    "scan-",
]


def build_folder(root: Path) -> Path:
    """Two images per patient, a non-DICOM file, an encapsulated PDF, files never taken."""
    folder = root / "originals"
    for i, (pid, name, sex, age, maker) in enumerate(PATIENTS):
        study = f"{UID_ROOT}{100 + i}"
        for j in range(2):
            ds = make_image(
                f"{study}.{j + 1}",
                study=study,
                series=f"{study}.7",
                patient_id=pid,
                patient_name=name,
                PatientSex=sex,
                PatientAge=age,
                Manufacturer=maker,
            )
            write_source(folder, f"{name.split('^')[0]}/scan-{j}.dcm", ds)
    (folder / "notes.txt").write_text("Alpha^Anna was scanned twice\n")
    pdf = Dataset()
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    pdf.SOPInstanceUID = f"{UID_ROOT}900"
    pdf.PatientID = "PID-ALPHA-1"
    pdf.EncapsulatedDocument = b"%PDF-1.4 fake"
    pdf.file_meta = file_meta(pdf.SOPClassUID, pdf.SOPInstanceUID, ExplicitVRLittleEndian)
    write_source(folder, "Alpha/report.dcm", pdf)
    (folder / "Bravo" / "upload.dcm.part").write_bytes(b"half a file")
    (folder / "Bravo" / "UPLOAD.DCM.PARTIAL").write_bytes(b"half a file")
    # Never taken by the watcher either: a symlink, a file in a dot-directory.
    (folder / "Alpha" / "link.dcm").symlink_to(folder / "Alpha" / "scan-1.dcm")
    (folder / ".trash").mkdir()
    shutil.copyfile(folder / "Bravo" / "scan-0.dcm", folder / ".trash" / "old.dcm")
    # The same instance twice: the mount serves one view path once.
    shutil.copyfile(folder / "Alpha" / "scan-0.dcm", folder / "Alpha" / "scan-0-copy.dcm")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FolderConfig:
    path = build_folder(tmp_path_factory.mktemp("report"))
    return FolderConfig(id="ct", path=path, profile="Characteristics", layout=Layout.DICOM)


@pytest.fixture(scope="module")
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(KEY)


def fixed_now() -> dt.datetime:
    return dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)


def test_folder_risk_names_k_1_and_the_attributes_responsible(
    folder: FolderConfig, pseudo: Pseudonymizer
) -> None:
    result = assess_folder(folder, compile_plan(CHARACTERISTICS), pseudo)
    risk = result.risk
    assert result.sources == 13  # partial uploads, symlinks, dot-directories are not taken
    assert result.served == 10
    assert dict(result.withheld) == {"not_dicom": 1, "encapsulated_document": 1, DUPLICATE: 1}
    assert risk.patients == 5
    assert risk.files == 10
    assert risk.k == 1
    assert risk.unique == 1
    (unique,) = risk.unique_patients
    assert unique.patient == pseudo.token("PID-ECHO-5", "patient")
    assert unique.singled_out_by == ("Manufacturer",)
    assert set(unique.removal_sets) == {
        ("PatientSex", "Manufacturer"),
        ("PatientAge", "Manufacturer"),
    }
    responsible = {r.qi for r in risk.responsibility}
    assert responsible == {"PatientSex", "PatientAge", "Manufacturer"}
    assert {"PatientSex", "PatientAge", "Manufacturer", "Modality"} <= set(risk.retained)
    assert "InstitutionName" not in risk.retained  # Basic removes it


def test_a_profile_removing_those_attributes_yields_a_higher_k(
    folder: FolderConfig, pseudo: Pseudonymizer
) -> None:
    before = assess_folder(folder, compile_plan(CHARACTERISTICS), pseudo).risk
    after = assess_folder(folder, compile_plan(SUPPRESSED), pseudo).risk
    assert after.k is not None
    assert before.k is not None
    assert after.k > before.k
    assert after.k == 5
    assert after.unique == 0
    assert not {"PatientSex", "PatientAge", "Manufacturer"} & set(after.retained)


def test_markdown_report_has_every_section(folder: FolderConfig, pseudo: Pseudonymizer) -> None:
    report = build_report(SUPPRESSED, folder, pseudo, now=fixed_now)
    text = render_markdown(report)
    assert text.startswith("# De-identification report: profile Suppressed")
    assert "Generated 2026-11-22T10:00:00+00:00" in text
    for heading in (
        "## 1. Profile",
        "## 2. Attribute decisions",
        "## 3. Residual risk: folder ct",
        "## 4. Files withheld",
        "### Method",
    ):
        assert heading in text
    assert compile_plan(SUPPRESSED).digest in text
    assert "| k (smallest equivalence class) | 5 |" in text
    assert "configured with profile Characteristics" in text  # PROFILE differs from the folder's
    row = next(line for line in text.splitlines() if line.startswith("| (0008,0070) |"))
    assert "| Manufacturer |" in row
    assert "custom rule" in row
    assert "one scanner of its make" in row
    row = next(line for line in text.splitlines() if line.startswith("| (0010,0010) |"))
    assert "PS3.15 Table E.1-1, Basic Profile column" in row
    assert "| encapsulated_document | 1 |" in text
    assert "| not_dicom | 1 |" in text


def test_report_never_prints_an_original_value_or_path(
    folder: FolderConfig, pseudo: Pseudonymizer
) -> None:
    report = build_report(CHARACTERISTICS, folder, pseudo, now=fixed_now)
    for fmt in ReportFormat:
        text = render_report(report, fmt)
        for original in (*ORIGINAL_TEXTS, str(folder.path), "notes.txt", "report.dcm"):
            assert original not in text, (fmt, original)
        # What it does print about patients is what recipients see.
        assert pseudo.token("PID-ECHO-5", "patient") in text
        assert "PHILIPS" in text


def test_json_report(folder: FolderConfig, pseudo: Pseudonymizer) -> None:
    doc = json.loads(render_json(build_report(CHARACTERISTICS, folder, pseudo, now=fixed_now)))
    assert doc["profile"]["name"] == "Characteristics"
    assert doc["profile"]["options"] == ["retain_patient_characteristics"]
    assert len(doc["attributes"]) > 600
    risk = doc["folder"]["risk"]
    assert risk["k"] == 1
    assert risk["unique_patients"] == 1
    assert risk["unique_share"] == 0.2
    (unique,) = risk["unique"]
    assert unique["singled_out_by"] == ["Manufacturer"]
    sizes = {c["size"]: c["patients"] for c in risk["class_sizes"]}
    assert sizes == {1: 1, 2: 4}
    maker = next(q for q in risk["quasi_identifiers"] if q["name"] == "Manufacturer")
    assert maker["distinct_values"] == 3
    assert {"value": "PHILIPS", "patients": 1} in maker["values"]
    reasons = {w["reason"]: w["files"] for w in doc["folder"]["withheld"]}
    assert reasons == {"not_dicom": 1, "encapsulated_document": 1, DUPLICATE: 1}


def test_report_without_folder_documents_the_profile_only() -> None:
    report = build_report(BASIC, now=fixed_now)
    assert report.folder is None
    text = render_markdown(report)
    assert "No folder was given" in text
    html_text = render_html(report)
    assert "<svg" not in html_text
    assert "No folder was given" in html_text


def test_accepted_identifiers_are_shown_as_accepted() -> None:
    """What a profile serves on purpose (``accepted``), in every format and row."""
    profile = BASIC.derive(
        "Names",
        rules=(Rule.parse("PatientName", "keep", "the study needs names"),),
        accepted=frozenset({0x00100010}),
    )
    report = build_report(profile, now=fixed_now)
    doc = to_json_object(report)
    assert doc["profile"]["accepted"] == ["(0010,0010)"]
    rows = {a["tag"]: a for a in doc["attributes"]}
    assert rows["(0010,0010)"]["accepted"] is True
    assert "accepted" in rows["(0010,0010)"]["rationale"]
    assert rows["(0010,0010)"]["rationale"].startswith("the study needs names")
    assert not any(a["accepted"] for tag, a in rows.items() if tag != "(0010,0010)")
    for text in (render_markdown(report), render_html(report)):
        assert "Accepted identifiers" in text
        assert "(0010,0010)" in text
    assert build_report(BASIC, now=fixed_now).profile.accepted == ()


def test_html_is_self_contained(folder: FolderConfig, pseudo: Pseudonymizer) -> None:
    page = render_html(build_report(CHARACTERISTICS, folder, pseudo, now=fixed_now))
    assert page.startswith("<!DOCTYPE html>")
    assert "<style>" in page
    assert "<svg" in page
    assert "<script" not in page.lower()
    assert not re.search(r"""src\s*=|url\(|@import""", page)
    links = set(re.findall(r'href="([^"]*)"', page))
    assert links == {"#profile", "#decisions", "#risk", "#withheld"}  # within the page only
    # The only URL is the SVG namespace, which is a name, not something fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert '<span class="k bad">k = 1</span>' in page


def test_chart_has_one_bar_per_class_size_and_bins_many() -> None:
    from deidfs.deid.risk import ClassSize

    few = class_size_chart([ClassSize(1, 3, 3), ClassSize(2, 1, 2), ClassSize(7, 1, 7)])
    assert few.count("<rect") == 4  # background + 3 bars
    assert few.count('fill="#c62828"') == 1  # the unique patients' bar
    many = class_size_chart([ClassSize(s, 1, s) for s in range(1, 60)])
    assert many.count("<rect") == 12  # background + 11 bins
    assert ">51-100<" in many


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """A tiny PNG decoder (8-bit RGB/RGBA, non-interlaced): width, height, pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat = 8, b""
    width = height = channels = 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8
            assert interlace == 0
            assert color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    pos = 0
    for _ in range(height):
        kind, line = raw[pos], bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r) for r in rows]


@pytest.mark.external
def test_html_report_renders_in_headless_chromium(
    folder: FolderConfig, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(CHARACTERISTICS, folder, pseudo, now=fixed_now)))
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    width, height, rows = _png_pixels(png.read_bytes())
    assert (width, height) == (1200, 1600)
    channels = len(rows[0]) // width
    colors = set()
    for row in rows[::8]:
        for x in range(0, width * channels, channels * 4):
            colors.add(row[x : x + 3])
    assert len(colors) > 20, "the screenshot is (almost) blank"
    # The headline's red k badge and the red bar of the unique patient are drawn.
    assert any(
        abs(c[0] - 0xC6) < 8 and abs(c[1] - 0x28) < 8 and abs(c[2] - 0x28) < 8 for c in colors
    )


CONFIG = """\
[daemon]
mountpoint = "{root}/mnt"
state_dir = "{root}/state"
export_dir = "{root}/export"
control_socket = "{root}/state/control.sock"
metrics_address = ""

[folders.ct]
path = "{path}"
profile = "Characteristics"

[profiles.Characteristics]
base = "Basic"
options = ["retain_patient_characteristics"]

[profiles.Suppressed]
base = "Characteristics"
rules = [
  {{ id = "PatientSex", act = "remove", note = "sex singles out patients" }},
  {{ id = "PatientAge", act = "remove" }},
  {{ id = "Manufacturer", act = "remove" }},
]
"""


def test_cli_report(
    folder: FolderConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "deidfs.toml"
    cfg.write_text(CONFIG.format(root=tmp_path, path=folder.path))
    assert main(["--config", str(cfg), "report", "--folder", "ct", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"]["name"] == "Characteristics"  # the folder's profile by default
    assert doc["folder"]["risk"]["k"] == 1
    assert (tmp_path / "state" / "secret.key").exists()
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    assert (
        main(["--config", str(cfg), "report", "Suppressed", "--folder", "ct", "--out", str(out)])
        == 0
    )
    page = out.read_text()
    assert "<svg" in page
    assert '<span class="k">k = 5</span>' in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    assert main(["--config", str(cfg), "report", "--folder", "nope"]) == 66
    assert main(["--config", str(cfg), "report", "Nope"]) == 66
    assert "no profile named 'Nope'" in capsys.readouterr().err


def test_cli_report_of_a_builtin_profile_needs_no_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.setattr("deidfs.cli.common.DEFAULT_CONFIG_PATH", tmp_path / "missing.toml")
    assert main(["report", "HIPAA"]) == 0
    text = capsys.readouterr().out
    assert "# De-identification report: profile HIPAA" in text
    assert "retain_longitudinal_modified_dates" in text


def test_every_profile_setting_is_reported() -> None:
    profile = Profile(
        name="Everything",
        base="Basic",
        comment="all settings",
        options=frozenset({Option.CLEAN_DESCRIPTORS}),
        disabled=frozenset({0x0008103E}),
        rules=(Rule.parse("(0008,0080)", "remove", "not needed"),),
        max_age=89,
    )
    text = render_markdown(build_report(profile, now=fixed_now))
    assert "| Options | clean_descriptors |" in text
    assert "| Disabled attributes | (0008,103E) |" in text
    assert "| (0008,0080) | remove | not needed |" in text
    assert "| Ages capped above | 89 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| (0008,103E) |"))
    assert "disabled in this profile" in row
