"""Hostile input: mutated real files, bombs, deep nesting, odd names, links and locked files.

Every input must be either de-identified (the output parses with pydicom and shows no marker
outside an attribute the profile keeps) or refused with :class:`~deidfs.errors.Refused`;
never another exception, never a hang, never a crash of the daemon.

Time bound: each input is rendered in a separate worker process (:class:`FuzzWorker`) that
is killed, and the input counted as a hang, when it has not answered within
:data:`TIME_BOUND` seconds (10 s; a mutated sample renders in about 10 ms, the leak corpus
in about 80 ms). The worker also reports its peak RSS, so bombs are checked for memory too.

Seeds are real files: pydicom's test files (explicit and implicit little endian, big endian,
deflated, encapsulated JPEG 2000, RT plan and SR sequences) with markers planted in
identifying attributes, a nested sequence and a private block, and the leak corpus (every
attribute of PS3.15 Table E.1-1, three levels deep). Mutations: bit flips, byte writes,
truncations, insertions, deletions, length fields set to interesting values, tags swapped,
VRs replaced, elements duplicated. ``bench/soak.py`` runs the same campaign for longer.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import socket
import stat
import struct
import subprocess
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from conftest import Daemon, Originals, error_lines, sample_file, wait_for
from deidfs.deid.plan import Op, Plan
from deidfs.deid.profiles import BASIC
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.standard import Option
from deidfs.errors import Refused
from deidfs.secret import load_or_create_key
from deidfs.view.deflated import MAX_INFLATED
from deidfs.view.render import SourceStat, render
from leak_corpus import (
    build_leak_dataset,
    file_meta,
    make_image,
    part10_bytes,
    plan_of,
    pseudonymizer,
)

#: Seconds an input may take before its worker is killed and the input counted as a hang.
TIME_BOUND = 10.0
#: Markers: the leak corpus's scheme (``MRK0<5 digits>1``; base32 tokens have no 0 or 1).
MARKER = re.compile(rb"MRK0\d{5}1")
#: Operations that may carry a source value into the output.
KEEPING_OPS = frozenset({Op.KEEP, Op.VERBATIM, Op.CLEAN})
PIXEL_DATA = 0x7FE00010
DEFLATED = "1.2.840.10008.1.2.1.99"

PLANS: dict[str, Callable[[], Plan]] = {
    "basic": lambda: plan_of(BASIC),
    "options": lambda: plan_of(
        BASIC,
        Option.RETAIN_SAFE_PRIVATE,
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        Option.CLEAN_DESCRIPTORS,
        Option.RETAIN_PATIENT_CHARACTERISTICS,
    ),
}


@cache
def plan(name: str) -> Plan:
    return PLANS[name]()


# -- seeds -----------------------------------------------------------------------------------------

#: pydicom test files used as seeds, each with markers planted.
SAMPLE_SEEDS = (
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",  # encapsulated pixel data
    "rtplan.dcm",  # nested sequences
    "reportsi.dcm",  # SR content tree
)


def _marked(name: str, base: int) -> bytes:
    """A pydicom test file with markers in identifying attributes, nested and private."""
    ds = dcmread(sample_file(name))
    n = iter(range(base, base + 100))

    def mark() -> str:
        return f"MRK0{next(n):05d}1"

    ds.PatientName = f"{mark()}^{mark()}"
    ds.PatientID = mark()
    ds.InstitutionName = mark()
    ds.ReferringPhysicianName = mark()
    ds.AccessionNumber = mark()[:16]
    item = Dataset()
    item.PatientID = mark()
    item.IssuerOfPatientID = mark()
    ds.OtherPatientIDsSequence = Sequence([item])
    block = ds.private_block(0x0099, mark(), create=True)
    block.add_new(0x01, "LO", mark())
    block.add_new(0x02, "SQ", Sequence([item]))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@cache
def seeds() -> dict[str, bytes]:
    """Seed name -> file bytes (built once per process)."""
    out = {name: _marked(name, 90000 + 100 * k) for k, name in enumerate(SAMPLE_SEEDS)}
    corpus = build_leak_dataset()
    out["leak-explicit"] = part10_bytes(corpus.ds)
    out["leak-implicit"] = part10_bytes(build_leak_dataset().ds, ImplicitVRLittleEndian)
    return out


@dataclass(frozen=True)
class Header:
    """An element (or item) header in a file: where its tag and length field are."""

    at: int
    length_at: int
    length_size: int  #: 2 or 4
    end: int  #: offset past the header (the value starts here)


_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"})


def headers(data: bytes) -> list[Header]:
    """Element and item headers of a Part 10 file, top level and nested (best effort).

    Only used to aim mutations at length fields and tags; a misread just aims elsewhere.
    """
    out: list[Header] = []
    pos = 132 if data[128:132] == b"DICM" else 0
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        implicit, little = ds.original_encoding
    except Exception:
        implicit, little = False, True
    deflated = False
    if hasattr(ds, "file_meta"):
        deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        in_meta = group == 0x0002
        if deflated and not in_meta:
            break
        e = "<" if (little or in_meta) else ">"
        group, element = struct.unpack_from(e + "HH", data, pos)
        if group == 0xFFFE:
            out.append(Header(pos, pos + 4, 4, pos + 8))
            pos += 8  # into the item (or past a delimiter)
            continue
        if implicit and not in_meta:
            length = struct.unpack_from(e + "L", data, pos + 4)[0]
            try:
                is_sq = dictionary_VR((group << 16) | element) == "SQ"
            except KeyError:
                is_sq = False
            h = Header(pos, pos + 4, 4, pos + 8)
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    break
                length = struct.unpack_from(e + "L", data, pos + 8)[0]
                h = Header(pos, pos + 8, 4, pos + 12)
            else:
                length = struct.unpack_from(e + "H", data, pos + 6)[0]
                h = Header(pos, pos + 6, 2, pos + 8)
            is_sq = vr == b"SQ"
        out.append(h)
        # Into a sequence (or encapsulated pixel data), else past the value.
        pos = h.end if length == 0xFFFFFFFF or is_sq else h.end + length
    return out


# -- mutations -------------------------------------------------------------------------------------

INTERESTING_LENGTHS = (
    0,
    1,
    2,
    3,
    0xFF,
    0xFFFE,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFF0,
    0xFFFFFFFE,
    0xFFFFFFFF,
)
VRS = (b"SQ", b"UN", b"OB", b"OW", b"LO", b"PN", b"UI", b"DA", b"US", b"UL", b"FD", b"AT", b"\0\0")
KINDS = ("flip", "byte", "truncate", "insert", "delete", "length", "swap", "vr", "duplicate")


@dataclass(frozen=True)
class Mutation:
    """One change to a seed; integers are reduced modulo the file size or header count."""

    kind: str
    a: int
    b: int = 0
    payload: bytes = b""

    def apply(self, data: bytes, hdrs: list[Header]) -> bytes:
        if not data:
            return data
        n = len(data)
        at = self.a % n
        if self.kind == "flip":
            b = bytearray(data)
            b[at] ^= 1 << (self.b % 8)
            return bytes(b)
        if self.kind == "byte":
            b = bytearray(data)
            b[at] = self.b % 256
            return bytes(b)
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "insert":
            return data[:at] + self.payload + data[at:]
        if self.kind == "delete":
            return data[:at] + data[at + 1 + self.b % 64 :]
        if not hdrs:
            return data
        h = hdrs[self.a % len(hdrs)]
        if h.end > n:
            return data
        b = bytearray(data)
        if self.kind == "length":
            value = INTERESTING_LENGTHS[self.b % len(INTERESTING_LENGTHS)]
            if h.length_size == 2:
                value &= 0xFFFF
            # Either byte order: the file's own (little endian but for one seed) or not.
            order = ">" if (self.b >> 8) % 4 == 0 else "<"
            fmt = order + ("H" if h.length_size == 2 else "L")
            b[h.length_at : h.length_at + h.length_size] = struct.pack(fmt, value)
            return bytes(b)
        other = hdrs[self.b % len(hdrs)]
        if other.end > n:
            return data
        if self.kind == "swap":
            b[h.at : h.at + 4], b[other.at : other.at + 4] = (
                data[other.at : other.at + 4],
                data[h.at : h.at + 4],
            )
            return bytes(b)
        if self.kind == "vr":
            if h.end - h.at < 8 or h.length_at == h.at + 4:
                return data  # implicit VR or an item: no VR to replace
            b[h.at + 4 : h.at + 6] = VRS[self.b % len(VRS)]
            return bytes(b)
        # duplicate: copy one element header and what follows it elsewhere
        chunk = data[h.at : min(n, h.end + 64)]
        return data[: other.at] + chunk + data[other.at :]


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    hdrs = headers(data)
    for m in mutations:
        data = m.apply(data, hdrs)
    return data


mutation_strategy = st.builds(
    Mutation,
    st.sampled_from(KINDS),
    st.integers(0, 2**31),
    st.integers(0, 2**31),
    st.binary(min_size=1, max_size=16),
)


def random_mutations(rng: Any, count: int) -> list[Mutation]:
    """The same mutations drawn from ``random.Random`` (for the soak campaign)."""
    return [
        Mutation(
            rng.choice(KINDS),
            rng.randrange(2**31),
            rng.randrange(2**31),
            rng.randbytes(rng.randrange(1, 17)),
        )
        for _ in range(count)
    ]


# -- the worker process ----------------------------------------------------------------------------


def _peak_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _worker_main(conn: Connection) -> None:
    """Render what the parent sends, with the daemon's settings (warnings ignored)."""
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    pseudo = pseudonymizer()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        plan_name, data, key = request
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM: the peak reported is this input's
        t0 = time.monotonic()
        try:
            view = render(
                io.BytesIO(data),
                SourceStat(0, 0, len(data), 0, 0),
                plan(plan_name),
                pseudo if key is None else Pseudonymizer(key),
            )
            pixels = data[view.pixel_offset : view.pixel_offset + view.pixel_length]
            out = view.header + pixels + view.trailer
            reply: tuple[Any, ...] = ("served", out, str(view.relpath))
        except Refused as exc:
            reply = ("refused", exc.reason, str(exc))
        except BaseException as exc:  # the finding: anything but Refused
            reply = ("error", type(exc).__name__, traceback.format_exc())
        conn.send((*reply, time.monotonic() - t0, _peak_rss_kib()))


