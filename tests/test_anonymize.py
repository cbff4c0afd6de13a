"""``deidfs anonymize``: outputs, idempotence, refusals, layouts, exit codes, crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from pydicom.charset import default_encoding
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from conftest import sample_file
from deidfs.cli import common
from deidfs.cli.main import main
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import Refused
from deidfs.export.files import is_temp_name
from deidfs.view import deflated, model, reference
from deidfs.view.render import Layout, render_path, write_view

KEY = bytes(range(32))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Built-in profiles only, whatever the machine has in /etc/deidfs.
    monkeypatch.delenv("DEIDFS_CONFIG", raising=False)
    monkeypatch.delenv("DEIDFS_KEY_FILE", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Sample DICOM files in a tree, plus what must be skipped or refused."""
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden-dir").mkdir()
    shutil.copy(sample_file("CT_small.dcm"), root / "ct.dcm")
    shutil.copy(sample_file("MR_small.dcm"), root / "sub" / "mr.dcm")
    shutil.copy(sample_file("rtplan.dcm"), root / "sub" / "deeper" / "plan")
    (root / "notes.txt").write_text("not a DICOM file\n")
    shutil.copy(sample_file("CT_small.dcm"), root / ".dotfile.dcm")
    shutil.copy(sample_file("MR_small.dcm"), root / "arriving.dcm.part")
    shutil.copy(sample_file("MR_small.dcm"), root / "arriving.PARTIAL")
    shutil.copy(sample_file("rtplan.dcm"), root / ".hidden-dir" / "plan.dcm")
    (root / "link.dcm").symlink_to(root / "ct.dcm")
    return root


SOURCES = {"ct.dcm": "CT_small.dcm", "sub/mr.dcm": "MR_small.dcm", "sub/deeper/plan": "rtplan.dcm"}


def expected_views(root: Path, layout: Layout = Layout.DICOM) -> dict[PurePosixPath, bytes]:
    """What the mount serves for each sample source: render + write_view."""
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    pseudo = Pseudonymizer(KEY)
    out: dict[PurePosixPath, bytes] = {}
    for rel in SOURCES:
        view = render_path(root / rel, plan, pseudo, layout, PurePosixPath(rel))
        with tempfile.TemporaryFile() as f, open(root / rel, "rb") as s:
            write_view(view, s.fileno(), f)
            f.seek(0)
            out[view.relpath] = f.read()
    return out


def output_files(out: Path) -> dict[PurePosixPath, bytes]:
    return {
        PurePosixPath(p.relative_to(out).as_posix()): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file()
    }


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if is_temp_name(p.name)]


def anonymize(*args: str | Path) -> int:
    return main(["anonymize", *map(str, args)])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_outputs_are_the_mount_bytes_at_dicom_layout_paths(
    src: Path, key_file: Path, tmp_path: Path, workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file)
    # The same run with --workers, into another folder, must agree.
    out2 = tmp_path / "out2"
    code2 = anonymize(
        src, "--profile", "Basic", "--to", out2, "--key-file", key_file, "--workers", workers
    )
    assert (code, code2) == (0, 0)
    expected = expected_views(src)
    assert output_files(out) == expected
    assert output_files(out2) == expected
    for relpath in expected:
        assert len(relpath.parts) == 4  # patient / study / series / instance.dcm
        assert relpath.name.startswith("2.25.")
        assert relpath.suffix == ".dcm"
    summary = capsys.readouterr().out
    assert "written          3" in summary
    assert "refused          1   not_dicom 1" in summary
    # .dotfile.dcm, .hidden-dir, arriving.dcm.part, arriving.PARTIAL, link.dcm
    assert "skipped          5" in summary


def test_outputs_are_valid_dicom(src: Path, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file) == 0
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID == path.stem
        assert ds.file_meta.MediaStorageSOPInstanceUID == path.stem


@pytest.mark.external
def test_outputs_pass_dcmdump(src: Path, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file) == 0
    for path in out.rglob("*.dcm"):
        proc = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert b"E:" not in proc.stderr


