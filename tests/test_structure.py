"""Nothing broken is served: a data set is whole at every depth, or withheld (issue 20).

pydicom reads a file cut inside an undefined-length sequence or item as if it ended there,
and stops at a stray item delimiter: the served file would lack what came after, and look
complete to every reader. These cases cut real files at every depth, in all three
uncompressed encodings, through both render paths and ``deidfs anonymize``, with dcmdump as
the independent judge of what is broken.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from conftest import Daemon, sample_file, wait_for
from deidfs.cli.main import main
from deidfs.deid.profiles import BASIC
from deidfs.deid.structure import check_dataset
from deidfs.errors import Refused
from deidfs.view.render import SourceStat, read_view, render
from leak_corpus import make_image, part10_bytes, plan_of, pseudonymizer, serve_bytes

ENCODINGS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
IDS = ["explicit-le", "implicit-le", "explicit-be"]


def _undefined_lengths(ds: Dataset) -> Dataset:
    """Every sequence and item of ``ds`` with undefined length, as many writers emit them."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    return ds


def _plan_bytes(ts: str) -> bytes:
    ds = _undefined_lengths(dcmread(get_testdata_file("rtplan.dcm")))
    return part10_bytes(ds, ts)


def _render(data: bytes, fast: bool) -> bytes:
    view = render(
        io.BytesIO(data),
        SourceStat(0, 0, len(data), 0, 0),
        plan_of(BASIC),
        pseudonymizer(),
        fast=fast,
    )
    # Read as the mount reads it: zeroed ranges and all.
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return read_view(view, f.fileno(), 0, view.size)


def _outcome(data: bytes, fast: bool) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _render(data, fast)
    except Refused as exc:
        return exc.reason
    return "served"


def _dcmdump_accepts(path: Path) -> bool:
    done = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("ts", ENCODINGS, ids=IDS)
def test_a_file_cut_anywhere_dcmdump_rejects_is_withheld_as_truncated(
    tmp_path: Path, ts: str
) -> None:
    data = _plan_bytes(ts)
    judged = 0
    cuts = range(1, len(data) - 400, 11)
    for cut in cuts:
        cut_data = data[:-cut]
        path = tmp_path / "cut.dcm"
        path.write_bytes(cut_data)
        if _dcmdump_accepts(path):
            continue
        judged += 1
        for fast in (True, False):
            assert _outcome(cut_data, fast) == "truncated", (cut, fast)
    assert judged > len(cuts) // 2  # most cuts land inside an item, a sequence or a value


@pytest.mark.parametrize("ts", ENCODINGS, ids=IDS)
def test_the_last_300_bytes_missing_are_noticed(ts: str) -> None:
    """The reported case: sequences after the cut (Patient Setup, Referenced RT Plan,
    Referenced Structure Set) and Approval Status vanish, dcmdump would accept the result."""
    data = _plan_bytes(ts)[:-300]
    for fast in (True, False):
        assert _outcome(data, fast) == "truncated"


def test_a_value_cut_inside_a_nested_item_is_noticed() -> None:
    """Isocenter Position cut to two of its three values, deep in Beam Sequence."""
    data = _plan_bytes(ExplicitVRLittleEndian)
    at = data.index(b"\x0a\x30\x2c\x01")  # (300A,012C) Isocenter Position
    length = struct.unpack_from("<H", data, at + 6)[0]
    value = data[at + 8 : at + 8 + length]
    cut = at + 8 + value.rindex(b"\\")
    assert _outcome(data[:cut], True) == "truncated"
    assert _outcome(data[:cut], False) == "truncated"


def test_anonymize_writes_nothing_for_a_truncated_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "plan.dcm").write_bytes(_plan_bytes(ExplicitVRLittleEndian)[:-300])
    key = tmp_path / "key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    out = tmp_path / "out"
    code = main(
        ["anonymize", str(src), "--profile", "Basic", "--to", str(out), "--key-file", str(key)]
    )
    assert code == 0  # refused files are withheld and counted, not an error of the run
    assert "truncated 1" in capsys.readouterr().out
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix == ".dcm"]


# -- what follows the header --------------------------------------------------------------
def _image_bytes(ts: str = ExplicitVRLittleEndian) -> bytes:
    return part10_bytes(make_image("1.2.826.0.1.3680043.10.1234.77"), ts)