@dataclass(frozen=True)
class Outcome:
    """How one input ended."""

    kind: str  #: served, refused, error, hang, crash
    detail: str = ""  #: refusal reason, exception type, exit code
    output: bytes = b""
    relpath: str = ""
    seconds: float = 0.0
    peak_rss_kib: int = 0


class FuzzWorker:
    """A render worker process with a time bound per input; replaced after a hang or crash."""

    def __init__(self, time_bound: float = TIME_BOUND) -> None:
        self.time_bound = time_bound
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self.restarts = 0

    def _start(self) -> Connection:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        return parent

    def render(self, data: bytes, plan_name: str = "basic", key: bytes | None = None) -> Outcome:
        """Render ``data`` under a plan of :data:`PLANS` (with the test key, or ``key``)."""
        conn = self._conn if self._conn is not None else self._start()
        try:
            conn.send((plan_name, data, key))
            if not conn.poll(self.time_bound):
                self._kill()
                return Outcome("hang", f"no answer within {self.time_bound} s")
            reply = conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            return Outcome("crash", f"worker died (exit code {code})")
        kind, a, b, seconds, peak = reply
        if kind == "served":
            return Outcome(kind, "", a, b, seconds, peak)
        return Outcome(kind, a if kind == "refused" else f"{a}\n{b}", b"", "", seconds, peak)

    def _kill(self) -> None:
        self.restarts += 1
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = None
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(10)
        self._proc = None
        self._conn = None


