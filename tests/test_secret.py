"""The per-installation pseudonym key: created safely once, refused when unsafe."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import SecretError
from deidfs.secret import KEY_BYTES, key_path, load_or_create_key


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 0, so only explicit modes protect what is created."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.usefixtures("open_umask")
def test_first_run_creates_state_dir_and_key_0600(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "deidfs"
    key = load_or_create_key(state)
    assert len(key) == KEY_BYTES
    assert mode_of(state) == 0o700
    path = key_path(state)
    assert path == state / "secret.key"
    assert mode_of(path) == 0o600
    assert path.read_text() == key.hex() + "\n"
    # Nothing but the key is left behind (no temporary file).
    assert os.listdir(state) == ["secret.key"]


def test_key_is_stable_across_calls_and_usable(tmp_path: Path) -> None:
    first = load_or_create_key(tmp_path)
    second = load_or_create_key(tmp_path)
    assert first == second
    assert Pseudonymizer(first).uid("1.2.3") == Pseudonymizer(second).uid("1.2.3")
    other = load_or_create_key(tmp_path / "other")
    assert other != first


def test_concurrent_first_runs_agree_on_one_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    barrier = threading.Barrier(8)
    keys: list[bytes] = []

    def start() -> None:
        barrier.wait()
        keys.append(load_or_create_key(state))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert os.listdir(state) == ["secret.key"]


def test_a_key_written_by_hand_is_accepted(tmp_path: Path) -> None:
    key = bytes(range(48))
    path = key_path(tmp_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(fd, key.hex().upper().encode())  # no newline, upper case, longer than 32 bytes
    os.close(fd)
    assert load_or_create_key(tmp_path) == key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_key_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = load_or_create_key(tmp_path)
    path = key_path(tmp_path)
    path.chmod(mode)
    with pytest.raises(SecretError, match=f"mode {mode:04o}") as info:
        load_or_create_key(tmp_path)
    assert "chmod 600" in str(info.value)
    assert key.hex() not in str(info.value)
    assert path.read_text() == key.hex() + "\n"  # refused, not replaced


def test_symlinked_key_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    real = load_or_create_key(elsewhere)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key_path(state).symlink_to(key_path(elsewhere))
    with pytest.raises(SecretError, match="symbolic link"):
        load_or_create_key(state)
    assert key_path(elsewhere).read_text() == real.hex() + "\n"


def test_dangling_symlink_is_refused_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "planted"
    key_path(tmp_path).symlink_to(target)
    with pytest.raises(SecretError, match="symbolic link"):
        load_or_create_key(tmp_path)
    assert not target.exists()


def test_directory_or_fifo_instead_of_key_is_refused(tmp_path: Path) -> None:
    key_path(tmp_path).mkdir(mode=0o700)
    with pytest.raises(SecretError, match="not a regular file"):
        load_or_create_key(tmp_path)
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir(mode=0o700)
    os.mkfifo(key_path(fifo_dir), 0o600)
    with pytest.raises(SecretError, match="not a regular file"):
        load_or_create_key(fifo_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "malformed"),
        (b"not hex at all\n", "malformed"),
        (b"abc\n", "malformed"),  # odd number of digits
        (b"00" * 8 + b"\n", "too short: 8 bytes"),
        (b"00" * 3000, "malformed"),  # longer than any sensible key file
    ],
)
def test_malformed_or_short_key_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = key_path(tmp_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(SecretError, match=message):
        load_or_create_key(tmp_path)
    assert path.read_bytes() == content


def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    load_or_create_key(tmp_path)
    os.chown(key_path(tmp_path), 4242, 4242)
    with pytest.raises(SecretError, match="another user"):
        load_or_create_key(tmp_path)


def test_group_writable_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o770)
    with pytest.raises(SecretError, match="writable by group or others"):
        load_or_create_key(state)
    assert not key_path(state).exists()


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(SecretError, match="not a directory"):
        load_or_create_key(tmp_path / "state")


def test_key_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="deidfs"):
        key = load_or_create_key(tmp_path / "state")
        load_or_create_key(tmp_path / "state")
    assert "pseudonym key" in caplog.text
    assert key.hex() not in caplog.text.lower()