def _element(tag: int, vr: bytes, value: bytes, little: bool = True) -> bytes:
    e = "<" if little else ">"
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"):
        return struct.pack(e + "HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack(e + "HH2sH", group, elem, vr, len(value)) + value


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_a_stray_item_delimiter_at_the_top_level_is_withheld(fast: bool) -> None:
    """pydicom's parse stops at it: the file's name would come from the elements before it
    and its body from a second parse of the rest."""
    data = _image_bytes()
    at = data.index(b"\x10\x00\x10\x00")  # (0010,0010) Patient's Name
    broken = data[:at] + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + data[at:]
    assert _outcome(broken, fast) == "unparseable"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_an_element_repeated_after_pixel_data_is_withheld(fast: bool) -> None:
    data = _image_bytes() + _element(0x00100010, b"PN", b"Again^Named ")
    assert _outcome(data, fast) == "element_order"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_a_second_pixel_data_element_is_withheld(fast: bool) -> None:
    data = _image_bytes()
    at = data.index(b"\xe0\x7f\x10\x00")
    # Float Pixel Data before Pixel Data: two pixel elements, a reader may show either.
    extra = _element(0x7FE00008, b"OF", b"\x00" * 16)
    assert _outcome(data[:at] + extra + data[at:], fast) == "unparseable"


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"\xde\xad\xbe\xef" * 3, b"\x01\x02"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_trailing_bytes_that_are_no_element_are_their_own_reason(
    fast: bool, garbage: bytes
) -> None:
    assert _outcome(_image_bytes() + garbage, fast) == "trailing_data"


def test_a_whole_trailer_is_still_served() -> None:
    trailer = _element(0xFFFAFFFA, b"SQ", b"") + _element(0xFFFCFFFC, b"OB", b"\x00" * 8)
    served = serve_bytes(_image_bytes() + trailer, plan_of(BASIC))
    assert 0xFFFCFFFC not in served.ds or served.ds[0xFFFCFFFC].VR == "OB"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_an_implicit_data_set_under_an_explicit_meta_is_a_mismatch(fast: bool) -> None:
    explicit = _image_bytes(ExplicitVRLittleEndian)
    implicit = _image_bytes(ImplicitVRLittleEndian)
    # The meta group of the explicit file, the data set of the implicit one.
    meta_end = 132 + 12 + struct.unpack_from("<L", explicit, 140)[0]
    implicit_meta_end = 132 + 12 + struct.unpack_from("<L", implicit, 140)[0]
    mixed = explicit[:meta_end] + implicit[implicit_meta_end:]
    assert _outcome(mixed, fast) == "transfer_syntax_mismatch"


# -- the walk itself ----------------------------------------------------------------------
def _item(body: bytes, defined: bool, little: bool = True) -> bytes:
    e = "<" if little else ">"
    if defined:
        return struct.pack(e + "HHL", 0xFFFE, 0xE000, len(body)) + body
    return (
        struct.pack(e + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + body
        + struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0)
    )


def _sequence(tag: int, items: bytes, defined: bool, little: bool = True) -> bytes:
    e = "<" if little else ">"
    head = struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, b"SQ", 0)
    if defined:
        return head + struct.pack(e + "L", len(items)) + items
    return (
        head + struct.pack(e + "L", 0xFFFFFFFF) + items + struct.pack(e + "HHL", 0xFFFE, 0xE0DD, 0)
    )


@pytest.mark.parametrize("little", [True, False], ids=["le", "be"])
@pytest.mark.parametrize("defined", [True, False], ids=["defined", "undefined"])
def test_every_cut_of_a_nested_data_set_is_found(little: bool, defined: bool) -> None:
    inner = _element(0x00081150, b"UI", b"1.2.3\x00", little)
    middle = _sequence(0x00081199, _item(inner, defined, little), defined, little)
    outer = _sequence(0x00081115, _item(middle, defined, little) * 2, defined, little)
    whole = _element(0x00080060, b"CS", b"CT", little) + outer
    assert check_dataset(whole, 0, len(whole), False, little) == (len(whole), 0x00081115)
    boundary = len(_element(0x00080060, b"CS", b"CT", little))
    for cut in range(1, len(whole)):
        if cut == boundary:
            continue
        with pytest.raises(Refused) as caught:
            check_dataset(whole[:cut], 0, cut, False, little)
        assert caught.value.reason == "truncated", cut


def test_an_item_longer_than_its_sequence_is_malformed() -> None:
    item = _item(_element(0x00081150, b"UI", b"1.2.3\x00"), True)
    seq = _sequence(0x00081115, item, True)
    # The sequence says it is 4 bytes shorter than its one item.
    bad = seq[:8] + struct.pack("<L", len(item) - 4) + seq[12:]
    tail = _element(0x00100010, b"PN", b"Doe^J ")
    with pytest.raises(Refused) as caught:
        check_dataset(bad + tail, 0, len(bad + tail), False, True)
    assert caught.value.reason == "unparseable"


def test_nesting_is_bounded() -> None:
    body = _element(0x00081150, b"UI", b"1.2.3\x00")
    for _ in range(200):
        body = _sequence(0x00081115, _item(body, False), False)
    with pytest.raises(Refused) as caught:
        check_dataset(body, 0, len(body), False, True)
    assert caught.value.reason == "unparseable"


# -- bounded headers ------------------------------------------------------------------------
def _header_only(ts: str = ExplicitVRLittleEndian) -> bytes:
    ds = make_image("1.2.826.0.1.3680043.10.1234.78")
    del ds.PixelData
    del ds.Rows
    del ds.Columns
    return part10_bytes(ds, ts)