# -- the check of served output --------------------------------------------------------------------


def _texts(value: Any) -> list[bytes]:
    if isinstance(value, bytes | bytearray):
        return [bytes(value)]
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [t for v in value for t in _texts(v)]
    return [str(value).encode("utf-8", "surrogateescape")]


@dataclass
class OutputCheck:
    """Where the markers of a served output are, and the values pydicom cannot convert."""

    allowed: set[bytes] = field(default_factory=set)
    denied: set[bytes] = field(default_factory=set)
    leaks: list[str] = field(default_factory=list)
    #: kept elements whose value does not fit their VR (garbage kept from the source)
    unconvertible: list[str] = field(default_factory=list)
    #: markers inside the bytes of a kept number or binary value (a corrupt length made the
    #: kept element swallow the elements after it, or a tag moved onto another's value)
    in_kept_binary: set[bytes] = field(default_factory=set)


def _element(ds: Dataset, tag: int, check: OutputCheck) -> tuple[str, Any, bytes]:
    """(VR, value, value bytes as stored) of an element of a parsed output."""
    stored = ds.get_item(tag)
    raw = stored.value if isinstance(stored, RawDataElement) else None
    try:
        elem = ds[tag]
    except Exception as exc:
        check.unconvertible.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {type(exc).__name__}")
        return "", raw, raw if isinstance(raw, bytes) else b""
    return elem.VR, elem.value, raw if isinstance(raw, bytes) else b""


def _markers_by_place(ds: Dataset, p: Plan, check: OutputCheck) -> None:
    for key in list(ds.keys()):
        tag = int(key)
        vr, value, stored = _element(ds, tag, check)
        if vr == "SQ":
            for item in value or []:
                _markers_by_place(item, p, check)
            continue
        # The value as text, and as stored: a marker in a number's bytes is found too.
        found = {m for t in [*_texts(value), stored] for m in MARKER.findall(t)}
        if not found:
            continue
        group = tag >> 16
        if group == 0x0002:
            keep = False
        elif group % 2:
            creator_tag = (tag & 0xFFFF0000) | ((tag & 0xFF00) >> 8)
            creator = _element(ds, creator_tag, check)[1] if creator_tag in ds else None
            name = str(creator) if creator is not None else None
            keep = (tag & 0xFF00) != 0 and p.decide_private(tag, name).op in KEEPING_OPS
        else:
            keep = tag == PIXEL_DATA or p.decide(tag).op in KEEPING_OPS
        (check.allowed if keep else check.denied).update(found)
        if keep and tag != PIXEL_DATA and not any(m in t for m in found for t in _texts(value)):
            check.in_kept_binary.update(found)


