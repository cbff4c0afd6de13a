"""An embedded demo: a configuration and a folder of sample files, ready for ``deidfs run``.

The samples are real DICOM files shipped with pydicom's test data (CT, MR, RT plan/struct/
dose, JPEG 2000, a colour image), plus two files deidfs must withhold: a DICOMDIR and a text
file. Everything lives under one directory, with paths in the configuration relative to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

#: (file name in pydicom's test data, name in the demo's incoming folder).
SAMPLES = (
    ("CT_small.dcm", "ct/CT_small.dcm"),
    ("MR_small.dcm", "mr/MR_small.dcm"),
    ("rtplan.dcm", "rt/rtplan.dcm"),
    ("rtstruct.dcm", "rt/rtstruct.dcm"),
    ("rtdose.dcm", "rt/rtdose.dcm"),
    ("JPEG2000.dcm", "jpeg2000/JPEG2000.dcm"),
    ("SC_rgb_rle.dcm", "color/SC_rgb_rle.dcm"),
    ("liver_1frame.dcm", "ct/liver_1frame.dcm"),
)
#: Files that must never appear in the mount (fail closed).
WITHHELD = (("dicomdirtests/DICOMDIR", "DICOMDIR"),)
NOT_DICOM_NAME = "README.txt"

CONFIG_TEXT = """\
# deidfs demo configuration (written by `deidfs demo`). Relative paths are relative to this
# file's directory. Run:  deidfs run --config {config}
[daemon]
mountpoint = "mnt"
state_dir = "state"
export_dir = "export"
control_socket = "state/control.sock"
metrics_address = "127.0.0.1:9464"
settle_seconds = 1.0

# The watched folder: every DICOM file copied into demo/incoming appears, de-identified,
# under demo/mnt/samples/<patient>/<study>/<series>/<instance>.dcm
[folders.samples]
path = "incoming"
profile = "Nominal"
layout = "dicom"

# The default profile: the PS3.15 Basic Application Level Confidentiality Profile.
[profiles.Nominal]
base = "Basic"
comment = "Basic profile, no options (edit to taste)"
"""


@dataclass(frozen=True, slots=True)
class DemoSetup:
    """Where the demo was written."""

    root: Path
    config: Path
    incoming: Path
    mountpoint: Path
    copied: tuple[str, ...]  #: names (under incoming) written by this call
    config_written: bool


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file  # noqa: PLC0415  (only the demo needs it)

    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(name)
    return Path(str(found))


def write_demo(root: Path) -> DemoSetup:
    """Create (or complete) the demo under ``root``; existing files are left as they are.

    Raises
    ------
    OSError
        ``root`` cannot be written.
    """
    root = Path(os.path.abspath(root))
    incoming = root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    (root / "export").mkdir(exist_ok=True)
    mnt = root / "mnt"
    with contextlib.suppress(OSError):  # a stale mount from a killed run: `run` clears it
        mnt.mkdir(exist_ok=True)
    config = root / "deidfs.toml"
    config_written = False
    if not config.exists():
        config.write_text(CONFIG_TEXT.format(config=config))
        config_written = True
    copied: list[str] = []
    for src_name, rel in SAMPLES + WITHHELD:
        dest = incoming / rel
        if dest.exists():
            continue
        try:
            src = _testdata(src_name)
        except FileNotFoundError:
            continue  # an older pydicom without this sample: the demo works without it
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        copied.append(rel)
    note = incoming / NOT_DICOM_NAME
    if not note.exists():
        note.write_text("Not a DICOM file: deidfs withholds it (reason not_dicom).\n")
        copied.append(NOT_DICOM_NAME)
    return DemoSetup(
        root=root,
        config=config,
        incoming=incoming,
        mountpoint=mnt,
        copied=tuple(copied),
        config_written=config_written,
    )