def test_refusals_name_a_keyed_token_never_the_path(
    src: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert anonymize(src, "--profile", "Basic", "--to", tmp_path / "o", "--key-file", key_file) == 0
    captured = capsys.readouterr()
    token = Pseudonymizer(KEY).token(str(src / "notes.txt"), "path")[:12]
    assert f"refused (not_dicom): file {token}" in captured.err
    everything = captured.out + captured.err
    assert "notes" not in everything
    assert str(src) not in everything


def test_second_run_writes_nothing(
    src: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = (src, "--profile", "Basic", "--to", out, "--key-file", key_file)
    assert anonymize(*argv) == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.dcm")}
    capsys.readouterr()
    assert anonymize(*argv, "--workers", "2") == 0
    summary = capsys.readouterr().out
    assert "written          0" in summary
    assert "unchanged        3" in summary
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.dcm")} == before


def test_a_changed_output_is_replaced(
    src: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = (src, "--profile", "Basic", "--to", out, "--key-file", key_file)
    assert anonymize(*argv) == 0
    victim = next(out.rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF  # same size, other header bytes
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert anonymize(*argv) == 0
    assert "written          1   1 replaced an older file" in capsys.readouterr().out
    assert output_files(out) == expected_views(src)


def test_sources_naming_one_target_keep_the_first_path(
    key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(sample_file("MR_small.dcm"))
    ds.save_as(src / "a.dcm")
    ds.InstanceNumber = 99  # same SOP Instance UID, other content
    ds.save_as(src / "b.dcm")
    out = tmp_path / "out"
    for workers in ("1", "2", "2"):
        argv = (src, "--profile", "Basic", "--to", out, "--key-file", key_file)
        assert anonymize(*argv, "--workers", workers) == 0
    summary = capsys.readouterr().out.split("deidfs anonymize:")[-1]
    assert "written          0" in summary
    assert "unchanged        1" in summary
    assert "duplicate        1" in summary
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    view = render_path(src / "a.dcm", plan, Pseudonymizer(KEY))
    (only,) = out.rglob("*.dcm")
    assert only.relative_to(out).as_posix() == str(view.relpath)
    assert pydicom.dcmread(only).InstanceNumber == pydicom.dcmread(src / "a.dcm").InstanceNumber
    assert temp_files(out) == []


@pytest.mark.parametrize("layout", ["flat", "mirror"])
def test_layouts(src: Path, key_file: Path, tmp_path: Path, layout: str) -> None:
    out = tmp_path / "out"
    argv = (src, "--profile", "Basic", "--to", out, "--key-file", key_file, "--layout", layout)
    assert anonymize(*argv) == 0
    files = output_files(out)
    assert files == expected_views(src, Layout(layout))
    if layout == "flat":
        assert all(len(p.parts) == 1 and p.name.startswith("2.25.") for p in files)
    else:
        assert set(map(str, files)) == set(SOURCES)


def test_a_single_file_source(key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ct = sample_file("CT_small.dcm")
    assert anonymize(ct, "--profile", "Basic", "--to", out, "--key-file", key_file) == 0
    assert len(list(out.rglob("*.dcm"))) == 1


def test_output_that_is_a_file_exits_73(src: Path, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.write_text("a file, not a directory\n")
    assert anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file) == 73
    assert out.read_text() == "a file, not a directory\n"


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only file system (root can write anywhere else)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    target = tmp_path / "ro"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_read_only_output_exits_73_and_leaves_nothing(
    src: Path, key_file: Path, readonly_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for out in (readonly_dir, readonly_dir / "new"):
        assert anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file) == 73
        assert "Read-only file system" in capsys.readouterr().err
    assert list(readonly_dir.iterdir()) == []


def test_a_file_that_cannot_be_written_exits_1(
    src: Path, key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    expected = expected_views(src)
    blocked = next(iter(expected))
    (out / blocked).mkdir(parents=True)  # a directory where the file must go
    assert anonymize(src, "--profile", "Basic", "--to", out, "--key-file", key_file) == 1
    captured = capsys.readouterr()
    assert "failed           1" in captured.out
    assert "deidfs: failed (cannot commit the file: Is a directory): file " in captured.err
    files = output_files(out)
    assert files == {rel: data for rel, data in expected.items() if rel != blocked}
    assert temp_files(out) == []


def test_missing_source_exits_66(key_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    code = anonymize(missing, "--profile", "Basic", "--to", tmp_path / "o", "--key-file", key_file)
    assert code == 66
    assert not (tmp_path / "o").exists()


def test_unknown_profile_exits_66(src: Path, key_file: Path, tmp_path: Path) -> None:
    argv = (src, "--profile", "NoSuch", "--to", tmp_path / "o", "--key-file", key_file)
    assert anonymize(*argv) == 66


def test_key_from_the_user_state_dir_by_default(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    for out in ("o1", "o2"):
        assert anonymize(src, "--profile", "Basic", "--to", tmp_path / out) == 0
    key = state / "deidfs" / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert output_files(tmp_path / "o1") == output_files(tmp_path / "o2")
    # $DEIDFS_KEY_FILE picks another key: other pseudonyms.
    other = tmp_path / "other.key"
    other.write_text(bytes(range(1, 33)).hex() + "\n")
    other.chmod(0o600)
    monkeypatch.setenv("DEIDFS_KEY_FILE", str(other))
    assert anonymize(src, "--profile", "Basic", "--to", tmp_path / "o3") == 0
    assert set(output_files(tmp_path / "o3")).isdisjoint(output_files(tmp_path / "o1"))


def test_sigkill_leaves_no_partial_file_and_the_next_run_cleans_up(
    key_file: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    for i in range(150):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / f"im{i:03d}.dcm")
    plan = compile_plan(BUILTIN_PROFILES["Basic"])
    pseudo = Pseudonymizer(KEY)
    expected: dict[str, bytes] = {}
    for path in src.iterdir():
        view = render_path(path, plan, pseudo)
        with tempfile.TemporaryFile() as f, path.open("rb") as s:
            write_view(view, s.fileno(), f)
            f.seek(0)
            expected[str(view.relpath)] = f.read()
    out = tmp_path / "out"
    argv = [str(src), "--profile", "Basic", "--to", str(out), "--key-file", str(key_file)]
    code = (
        "import sys; from pathlib import Path; import deidfs.cli.common as c;"
        f"c.DEFAULT_CONFIG_PATH = Path({str(tmp_path / 'none.toml')!r});"
        "from deidfs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DEIDFS_CONFIG", "DEIDFS_KEY_FILE")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "anonymize", *argv, "--workers", "1", "--quiet"],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(out.rglob("*.dcm")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    visible = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert 0 < len(visible) < len(expected)
    for rel, data in visible.items():
        assert data == expected[rel]  # complete, never partial
    hidden = [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert all(is_temp_name(p.name) for p in hidden)  # only temporary files of the run
    # One more left by a dead writer, wherever the kill came: the next run removes it.
    series_dir = out / PurePosixPath(next(iter(visible))).parent
    (series_dir / f".deidfs-{proc.pid}-0123456789ab.tmp").write_bytes(b"partial")
    assert anonymize(*argv, "--quiet") == 0
    assert output_files(out) == {PurePosixPath(k): v for k, v in expected.items()}
    assert temp_files(out) == []


def test_fast_encoding_equals_pydicom_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The view header is byte for byte what pydicom's own writer makes of the engine's
    output, for every file pydicom ships as test data that renders under Basic and HIPAA."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    pseudo = Pseudonymizer(KEY)
    plans = [compile_plan(BUILTIN_PROFILES[name]) for name in ("Basic", "HIPAA")]

    def pydicom_encode(ds: pydicom.Dataset, implicit: bool, little: bool) -> bytes:
        buf = DicomBytesIO()
        buf.is_implicit_VR = implicit
        buf.is_little_endian = little
        pydicom.filewriter.write_dataset(buf, ds, default_encoding)
        return buf.getvalue()

    def pydicom_header(ds: pydicom.Dataset, implicit: bool, little: bool) -> bytes:
        buf = DicomBytesIO()
        buf.write(model.PREAMBLE)
        write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
        return buf.getvalue() + pydicom_encode(ds, implicit, little)

    def views() -> dict[tuple[str, str], tuple[bytes, bytes] | str]:
        found: dict[tuple[str, str], tuple[bytes, bytes] | str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about its own odd test files
            for plan in plans:
                for path in files:
                    try:
                        view = render_path(path, plan, pseudo)
                    except Refused as exc:
                        found[(plan.profile.name, path.name)] = exc.reason
                    else:
                        found[(plan.profile.name, path.name)] = (view.header, view.trailer)
        return found

    fast = views()
    monkeypatch.setattr(reference, "_encode", pydicom_encode)
    monkeypatch.setattr(deflated, "_encode", pydicom_encode)
    monkeypatch.setattr(reference, "_encode_header", pydicom_header)
    reference_views = views()
    rendered = [k for k, v in reference_views.items() if not isinstance(v, str)]
    assert len(rendered) > 200
    assert fast == reference_views


def test_help_documents_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["anonymize", "--help"])
    text = capsys.readouterr().out
    for needle in ("--key-file", "$DEIDFS_KEY_FILE", "~/.local/state/deidfs", "exit codes"):
        assert needle in text


def test_key_from_the_configured_state_dir(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "deidfs.toml"
    config.write_text(
        "[daemon]\n"
        f'state_dir = "{state}"\n'
        f'mountpoint = "{tmp_path / "mnt"}"\n'
        f'export_dir = "{tmp_path / "export"}"\n'
    )
    out = tmp_path / "out"
    argv = (src, "--profile", "Basic", "--to", out, "--config", config, "--quiet")
    assert anonymize(*argv) == 0
    assert capsys.readouterr().out == ""  # --quiet: no summary
    key = state / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    same_key = tmp_path / "same"
    assert anonymize(src, "--profile", "Basic", "--to", same_key, "--key-file", key) == 0
    assert output_files(out) == output_files(same_key)