def check_output(output: bytes, p: Plan) -> OutputCheck:
    """Markers in ``output`` that are not the value of an attribute ``p`` keeps (leaks).

    A mutation may move a marker into an attribute the profile keeps (a flipped tag): that
    is the profile's decision, not a leak. A marker in a removed, emptied or replaced
    attribute, a private or file meta element, or outside any element, is a leak.
    """
    check = OutputCheck()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the reader makes of the output is checked below
        ds = dcmread(io.BytesIO(output))
        _markers_by_place(ds.file_meta, p, check)
        _markers_by_place(ds, p, check)
    plain = output
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        body_at = 144 + struct.unpack_from("<L", output, 140)[0]
        plain = output[:body_at] + zlib.decompressobj(-zlib.MAX_WBITS).decompress(output[body_at:])
    raw = set(MARKER.findall(plain))
    leaks = check.denied | (raw - check.allowed - check.denied)
    check.leaks = sorted(m.decode() for m in leaks)
    return check


def leaked_markers(output: bytes, p: Plan) -> list[str]:
    """The leaks :func:`check_output` finds."""
    return check_output(output, p).leaks


@dataclass
class FuzzStats:
    """Counts of a fuzz run."""

    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    peak_rss_kib: int = 0
    #: served outputs holding a kept value that does not fit its VR (garbage in, kept)
    unconvertible: int = 0
    #: served outputs with a marker inside a kept number or binary value
    in_kept_binary: int = 0
    findings: list[str] = field(default_factory=list)

    def record(self, case: str, outcome: Outcome, p: Plan) -> list[str]:
        """Count one outcome; return what is wrong with it (empty: fine)."""
        self.cases += 1
        self.outcomes[outcome.kind] += 1
        self.slowest = max(self.slowest, outcome.seconds)
        self.peak_rss_kib = max(self.peak_rss_kib, outcome.peak_rss_kib)
        problems: list[str] = []
        if outcome.kind == "refused":
            self.reasons[outcome.detail] += 1
        elif outcome.kind == "served":
            try:
                check = check_output(outcome.output, p)
            except Exception as exc:
                problems.append(f"served output does not parse: {type(exc).__name__}: {exc}")
            else:
                if check.leaks:
                    problems.append(f"markers leaked: {check.leaks}")
                if check.unconvertible:
                    self.unconvertible += 1
                if check.in_kept_binary:
                    self.in_kept_binary += 1
        else:
            problems.append(f"{outcome.kind}: {outcome.detail}")
        if problems and len(self.findings) < 50:
            self.findings.append(f"{case}: {'; '.join(problems)}")
        return problems

    def lines(self) -> list[str]:
        rate = self.cases / self.seconds if self.seconds else 0.0
        return [
            f"fuzz cases: {self.cases} in {self.seconds:.0f} s ({rate:.0f}/s)",
            f"outcomes: {dict(self.outcomes)}",
            f"refusal reasons: {dict(self.reasons.most_common())}",
            f"slowest case: {self.slowest * 1000:.0f} ms; worker peak RSS "
            f"{self.peak_rss_kib / 1024:.0f} MiB",
            f"served with a kept value that does not fit its VR: {self.unconvertible}",
            f"served with a marker inside a kept number or binary value: {self.in_kept_binary}",
            f"findings: {len(self.findings)}",
        ]


def campaign(worker: FuzzWorker, seconds: float, seed: int = 0) -> FuzzStats:
    """Random mutations of every seed under every plan for ``seconds`` (the soak profile)."""
    import random

    rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
    names = sorted(seeds())
    stats = FuzzStats()
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        name = rng.choice(names)
        plan_name = rng.choice(sorted(PLANS))
        mutations = random_mutations(rng, rng.randrange(1, 5))
        data = mutate(seeds()[name], mutations)
        stats.record(f"{name} {mutations}", worker.render(data, plan_name), plan(plan_name))
    stats.seconds = time.monotonic() - start
    return stats


# -- tests: the worker and the seeds ---------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[FuzzWorker]:
    w = FuzzWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def stats() -> Iterator[FuzzStats]:
    s = FuzzStats()
    started = time.monotonic()
    yield s
    s.seconds = time.monotonic() - started
    print("\n" + "\n".join(s.lines()))


def test_every_seed_is_served_without_its_markers(worker: FuzzWorker) -> None:
    for name, data in seeds().items():
        assert MARKER.search(data) or name == "image_dfl.dcm", name
        for plan_name in PLANS:
            outcome = worker.render(data, plan_name)
            assert outcome.kind == "served", (name, outcome.detail)
            assert leaked_markers(outcome.output, plan(plan_name)) == [], name
            if name in SAMPLE_SEEDS:
                # Markers planted in samples are all in removed attributes: none shows.
                assert not MARKER.search(outcome.output), name
    dfl = dcmread(io.BytesIO(seeds()["image_dfl.dcm"]))
    assert MARKER.search(str(dfl.PatientName).encode())


