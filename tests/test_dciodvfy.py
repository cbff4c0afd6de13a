"""No served file has a dciodvfy error that its original lacks, under every profile.

The corpora: *canaries* (pydicom's files of many IODs with the attributes whose action
depends on their Type added: Referenced Study Sequence and Referenced Performed Procedure
Step Sequence, Type 3 in images and Type 2 in SR; a veterinary patient's Type 2C
Responsible Person and Organization), the leak corpus (every Table E.1-1 attribute planted,
nested too), and pydicom's test files. Served bytes come from deidfs's own render API, as
the mount and export serve them. dciodvfy's messages are compared with their values
normalised: de-identification changes UIDs, dates and numbers, so "the same error about a
different value" is not a new error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from deidfs.deid.plan import Plan
from deidfs.deid.profiles import BASIC, HIPAA
from deidfs.deid.standard import Option
from deidfs.errors import Refused
from deidfs.view.render import render_path, write_view
from leak_corpus import UID_ROOT, build_leak_dataset, plan_of, pseudonymizer, write_source

pytestmark = [
    pytest.mark.external,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # odd pydicom files, as in production
]

#: One file of each IOD pydicom ships (greyscale, RGB, palette and YBR ultrasound, RT,
#: segmentation, SR, waveform).
CANARY_BASES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "examples_palette.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "rtdose_1frame.dcm",
    "rtplan.dcm",
    "liver_1frame.dcm",
    "reportsi.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
)
PROFILES: dict[str, Plan] = {
    "Basic": plan_of(BASIC),
    "HIPAA": plan_of(HIPAA),
    **{o.value: plan_of(BASIC, o) for o in Option if o is not Option.CLEAN_PIXEL_DATA},
}

_ANGLED_VALUE = re.compile(r"= <[^>]*>")
_CHARACTER = re.compile(r"= '.' \(0x[0-9a-fA-F]+\)")
_NUMBER = re.compile(r"\b\d+(\.\d+)*\b")


def errors(text: str) -> set[str]:
    """dciodvfy's error lines, with values (``= <...>``, an offending character), UIDs and
    numbers normalised; element and module names stay."""
    out = set()
    for line in text.splitlines():
        if line.startswith("Error"):
            valueless = _CHARACTER.sub("= C", _ANGLED_VALUE.sub("= <V>", line.strip()))
            out.add(_NUMBER.sub("N", valueless))
    return out


def test_errors_normalise_values_not_names() -> None:
    a = "Error - Value invalid for this VR - (0x0008,0x0022) DA X  DA [1] = <34750711> - "
    b = "Error - Value invalid for this VR - (0x0008,0x0022) DA X  DA [1] = <09970104> - "
    assert errors(a + "Character invalid for this VR = '3' (0x33)") == errors(
        b + "Character invalid for this VR = '0' (0x30)"
    )
    study = "Error - Bad Sequence number of Items 0 Element=<ReferencedStudySequence>"
    step = (
        "Error - Bad Sequence number of Items 0 Element=<ReferencedPerformedProcedureStepSequence>"
    )
    assert errors(study) != errors(step)
    assert errors("Warning - something") == set()


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def canary(base: str) -> Dataset:
    """pydicom's ``base`` with the attributes whose action depends on their Type added."""
    path = get_testdata_file(base)
    assert path is not None, base
    ds = dcmread(path)
    study = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as MPPS uses
    ds.ReferencedStudySequence = Sequence([_reference(study, f"{UID_ROOT}501")])
    ds.ReferencedPerformedProcedureStepSequence = Sequence(
        [_reference("1.2.840.10008.3.1.2.3.3", f"{UID_ROOT}502")]
    )
    # A veterinary patient (PS3.3 C.7.1.1): Responsible Person and Organization are 2C.
    ds.PatientSpeciesDescription = "Canine species"
    ds.PatientBreedDescription = "Beagle"
    ds.PatientBreedCodeSequence = Sequence()
    ds.BreedRegistrationSequence = Sequence()
    ds.ResponsiblePerson = "Owner^Olive"
    ds.ResponsiblePersonRole = "OWNER"
    ds.ResponsibleOrganization = "Kennel Club of Springfield"
    if str(ds.get("Modality", "")) == "SR":
        # SR Document General: Referenced Study Sequence is Type 2 in these items.
        request = Dataset()
        request.StudyInstanceUID = f"{UID_ROOT}503"
        request.ReferencedStudySequence = Sequence([_reference(study, f"{UID_ROOT}504")])
        request.AccessionNumber = "ACC-9"
        request.PlacerOrderNumberImagingServiceRequest = "P-9"
        request.FillerOrderNumberImagingServiceRequest = "F-9"
        request.RequestedProcedureID = "RP-9"
        request.RequestedProcedureDescription = "Chest radiograph"
        request.RequestedProcedureCodeSequence = Sequence()
        ds.ReferencedRequestSequence = Sequence([request])
    return ds


