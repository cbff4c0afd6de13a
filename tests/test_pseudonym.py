"""Keyed deterministic pseudonyms: UIDs, tokens and per-patient date shifts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deidfs.deid.pseudonym import MAX_SHIFT_DAYS, MEMO_ENTRIES, TOKEN_LENGTH, Pseudonymizer
from deidfs.errors import SecretError

KEY = b"k" * 32
OTHER = b"o" * 32
#: PS3.5 9.1: components of digits, no leading zero unless the component is "0".
UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

uids = st.from_regex(r"\A[12](\.[1-9][0-9]{0,8}){2,12}\Z")


@given(uids)
def test_uid_form(uid: str) -> None:
    out = Pseudonymizer(KEY).uid(uid)
    assert out.startswith("2.25.")
    assert len(out) <= 64
    assert UID_SYNTAX.match(out)
    assert int(out[5:]) < 2**128


@given(uids)
def test_same_key_same_uid_different_key_different_uid(uid: str) -> None:
    a, b, c = Pseudonymizer(KEY), Pseudonymizer(bytes(KEY)), Pseudonymizer(OTHER)
    assert a.uid(uid) == b.uid(uid) == a.uid(uid)
    assert a.uid(uid) != c.uid(uid)
    assert a.uid(uid) != uid


def test_uid_ignores_padding_and_distinguishes_values() -> None:
    p = Pseudonymizer(KEY)
    assert p.uid("1.2.3\x00") == p.uid("1.2.3") == p.uid(" 1.2.3 ")
    assert p.uid("1.2.3") != p.uid("1.2.30")
    many = {p.uid(f"1.2.3.{i}") for i in range(5000)}
    assert len(many) == 5000


def test_uid_cache_does_not_change_results() -> None:
    p = Pseudonymizer(KEY)
    first = [p.uid(f"1.2.{i}") for i in range(70000)]  # past the cache bound
    fresh = Pseudonymizer(KEY)
    assert [fresh.uid(f"1.2.{i}") for i in reversed(range(70000))][::-1] == first


@given(st.text(max_size=64), st.sampled_from(["id", "patient", "path"]))
def test_token_form(value: str, domain: str) -> None:
    t = Pseudonymizer(KEY).token(value, domain)
    assert len(t) == TOKEN_LENGTH
    assert re.fullmatch(r"[A-Z2-7]+", t)
    assert t == Pseudonymizer(KEY).token(value, domain)
    assert t != Pseudonymizer(OTHER).token(value, domain)


def test_domains_are_separate() -> None:
    p = Pseudonymizer(KEY)
    assert p.token("12345", "id") != p.token("12345", "patient")
    assert p.token("12345", "id") != p.token("12346", "id")


@given(st.text(min_size=1, max_size=64))
def test_date_shift_per_patient(patient: str) -> None:
    p = Pseudonymizer(KEY)
    days = p.date_shift_days(patient)
    assert 1 <= days <= MAX_SHIFT_DAYS
    assert days == Pseudonymizer(KEY).date_shift_days(patient)


def test_date_shift_differs_between_patients_and_keys() -> None:
    p = Pseudonymizer(KEY)
    shifts = {p.date_shift_days(f"PAT{i}") for i in range(200)}
    assert len(shifts) > 150  # spread over 3650 days
    q = Pseudonymizer(OTHER)
    assert sum(p.date_shift_days(f"PAT{i}") != q.date_shift_days(f"PAT{i}") for i in range(50)) > 45


def test_short_key_refused() -> None:
    with pytest.raises(SecretError):
        Pseudonymizer(b"short")


def test_same_output_in_another_process() -> None:
    code = (
        "from deidfs.deid.pseudonym import Pseudonymizer\n"
        "p = Pseudonymizer(b'k' * 32)\n"
        "print(p.uid('1.2.3.4'), p.token('PAT1'), p.date_shift_days('PAT1'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    p = Pseudonymizer(KEY)
    assert out == [p.uid("1.2.3.4"), p.token("PAT1"), str(p.date_shift_days("PAT1"))]


def test_memos_stay_bounded_and_never_change_a_result() -> None:
    """Indexing a large folder derives one-off values (every SOP Instance UID, every path):
    the memos start over instead of growing, and a value derived again is the same."""
    p = Pseudonymizer(b"k" * 32)
    fresh = Pseudonymizer(b"k" * 32)
    uids = [f"1.2.3.{n}" for n in range(3 * MEMO_ENTRIES)]
    first = [p.uid(u) for u in uids]
    paths = [p.token(f"/data/ct/{n}.dcm", "path") for n in range(MEMO_ENTRIES)]
    assert len(p._uids) <= MEMO_ENTRIES
    assert len(p._tokens) == 0  # path tokens are never memoized
    assert [p.uid(u) for u in uids] == first == [fresh.uid(u) for u in uids]
    assert paths == [fresh.token(f"/data/ct/{n}.dcm", "path") for n in range(MEMO_ENTRIES)]
    ids = [p.token(f"PID{n}") for n in range(2 * MEMO_ENTRIES)]
    assert 0 < len(p._tokens) <= MEMO_ENTRIES
    assert ids == [fresh.token(f"PID{n}") for n in range(2 * MEMO_ENTRIES)]