def test_the_time_bound_is_enforced() -> None:
    w = FuzzWorker(time_bound=0.001)
    try:
        outcome = w.render(seeds()["leak-explicit"])
        assert outcome.kind == "hang"
        assert w.restarts == 1
    finally:
        w.close()


def test_the_leak_check_finds_a_planted_leak() -> None:
    """The oracle itself: a marker in a removed attribute of served bytes is reported."""
    ds = make_image("1.2.826.0.1.3680043.10.998.7", patient_name="MRK0777771^X")
    data = part10_bytes(ds)
    assert leaked_markers(data, plan("basic")) == ["MRK0777771"]
    ds.SeriesDescription = "MRK0777781"  # removed by Basic, cleaned (kept) by Clean Descriptors
    ds.PatientName = "Anon"
    assert leaked_markers(part10_bytes(ds), plan("basic")) == ["MRK0777781"]
    assert leaked_markers(part10_bytes(ds), plan("options")) == []
    ds.PixelData = ds.PixelData[:-10] + b"MRK0777791"  # pixels are the originals'
    assert leaked_markers(part10_bytes(ds), plan("options")) == []


def test_file_meta_elements_inside_the_data_set_never_reach_the_output(
    worker: FuzzWorker,
) -> None:
    """Found by the campaign: the group length's tag swapped with a later element's tag ends
    the file meta group at once, and pydicom reads the rest of it into the data set. Those
    elements (Source AE Title, Implementation Version Name, Private Information) are file
    meta, never carried from a source, wherever they appear."""
    data = seeds()["leak-explicit"]
    hdrs = headers(data)
    meta_markers = set(MARKER.findall(data[: hdrs[10].at]))
    assert len(meta_markers) == 3  # the leak corpus plants three in its file meta
    mutated = mutate(data, [Mutation("swap", 0, 10)])
    for plan_name in PLANS:
        outcome = worker.render(mutated, plan_name)
        assert outcome.kind in ("served", "refused"), outcome.detail
        if outcome.kind == "served":
            assert leaked_markers(outcome.output, plan(plan_name)) == []
            assert not meta_markers & set(MARKER.findall(outcome.output))


def test_encapsulated_pixel_data_with_another_vr_is_refused(worker: FuzzWorker) -> None:
    """Found by the soak campaign: encapsulated Pixel Data (undefined length) whose VR was
    changed from OB to UN was served as it was, and no reader can parse it (an undefined
    length UN is read as an implicit VR sequence)."""
    data = seeds()["JPEG2000.dcm"]
    at = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    for vr in (b"UN", b"OW", b"SQ", b"LO"):
        mutated = data[: at + 4] + vr + data[at + 6 :]
        for plan_name in PLANS:
            outcome = worker.render(mutated, plan_name)
            assert outcome.kind in ("served", "refused"), outcome.detail
            if outcome.kind == "served":
                check_output(outcome.output, plan(plan_name))  # parses, or raises


# -- tests: the Hypothesis campaign ----------------------------------------------------------------


@settings(
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    name=st.sampled_from(sorted(SAMPLE_SEEDS) * 3 + ["leak-explicit", "leak-implicit"]),
    plan_name=st.sampled_from(sorted(PLANS)),
    mutations=st.lists(mutation_strategy, min_size=1, max_size=4),
)
def test_mutated_files_are_de_identified_or_refused(
    worker: FuzzWorker, stats: FuzzStats, name: str, plan_name: str, mutations: list[Mutation]
) -> None:
    data = mutate(seeds()[name], mutations)
    outcome = worker.render(data, plan_name)
    problems = stats.record(f"{name} {mutations}", outcome, plan(plan_name))
    assert problems == []
    assert outcome.seconds < TIME_BOUND


# -- tests: bombs, huge lengths, deep nesting ------------------------------------------------------


def _deflated_file(body_chunks: Iterator[bytes]) -> bytes:
    """A deflated Part 10 file whose data set is the concatenation of ``body_chunks``."""
    meta = file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.10.998.9")
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds = Dataset()
    ds.file_meta = meta
    head = part10_bytes(ds)  # preamble and meta; an empty data set
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(c) for c in body_chunks]
    parts.append(deflater.flush())
    return head + b"".join(parts)


