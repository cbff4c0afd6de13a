"""The per-installation pseudonym secret: ``<state_dir>/secret.key``.

Every pseudonym (UIDs, IDs, names, date shifts) is an HMAC under this key, so the same key
gives the same output on every restart and every machine, and a new key changes all of them.
Back it up with the state directory; copy it to another machine to get identical output there.

File format: the key as hexadecimal text and a newline (64 digits for the 32 random bytes
deidfs creates), so it survives copying with text tools. A key written by hand may be longer,
but not shorter than :data:`~deidfs.deid.pseudonym.MIN_KEY_BYTES` bytes.

The file must be a regular file (not a symbolic link) of mode 0600 or stricter, owned by the
daemon's user or root; the state directory must not be writable by group or others. Anything
else is refused with :class:`~deidfs.errors.SecretError` rather than used. The key itself is
never logged nor put in an error message.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path

from deidfs.deid.pseudonym import MIN_KEY_BYTES
from deidfs.errors import SecretError

log = logging.getLogger(__name__)

KEY_FILE = "secret.key"
KEY_BYTES = 32  #: size of a newly created key
_MAX_FILE_BYTES = 4096
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")


def key_path(state_dir: Path) -> Path:
    """Where the key of the installation with this state directory lives."""
    return state_dir / KEY_FILE


def load_or_create_key(state_dir: Path) -> bytes:
    """Return the installation's pseudonym key, creating it on first run.

    Creates ``state_dir`` (mode 0700) if missing, and the key file with 32 random bytes, mode
    0600 whatever the umask, published atomically: a concurrent start never sees a partial
    file, and never replaces a key another process has just created.

    Parameters
    ----------
    state_dir
        The daemon's state directory (``[daemon] state_dir``).

    Returns
    -------
    bytes
        The key.

    Raises
    ------
    SecretError
        The key file or state directory is unsafe (readable or writable by others, a
        symbolic link, not a regular file, owned by another user), malformed, too short, or
        cannot be read or created.
    """
    _check_state_dir(state_dir)
    path = key_path(state_dir)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    _create_key(state_dir, path)
    return _read_key(path)


def read_key_file(path: Path) -> bytes:
    """Return the key held in the existing key file ``path`` (same format and checks).

    Raises
    ------
    SecretError
        The file does not exist, or is unsafe or malformed as for :func:`load_or_create_key`.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        raise SecretError(f"key file {path} does not exist") from None


def _check_state_dir(state_dir: Path) -> None:
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        st = _make_state_dir(state_dir)
    except OSError as exc:
        raise SecretError(f"cannot use state directory {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SecretError(f"state directory {state_dir} is not a directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write the directory can swap the key file for one of their own.
        raise SecretError(
            f"state directory {state_dir} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod go-w {state_dir}"
        )


def _make_state_dir(state_dir: Path) -> os.stat_result:
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(state_dir, 0o700)
    except FileExistsError:
        pass  # created meanwhile by another process; checked like any existing one
    except OSError as exc:
        raise SecretError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    else:
        os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
        log.info("created state directory %s", state_dir)
    return os.stat(state_dir)


def _read_key(path: Path) -> bytes:
    """Read and check the key file; ``FileNotFoundError`` when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SecretError(f"cannot look up key file {path}: {exc.strerror}") from None
    _check_file(path, st)
    try:
        # O_NOFOLLOW: a symlink swapped in after the lstat fails instead of being followed;
        # O_NONBLOCK: a FIFO swapped in cannot hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        _check_file(path, os.fstat(fd))
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _decode(path, data)


def _check_file(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise SecretError(f"key file {path} is a symbolic link; it must be a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecretError(
            f"key file {path} is accessible by group or others (mode {mode:04o}); if it may "
            f"have been read, pseudonyms can be reversed by guessing. Run: chmod 600 {path}"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise SecretError(f"key file {path} belongs to another user (uid {st.st_uid})")


def _decode(path: Path, data: bytes) -> bytes:
    text = data.strip()
    if len(data) > _MAX_FILE_BYTES or not _HEX.match(text) or len(text) % 2:
        raise SecretError(f"key file {path} is malformed: expected one line of hexadecimal digits")
    key = bytes.fromhex(text.decode("ascii"))
    if len(key) < MIN_KEY_BYTES:
        raise SecretError(
            f"key in {path} is too short: {len(key)} bytes, at least {MIN_KEY_BYTES} needed"
        )
    return key


def _create_key(state_dir: Path, path: Path) -> None:
    key = secrets.token_bytes(KEY_BYTES)
    tmp = state_dir / f".{KEY_FILE}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise SecretError(f"cannot create key file in {state_dir}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the mode given to open() is filtered by the umask
            payload = memoryview(key.hex().encode("ascii") + b"\n")
            while payload:
                payload = payload[os.write(fd, payload) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() publishes the complete file under its name and, unlike rename(), never
            # replaces a key that another process created in the meantime.
            os.link(tmp, path)
        except FileExistsError:
            log.info("pseudonym key created concurrently by another process; using that one")
        else:
            log.info("created a new pseudonym key in %s", state_dir)
    except OSError as exc:
        raise SecretError(f"cannot create key file in {state_dir}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(state_dir)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