def _run(argv: list[str]) -> str:
    r = subprocess.run(
        argv, capture_output=True, text=True, errors="replace", timeout=120, check=False
    )
    return r.stdout + r.stderr


def _pool_map(argvs: list[list[str]]) -> Iterator[str]:
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield from pool.map(_run, argvs)


def new_errors(pairs: list[tuple[str, Path, Path]]) -> dict[str, set[str]]:
    """name -> errors of the served file that its original lacks (none: not listed)."""
    originals = sorted({src for _n, src, _o in pairs})
    outputs = [out for _n, _s, out in pairs]
    texts = list(_pool_map([["dciodvfy", str(p)] for p in [*originals, *outputs]]))
    before = {src: errors(t) for src, t in zip(originals, texts, strict=False)}
    new = {}
    for (name, src, _out), text in zip(pairs, texts[len(originals) :], strict=True):
        extra = errors(text) - before[src]
        if extra:
            new[name] = extra
    return new


def serve_all(
    sources: dict[str, Path], plans: dict[str, Plan], out_dir: Path
) -> list[tuple[str, Path, Path]]:
    """Every source through every plan: (name, source, served file); refused ones left out
    (the refusal is the corpus tests' business, and a refused file serves nothing)."""
    pseudo = pseudonymizer()
    pairs = []
    for profile, plan in plans.items():
        for name, src in sources.items():
            try:
                view = render_path(src, plan, pseudo)
            except Refused:
                continue
            out = out_dir / f"{profile}__{name.replace('/', '__')}.out.dcm"
            fd = os.open(src, os.O_RDONLY)
            try:
                with open(out, "wb") as f:
                    write_view(view, fd, f)
            finally:
                os.close(fd)
            pairs.append((f"{profile}: {name}", src, out))
    return pairs


@pytest.fixture(autouse=True)
def _needs_dciodvfy() -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")


def test_canaries_gain_no_error_under_any_profile(tmp_path: Path) -> None:
    sources = {
        base: write_source(tmp_path, f"canary_{base}", canary(base), None) for base in CANARY_BASES
    }
    pairs = serve_all(sources, PROFILES, tmp_path)
    # Every canary is served under Basic: a refusal would hide the case.
    assert {n for n, _s, _o in pairs if n.startswith("Basic: ")} == {
        f"Basic: {b}" for b in CANARY_BASES
    }
    assert new_errors(pairs) == {}


def test_leak_corpus_gains_no_error_under_any_profile(tmp_path: Path) -> None:
    sources = {
        f"leak_{pixels}": write_source(
            tmp_path, f"leak_{pixels}.dcm", build_leak_dataset(with_pixels=pixels).ds
        )
        for pixels in (True, False)
    }
    pairs = serve_all(sources, PROFILES, tmp_path)
    assert len(pairs) == 2 * len(PROFILES)
    assert new_errors(pairs) == {}


def test_pydicom_files_gain_no_error_under_hipaa(tmp_path: Path) -> None:
    """Basic over the same files is tests/test_corpus.py's dciodvfy test."""
    files = [Path(f) for f in get_testdata_files() if os.path.isfile(f)]
    root = Path(os.path.commonpath(files))
    sources = {str(f.relative_to(root)): f for f in files}
    pairs = serve_all(sources, {"HIPAA": PROFILES["HIPAA"]}, tmp_path)
    assert len(pairs) > 100
    assert new_errors(pairs) == {}