def _big_element_body(total: int) -> Iterator[bytes]:
    """SOP Instance UID, then a private OB element of ``total`` zero bytes, in chunks."""
    uid = b"1.2.826.0.1.3680043.10.998.9\x00"
    yield struct.pack("<HH", 0x0008, 0x0018) + b"UI" + struct.pack("<H", len(uid)) + uid
    yield struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 4) + b"ACME"
    yield struct.pack("<HH", 0x0009, 0x1001) + b"OB\0\0" + struct.pack("<L", total)
    chunk = bytes(16 << 20)
    left = total
    while left > 0:
        yield chunk[: min(left, len(chunk))]
        left -= len(chunk)


@pytest.mark.slow
def test_deflate_bomb_is_refused_quickly_with_bounded_memory(worker: FuzzWorker) -> None:
    bomb = _deflated_file(_big_element_body(MAX_INFLATED + (64 << 20)))
    assert len(bomb) < 1 << 20  # under a megabyte on disk
    outcome = worker.render(bomb)
    print(
        f"\ndeflate bomb: {len(bomb)} bytes -> refused {outcome.detail} in "
        f"{outcome.seconds:.2f} s, worker peak RSS {outcome.peak_rss_kib / 1024:.0f} MiB"
    )
    assert outcome.kind == "refused", outcome.detail
    assert outcome.detail == "too_large"
    assert outcome.seconds < 5.0
    # Inflating stops at the limit: memory stays within the limit plus the worker itself.
    assert outcome.peak_rss_kib * 1024 < MAX_INFLATED + (256 << 20)


@pytest.mark.parametrize(
    ("where", "length"),
    [
        (where, length)
        for where in ("meta", "top", "item", "pixels")
        for length in (0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE)
    ],
)
def test_huge_declared_lengths_are_refused_quickly(
    worker: FuzzWorker, where: str, length: int
) -> None:
    data = bytearray(seeds()["CT_small.dcm"])
    hdrs = headers(bytes(data))
    if where == "meta":
        target = next(h for h in hdrs if data[h.at : h.at + 4] == b"\x02\x00\x02\x00")
    elif where == "top":
        target = next(h for h in hdrs if data[h.at : h.at + 4] == b"\x10\x00\x10\x00")
    elif where == "item":
        target = next(h for h in hdrs if data[h.at : h.at + 4] == b"\xfe\xff\x00\xe0")
    else:
        target = next(h for h in hdrs if data[h.at : h.at + 4] == b"\xe0\x7f\x10\x00")
    fmt = "<H" if target.length_size == 2 else "<L"
    value = length & 0xFFFF if target.length_size == 2 else length
    data[target.length_at : target.length_at + target.length_size] = struct.pack(fmt, value)
    outcome = worker.render(bytes(data))
    assert outcome.kind in ("refused", "served"), outcome.detail
    if outcome.kind == "served":
        assert leaked_markers(outcome.output, plan("basic")) == []
    assert outcome.seconds < 2.0
    assert outcome.peak_rss_kib < 512 * 1024


def _nested(depth: int, implicit: bool, undefined: bool) -> bytes:
    """A valid image whose Referenced Image Sequence nests ``depth`` levels deep.

    Written byte by byte (pydicom's writer recurses once per level); the innermost item
    holds a marked Patient Name, which Basic empties wherever it is.
    """
    ds = make_image("1.2.826.0.1.3680043.10.998.8", patient_name="Deep^Image")
    ds.ReferencedImageSequence = Sequence([])
    ts = ImplicitVRLittleEndian if implicit else None
    data = part10_bytes(ds, ts)
    placeholder = b"\x08\x00\x40\x11" + (b"" if implicit else b"SQ\x00\x00") + bytes(4)
    assert data.count(placeholder) == 1

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            return head + struct.pack("<L", len(value)) + value
        return head + vr + struct.pack("<H", len(value)) + value

    def wrapped(head: bytes, content: bytes, delimiter: int) -> bytes:
        if undefined:
            end = struct.pack("<HHL", 0xFFFE, delimiter, 0)
            return head + b"\xff\xff\xff\xff" + content + end
        return head + struct.pack("<L", len(content)) + content

    uid = element(0x00081155, b"UI", b"1.2.826.0.1.3680043.10.998.8.1\x00")
    content = uid + element(0x00100010, b"PN", b"MRK0888881^Inner ")
    sq_head = b"\x08\x00\x40\x11" + (b"" if implicit else b"SQ\x00\x00")
    for _ in range(depth):
        item = wrapped(b"\xfe\xff\x00\xe0", content, 0xE00D)
        content = wrapped(sq_head, item, 0xE0DD) + uid
    sequence = content[: -len(uid)]
    return data.replace(placeholder, sequence)


@pytest.mark.parametrize("depth", [200, 2000])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_deep_sequence_nesting_is_refused_or_served_clean(
    worker: FuzzWorker, depth: int, implicit: bool, undefined: bool
) -> None:
    outcome = worker.render(_nested(depth, implicit, undefined))
    print(f"\ndepth {depth}: {outcome.kind} {outcome.detail} in {outcome.seconds:.2f} s")
    assert outcome.kind in ("served", "refused"), outcome.detail
    if outcome.kind == "served":
        assert not MARKER.search(outcome.output)
    assert outcome.seconds < TIME_BOUND