@pytest.mark.parametrize("ts", ENCODINGS, ids=IDS)
def test_a_sparse_file_is_refused_at_once(tmp_path: Path, ts: str) -> None:
    """A header followed by a 2 GiB hole: pydicom would walk the zeros for many minutes."""
    path = tmp_path / "sparse.dcm"
    path.write_bytes(_header_only(ts))
    with open(path, "r+b") as f:
        f.truncate(2 * 1024**3)
    for fast in (True, False):
        started = time.monotonic()
        with open(path, "rb") as f:
            state = SourceStat.of(os.fstat(f.fileno()))
            with pytest.raises(Refused) as caught:
                render(f, state, plan_of(BASIC), pseudonymizer(), fast=fast)
        assert caught.value.reason == "trailing_data"
        assert time.monotonic() - started < 5.0  # seconds, not the minutes of a full walk


def _big_header(private_bytes: int) -> bytes:
    """An image whose header holds ``private_bytes`` of private data before Pixel Data."""
    ds = make_image("1.2.826.0.1.3680043.10.1234.79")
    block = ds.private_block(0x0009, "DEIDFS TEST", create=True)
    block.add_new(0x10, "OB", b"\x00" * private_bytes)
    return part10_bytes(ds)


def test_a_header_past_the_bound_is_header_too_large() -> None:
    data = _big_header(3 * 1024 * 1024)
    stat = SourceStat(0, 0, len(data), 0, 0)
    for fast in (True, False):
        with pytest.raises(Refused) as caught:
            render(
                io.BytesIO(data),
                stat,
                plan_of(BASIC),
                pseudonymizer(),
                fast=fast,
                max_header_bytes=1024 * 1024,
            )
        assert caught.value.reason == "header_too_large"
        # Within the default bound the same file is served.
        render(io.BytesIO(data), stat, plan_of(BASIC), pseudonymizer(), fast=fast)


def test_the_daemon_withholds_a_sparse_file_and_serves_the_rest(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace("[daemon]\n", "[daemon]\nmax_header_mib = 1\n", 1))
    d.start()
    sparse = d.incoming / "hole.dcm"
    sparse.write_bytes(_header_only())
    with open(sparse, "r+b") as f:
        f.truncate(2 * 1024**3)
    big = d.incoming / "big.dcm"
    big.write_bytes(_big_header(3 * 1024 * 1024))
    d.add(sample_file("CT_small.dcm"), "ct.dcm")
    d.wait_views(1)

    def withheld() -> dict[str, int] | None:
        done = subprocess.run(
            [sys.executable, "-m", "deidfs", "status", "--json", "--config", str(d.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        reasons = json.loads(done.stdout)["folders"][0]["withheld"] if done.stdout else {}
        return reasons if len(reasons) >= 2 else None

    reasons = wait_for(withheld)
    assert reasons == {"trailing_data": 1, "header_too_large": 1}
    assert len(d.views()) == 1


@pytest.mark.parametrize("vr", [b"UT", b"LO", b"SQ"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_pixel_data_under_a_vr_it_cannot_have_is_withheld(fast: bool, vr: bytes) -> None:
    """Pixel Data is served verbatim: under UT or LO a reader would show its bytes as text."""
    data = _image_bytes()
    at = data.index(b"\xe0\x7f\x10\x00OW")
    text = b"Doe^Jane MRK0999991 "
    element = _element(0x7FE00010, vr, text) if vr != b"SQ" else _element(0x7FE00010, vr, b"")
    assert _outcome(data[:at] + element, fast) == "bad_pixel_data"


# -- pixel bytes past the image ---------------------------------------------------------------
@pytest.mark.parametrize("ts", ENCODINGS, ids=IDS)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_bytes_past_the_last_frame_are_served_as_zeros(ts: str, fast: bool) -> None:
    """Native Pixel Data longer than its image: no viewer shows the tail, any parser reads it."""
    ds = make_image("1.2.826.0.1.3680043.10.1234.80")  # 8 x 8, 16-bit: 128 bytes of image
    image = bytes(ds.PixelData)
    hidden = b"Doe^Jane MRK0999991 Springfield "
    ds.PixelData = image + hidden
    data = part10_bytes(ds, ts)
    served = _render(data, fast)
    assert b"MRK0999991" not in served
    pixels = dcmread(io.BytesIO(served)).PixelData
    assert pixels == image + b"\x00" * len(hidden)
    view = render(
        io.BytesIO(data), SourceStat(0, 0, len(data), 0, 0), plan_of(BASIC), pseudonymizer()
    )
    assert dict(view.report.counts)["pixel_excess_zeroed"] == 1


def test_an_image_of_the_size_its_header_says_is_served_unchanged() -> None:
    ds = make_image("1.2.826.0.1.3680043.10.1234.81")
    image = bytes(ds.PixelData)
    served = serve_bytes(part10_bytes(ds), plan_of(BASIC))
    assert served.ds.PixelData == image
    assert "pixel_excess_zeroed" not in dict(served.view.report.counts)
