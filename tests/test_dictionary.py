"""deidfs.deid.dictionary answers exactly as pydicom's data dictionary does, without importing
pydicom; and a file the fast path handles is rendered without pydicom loaded at all."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pydicom.uid
import pytest
from pydicom import datadict
from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom.data import get_testdata_file
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from deidfs.deid import dictionary


def _repeater_instances() -> list[int]:
    """Every tag a repeating-group row stands for, with x digits 0, 2, 8 and E: (6000,3000),
    (6002,3000), (601E,3000)..."""
    tags = set()
    for masked in RepeatersDictionary:
        for digit in "028E":
            tags.add(int(masked.replace("x", digit), 16))
    return sorted(tags)


def test_every_dictionary_tag_has_pydicom_entry() -> None:
    for tag in [*DicomDictionary, *_repeater_instances()]:
        assert dictionary.entry(tag) == datadict.get_entry(tag), hex(tag)
        assert dictionary.vr_of(tag) == datadict.dictionary_VR(tag)
        assert dictionary.keyword_for_tag(tag) == datadict.keyword_for_tag(tag)


@pytest.mark.parametrize(
    "tag",
    [0x00091010, 0x60013000, 0x00110010, 0x7FE1_0010, 0x00FE0002, 0xABCC1234],
)
def test_private_and_unknown_tags_are_not_in_it(tag: int) -> None:
    with pytest.raises(KeyError):
        datadict.get_entry(tag)
    with pytest.raises(KeyError):
        dictionary.entry(tag)
    assert dictionary.keyword_for_tag(tag) == ""


def test_keywords_map_back_to_their_tags() -> None:
    for row in DicomDictionary.values():
        keyword = row[4]
        assert dictionary.tag_for_keyword(keyword) == datadict.tag_for_keyword(keyword)
    assert dictionary.tag_for_keyword("NoSuchKeyword") is None
    assert dictionary.tag_for_keyword("PatientName") == 0x00100010


def test_registered_uids_and_vr_sets_are_pydicoms() -> None:
    # pydicom's own table as its file has it: importing pynetdicom adds transfer syntaxes to
    # the loaded one (which deidfs reads when pydicom is loaded first, and not otherwise).
    path = Path(pydicom.__file__).parent / "_uid_dict.py"
    spec = importlib.util.spec_from_file_location("pristine_uid_dict", path)
    assert spec is not None
    assert spec.loader is not None
    pristine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pristine)
    registered = pristine.UID_dictionary
    assert all(dictionary.is_registered_uid(uid) for uid in registered)
    assert not dictionary.is_registered_uid("2.25.1234")
    assert {str(vr) for vr in STANDARD_VR} == dictionary.STANDARD_VRS
    assert {str(vr) for vr in EXPLICIT_VR_LENGTH_32} == dictionary.LONG_LENGTH_VRS


def test_fast_path_renders_without_importing_pydicom(tmp_path: Path) -> None:
    """A CT image the fast path handles is rendered, and its view written, in a process that
    never imports pydicom (nor numpy): that is what keeps ``deidfs anonymize`` quick."""
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    out = tmp_path / "out.dcm"
    script = f"""
import os, sys
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.view.render import render_path, write_view
view = render_path({source!r}, compile_plan(BUILTIN_PROFILES["Basic"]), Pseudonymizer(b"k" * 32))
fd = os.open({source!r}, os.O_RDONLY)
with open({str(out)!r}, "wb") as f:
    write_view(view, fd, f)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydicom", "numpy"))
print(",".join(loaded))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""
    # The bytes are a de-identified file pydicom reads.
    ds = pydicom.dcmread(out)
    assert ds.PatientIdentityRemoved == "YES"
    assert str(ds.SOPInstanceUID).startswith("2.25.")