# -- tests: through the mount ----------------------------------------------------------------------

fuse = pytest.mark.fuse


def _index_rows(d: Daemon) -> dict[str, tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(d.state / "index.sqlite3") as conn:
        rows = conn.execute("SELECT path, status, reason FROM sources").fetchall()
    conn.close()
    return {os.fsdecode(p): (s, r) for p, s, r in rows}


@fuse
def test_mutated_files_through_the_mount(
    daemon_factory: Callable[..., Daemon], worker: FuzzWorker, originals: Originals
) -> None:
    import random

    d = daemon_factory(profile="Basic")
    key = load_or_create_key(d.state)
    rng = random.Random(42)  # noqa: S311 (test data)
    names = sorted(seeds())
    expected: dict[str, Outcome] = {}
    for n in range(60):
        name = names[n % len(names)]
        data = mutate(seeds()[name], random_mutations(rng, rng.randrange(1, 4)))
        path = d.incoming / f"m{n:03d}.dcm"
        path.write_bytes(data)
        expected[str(path)] = worker.render(data, "basic", key)
    originals.record(d.incoming)
    d.start()
    wait_for(lambda: len(_index_rows(d)) == len(expected), timeout=60, interval=0.2)
    served = [o for o in expected.values() if o.kind == "served"]
    relpaths = {o.relpath for o in served}
    d.wait_views(len(relpaths), timeout=30)
    assert d.proc is not None
    assert d.proc.poll() is None
    rows = _index_rows(d)
    views = {str(v.relative_to(d.folder)): v.read_bytes() for v in d.views()}
    for path, outcome in expected.items():
        status, reason = rows[path]
        assert outcome.kind in ("served", "refused"), outcome.detail
        if outcome.kind == "refused":
            assert (status, reason) == ("refused", outcome.detail), path
        else:
            assert status == "ok", (path, reason)
            assert outcome.relpath in views
    for data in views.values():
        assert leaked_markers(data, plan("basic")) == []
    # A view is one of the one-shot outputs (two mutants of one seed may share a path).
    outputs = {o.output for o in served}
    assert all(v in outputs for v in views.values())
    print(f"\n{len(served)} of {len(expected)} mutants served, {len(views)} views")
    assert d.stop() == 0
    assert error_lines(d.log()) == []


def _odd_names() -> list[bytes]:
    return [
        b"M\xfcller^Hans.dcm",  # Latin-1
        b"\xff\xfe\xfd.dcm",  # no encoding at all
        b"line\nbreak QZXLOG1001.dcm",  # a forged log line
        b"tab\tand\rreturn QZXLOG1002.dcm",
        b"\x1b[31mred QZXLOG1003\x1b[0m.dcm",  # terminal escapes
        b"percent %s %d %(x)s QZXLOG1004.dcm",  # format strings
        b"-leading-dash QZXLOG1005.dcm",
        b"back\\slash 'quote' \"dq\" QZXLOG1006.dcm",
        b"\xe2\x80\xaeevil RTL QZXLOG1007.dcm",  # right-to-left override
        b"QZXLOG1008" + b"x" * 236 + b".dcm",  # 250 bytes (+ ".part" while copied: 255)
        "Ωμέγα 日本 QZXLOG1009.dcm".encode(),
    ]


@fuse
def test_names_with_odd_bytes_are_served_and_never_logged(
    daemon_factory: Callable[..., Daemon], originals: Originals
) -> None:
    d = daemon_factory().start()
    names = _odd_names()
    odd_dir = os.fsdecode(b"dir\nwith QZXLOG1010 \xfe")
    for n, raw in enumerate(names):
        ds = make_image(f"1.2.826.0.1.3680043.10.998.5.{n}")
        src = d.root / f"src{n}.dcm"
        src.write_bytes(part10_bytes(ds))
        d.add(src, f"{odd_dir}/{os.fsdecode(raw)}")
    views = d.wait_views(len(names), timeout=30)
    originals.record(d.incoming)
    for v in views:
        assert "QZXLOG" not in str(v)
        dcmread(v)
    assert d.stop() == 0
    log = d.log()
    assert "QZXLOG" not in log
    assert "ller" not in log
    assert error_lines(log) == []


@fuse
def test_symlinks_out_of_the_folder_are_never_followed(
    daemon_factory: Callable[..., Daemon], originals: Originals
) -> None:
    d = daemon_factory()
    outside = d.root / "outside"
    outside.mkdir()
    secret_file = outside / "secret.dcm"
    secret_file.write_bytes(part10_bytes(make_image("1.2.826.0.1.3680043.10.998.6.1")))
    (outside / "sub").mkdir()
    (outside / "sub" / "other.dcm").write_bytes(
        part10_bytes(make_image("1.2.826.0.1.3680043.10.998.6.2"))
    )
    originals.record(outside)
    os.symlink(secret_file, d.incoming / "link.dcm")
    os.symlink(outside, d.incoming / "linkdir")
    os.symlink(outside / "sub", d.incoming / "linksub")
    os.symlink("../outside/secret.dcm", d.incoming / "relative.dcm")
    os.symlink("/nonexistent/dangling.dcm", d.incoming / "dangling.dcm")
    (d.incoming / "deeper").mkdir()
    os.symlink(secret_file, d.incoming / "deeper" / "link2.dcm")
    good = d.incoming / "good.dcm"
    good.write_bytes(part10_bytes(make_image("1.2.826.0.1.3680043.10.998.6.3")))
    before_atime = os.stat(secret_file).st_atime_ns
    d.start()
    (view,) = d.wait_views(1, timeout=20)
    time.sleep(1.0)  # the scan had time to meet every link
    assert len(d.views()) == 1
    assert view.read_bytes() == d.expected(good)[1]
    rows = _index_rows(d)
    # No row for anything under a linked directory; links themselves withheld or skipped.
    assert not any("linkdir" in p or "linksub" in p for p in rows)
    assert {p for p, (s, _) in rows.items() if s == "ok"} == {str(good)}
    assert os.stat(secret_file).st_atime_ns == before_atime
    assert d.stop() == 0


@fuse
def test_unreadable_files_are_withheld_and_the_daemon_keeps_serving(
    daemon_factory: Callable[..., Daemon], originals: Originals
) -> None:
    """Files the daemon cannot open: the daemon runs as root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (``setpriv``), so mode 000 stops it as it would stop a service user.
    Also a FIFO, a socket and a dangling link, which no one can read as a file."""
    d = daemon_factory(
        command_prefix=("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    )
    files = {}
    for n, name in enumerate(("locked.dcm", "good.dcm", "lockeddir/inner.dcm")):
        p = d.incoming / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(part10_bytes(make_image(f"1.2.826.0.1.3680043.10.998.4.{n}")))
        files[name] = p
    os.mkfifo(d.incoming / "fifo.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d.incoming / "socket.dcm"))
    os.symlink(d.incoming / "missing.dcm", d.incoming / "dangling.dcm")
    files["locked.dcm"].chmod(0)
    (d.incoming / "lockeddir").chmod(0)
    try:
        originals.record(files["good.dcm"])
        d.start()
        (view,) = d.wait_views(1, timeout=20)
        assert view.read_bytes() == d.expected(files["good.dcm"])[1]
        time.sleep(1.0)
        rows = _index_rows(d)
        assert rows[str(files["locked.dcm"])] == ("refused", "unreadable")
        assert str(files["lockeddir/inner.dcm"]) not in rows
        # Made readable again: served once a change is seen.
        files["locked.dcm"].chmod(0o644)
        os.utime(files["locked.dcm"])
        wait_for(lambda: len(d.views()) == 2, timeout=20)
        assert d.proc is not None
        assert d.proc.poll() is None
        assert d.stop() == 0
        assert error_lines(d.log()) == []
    finally:
        sock.close()
        (d.incoming / "lockeddir").chmod(0o755)
        files["locked.dcm"].chmod(0o644)
    assert stat.S_ISFIFO(os.lstat(d.incoming / "fifo.dcm").st_mode)


def test_setpriv_really_drops_the_override(tmp_path: Path) -> None:
    """The premise of the unreadable-file test: without the capabilities, root is refused."""
    locked = tmp_path / "locked"
    locked.write_bytes(b"x")
    locked.chmod(0)
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", "cat", str(locked)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode != 0
    assert b"Permission denied" in done.stderr
    assert subprocess.run(["cat", str(locked)], capture_output=True, check=False).returncode == 0


def test_a_sop_class_uid_that_swallowed_elements_is_refused(worker: FuzzWorker) -> None:
    """Found by the campaign: a duplicated run of bytes gave SOP Class UID a length that took
    in the Accession Number after it; the engine copied the value, marker included, into
    the file meta's Media Storage SOP Class UID. A SOP Class UID that is not a UID is refused."""
    mutated = mutate(seeds()["MR_small_implicit.dcm"], [Mutation("duplicate", 1401, 2630, b"\x00")])
    for plan_name in PLANS:
        outcome = worker.render(mutated, plan_name)
        assert outcome.kind in ("served", "refused"), outcome.detail
        if outcome.kind == "served":
            assert leaked_markers(outcome.output, plan(plan_name)) == []
    assert worker.render(mutated, "basic").kind == "refused"
