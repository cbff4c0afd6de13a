"""The control socket: JSON lines over a Unix stream socket, protocol version 1.

The running daemon listens on ``[daemon] control_socket`` (``/run/deidfs/control.sock``);
``deidfs status``, ``deidfs reload`` and ``deidfs export`` talk to it. One request per
line, one reply per line, several requests per connection allowed::

    -> {"v": 1, "cmd": "status", "args": {}}
    <- {"v": 1, "ok": true, "result": {...}}
    -> {"v": 1, "cmd": "reload", "args": {"wait": true}}
    <- {"v": 1, "ok": false, "error": {"code": "config_invalid", "message": "...",
        "details": ["/etc/deidfs/deidfs.toml:12: folders.ct.profle: unknown key"]}}

Commands: ``status``; ``reload`` (``wait``: reply with the outcome, default true);
``export`` (see :class:`ExportRequest` for its arguments and :data:`EXPORT_RESULT_KEYS`
for its result); ``withheld`` (``folder``: one folder id, default all): the source paths
not served, each with its reason and keyed token, so that a token in the log can be traced
to its file. Error codes are the values of :class:`ErrorCode`.

Access: the socket is created mode 0660, so only its owner and group may connect (the
kernel checks the mode on ``connect``); its directory is created if missing. The peer's
pid, uid and gid (``SO_PEERCRED``) are logged with every command, so the journal records
who reloaded or exported what. ``withheld`` answers with source paths, which can carry
patient names: it is answered only to root and to the owner of the configuration file
(:func:`may_read_sources`, checked on the peer's ``SO_PEERCRED`` uid), who can read the
originals anyway. Log lines and error messages never carry PHI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from deidfs.errors import DeidfsError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: A request line longer than this is refused (and the connection closed).
MAX_LINE_BYTES = 1 << 20
#: A connection idle this long is closed.
IDLE_SECONDS = 60.0
#: Connections served at once; more are answered ``busy``.
MAX_CONNECTIONS = 16
SOCKET_MODE = 0o660
#: Known commands; any other name is counted as ``unknown`` (bounded metric labels).
COMMANDS = ("status", "reload", "export", "withheld")
#: Keys of a successful export's ``result``.
EXPORT_RESULT_KEYS = ("folder", "destination", "files", "written", "unchanged", "failed", "bytes")


class ErrorCode(Enum):
    """Why a request failed (``error.code`` in a reply)."""

    BAD_REQUEST = "bad_request"  #: not JSON, not an object, wrong argument types
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_COMMAND = "unknown_command"
    CONFIG_INVALID = "config_invalid"  #: reload rejected; the last good config keeps serving
    NOT_AVAILABLE = "not_available"  #: this daemon cannot do it (e.g. export not built in)
    NOT_FOUND = "not_found"  #: unknown folder, study, profile
    BUSY = "busy"  #: too many connections, or another reload/export in progress
    DENIED = "denied"  #: this peer may not run this command (``SO_PEERCRED``)
    FAILED = "failed"  #: the command ran and failed
    INTERNAL = "internal"  #: a bug; details are in the daemon's log


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process, from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request."""

    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)
    peer: Peer | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """The ``error`` of a failed reply."""

    code: ErrorCode
    message: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply: ``result`` when ``ok``, else ``error``."""

    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    error: Failure | None = None

    @classmethod
    def success(cls, result: Mapping[str, Any] | None = None) -> Reply:
        """A successful reply."""
        return cls(True, dict(result or {}))

    @classmethod
    def failure(cls, code: ErrorCode, message: str, details: Sequence[str] = ()) -> Reply:
        """A failed reply."""
        return cls(False, {}, Failure(code, message, tuple(details)))

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        if self.ok:
            return {"v": PROTOCOL_VERSION, "ok": True, "result": dict(self.result)}
        assert self.error is not None
        return {
            "v": PROTOCOL_VERSION,
            "ok": False,
            "error": {
                "code": self.error.code.value,
                "message": self.error.message,
                "details": list(self.error.details),
            },
        }

    @classmethod
    def from_json(cls, data: object) -> Reply:
        """Decode a reply.

        Raises
        ------
        ControlProtocolError
            Not a reply of protocol version 1.
        """
        if not isinstance(data, dict) or data.get("v") != PROTOCOL_VERSION:
            raise ControlProtocolError("the daemon answered with an unknown protocol")
        if data.get("ok") is True:
            result = data.get("result", {})
            if not isinstance(result, dict):
                raise ControlProtocolError("malformed reply from the daemon")
            return cls.success(result)
        err = data.get("error")
        if not isinstance(err, dict):
            raise ControlProtocolError("malformed reply from the daemon")
        try:
            code = ErrorCode(err.get("code"))
        except ValueError:
            code = ErrorCode.FAILED
        details = err.get("details", [])
        return cls.failure(
            code,
            str(err.get("message", "")),
            [str(d) for d in details] if isinstance(details, list) else [],
        )


Handler = Callable[[Request], Reply]


def may_read_sources(peer: Peer | None, config_file: Path | None) -> bool:
    """Whether a peer may see source paths: root, or the configuration file's owner.

    The owner is looked up at each request (an admin may hand the file over). An unknown
    peer (no ``SO_PEERCRED``) or an unreadable file admits root alone.

    Parameters
    ----------
    peer
        The connecting process, from ``SO_PEERCRED``.
    config_file
        The daemon's configuration file, if it has one.
    """
    if peer is None:
        return False
    if peer.uid == 0:
        return True
    if config_file is None:
        return False
    try:
        return os.stat(config_file).st_uid == peer.uid
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """Arguments of the ``export`` command (all selections are ANDed lists; empty: all).

    ``study``, ``patient`` and ``accession`` match original or anonymized identifiers;
    ``path`` selects sources by path relative to the folder; ``to`` replaces
    ``<export_dir>/<folder>``; ``profile`` overrides the folder's profile for this export;
    ``destination`` sends to ``[destinations.<name>]`` instead of writing files (no ``to``).
    """

    folder: str
    study: tuple[str, ...] = ()
    patient: tuple[str, ...] = ()
    accession: tuple[str, ...] = ()
    path: tuple[str, ...] = ()
    to: str | None = None
    profile: str | None = None
    workers: int | None = None
    destination: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ExportRequest:
        """Validate the ``args`` of an export request.

        Raises
        ------
        ValueError
            A missing folder, an unknown argument or a value of the wrong type.
        """
        known = {
            "folder",
            "study",
            "patient",
            "accession",
            "path",
            "to",
            "profile",
            "workers",
            "destination",
        }
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown argument(s): {', '.join(unknown)}")
        folder = args.get("folder")
        if not isinstance(folder, str) or not folder:
            raise ValueError("'folder' must be a non-empty string")

        def strings(name: str) -> tuple[str, ...]:
            value = args.get(name, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name!r} must be a list of strings")
            return tuple(value)

        def optional(name: str) -> str | None:
            value = args.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name!r} must be a string")
            return value

        workers = args.get("workers")
        if workers is not None and (
            not isinstance(workers, int) or isinstance(workers, bool) or workers < 1
        ):
            raise ValueError("'workers' must be a positive integer")
        return cls(
            folder=folder,
            study=strings("study"),
            patient=strings("patient"),
            accession=strings("accession"),
            path=strings("path"),
            to=optional("to"),
            profile=optional("profile"),
            workers=workers,
            destination=optional("destination"),
        )


# --------------------------------------------------------------------------------------------
# Client


class ControlUnavailable(DeidfsError):
    """No daemon listens on the control socket (exit 69, EX_UNAVAILABLE)."""

    exit_code = os.EX_UNAVAILABLE


class ControlDenied(DeidfsError):
    """The control socket refuses this user (exit 77, EX_NOPERM)."""

    exit_code = os.EX_NOPERM


class ControlTimeout(DeidfsError):
    """The daemon did not answer in time (exit 75, EX_TEMPFAIL)."""

    exit_code = os.EX_TEMPFAIL


class ControlProtocolError(DeidfsError):
    """The daemon's answer could not be understood."""


def call(
    path: Path, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0
) -> Reply:
    """Send one request to the daemon at ``path`` and return its reply.

    Raises
    ------
    ControlUnavailable
        No socket, or nobody listening (the daemon is not running).
    ControlDenied
        The socket's mode or its directory refuse this user.
    ControlTimeout
        No reply within ``timeout`` seconds.
    ControlProtocolError
        The reply is not protocol version 1.
    """
    request = {"v": PROTOCOL_VERSION, "cmd": cmd, "args": dict(args or {})}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ControlUnavailable(
                f"the daemon is not running (nothing listens on the control socket {path})"
            ) from None
        except PermissionError:
            raise ControlDenied(
                f"permission denied on the control socket {path} "
                "(run as root or as a member of its group)"
            ) from None
        except TimeoutError:
            raise ControlTimeout(f"the control socket {path} does not accept") from None
        except OSError as exc:
            raise ControlUnavailable(
                f"cannot reach the daemon at {path}: {exc.strerror or exc}"
            ) from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE_BYTES * 16)
        except TimeoutError:
            raise ControlTimeout(f"no answer from the daemon within {timeout:g} s") from None
        except OSError as exc:
            raise ControlUnavailable(
                f"the daemon closed the connection: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    if not line:
        raise ControlUnavailable("the daemon closed the connection without answering")
    try:
        data = json.loads(line)
    except ValueError:
        raise ControlProtocolError("the daemon's answer is not JSON") from None
    return Reply.from_json(data)


# --------------------------------------------------------------------------------------------
# Server


def _peer(conn: socket.socket) -> Peer | None:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def decode_request(line: bytes, peer: Peer | None) -> Request | Reply:
    """A request line -> :class:`Request`, or the failure :class:`Reply` to send back."""
    try:
        data = json.loads(line)
    except ValueError:
        return Reply.failure(ErrorCode.BAD_REQUEST, "request is not JSON")
    if not isinstance(data, dict):
        return Reply.failure(ErrorCode.BAD_REQUEST, "request is not a JSON object")
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        return Reply.failure(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} not supported; this daemon speaks {PROTOCOL_VERSION}",
        )
    cmd = data.get("cmd")
    args = data.get("args", {})
    if not isinstance(cmd, str) or not isinstance(args, dict):
        return Reply.failure(ErrorCode.BAD_REQUEST, "'cmd' must be a string and 'args' an object")
    return Request(cmd, args, peer)


class ControlServer:
    """Serves the control socket at ``path`` with one handler per command.

    Parameters
    ----------
    path
        The socket's path; its directory is created (0755) if missing.
    handlers
        Command name -> handler. A handler's exception is contained: the client gets
        ``internal`` and the log gets the exception's type.
    on_request
        Called after each request with the command (``unknown`` if not one of
        :data:`COMMANDS`) and ``ok`` or the error code: for metrics.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self.path = Path(os.path.abspath(path))
        self._handlers = dict(handlers)
        self._on_request = on_request
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @property
    def alive(self) -> bool:
        """True while the accepting thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind (mode 0660), listen and accept in a thread.

        Raises
        ------
        DeidfsError
            Another daemon answers on the socket, the path is something else than a
            socket, or it cannot be created.
        """
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise DeidfsError(
                f"cannot create the control socket's directory {self.path.parent}: {exc.strerror}"
            ) from None
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fspath(self.path))
            # Before listen(): nobody can connect yet, so the mode is right from the start.
            os.chmod(self.path, SOCKET_MODE)
            st = os.stat(self.path)
            sock.listen(MAX_CONNECTIONS)
            sock.settimeout(0.5)
        except OSError as exc:
            sock.close()
            raise DeidfsError(
                f"cannot listen on the control socket {self.path}: {exc.strerror}"
            ) from None
        self._sock = sock
        self._inode = (st.st_dev, st.st_ino)
        self._thread = threading.Thread(
            target=self._accept_loop, name="deidfs-control", daemon=True
        )
        self._thread.start()
        log.info("control socket listening (mode %o)", SOCKET_MODE)

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DeidfsError(f"control socket {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise DeidfsError(f"control socket {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(self.path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise DeidfsError(f"control socket {self.path}: {exc.strerror or exc}") from None
            # Left by a killed daemon: nobody listens.
            log.info("removing a stale control socket")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        finally:
            probe.close()
        raise DeidfsError(f"another daemon serves the control socket {self.path}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close and remove the socket (only if it is still ours)."""
        self._stopping.set()
        if self._sock is not None:
            # A connection of our own wakes accept() now rather than at its next timeout
            # (shutdown() does not wake a listening Unix socket).
            with (
                contextlib.suppress(OSError),
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s,
            ):
                s.settimeout(1.0)
                s.connect(os.fspath(self.path))
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.error("control socket accept failed: %s", errno.errorcode.get(exc.errno or 0))
                self._stopping.wait(0.5)
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="deidfs-control-conn", daemon=True
            ).start()

    def _refuse_busy(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(1.0)
            reply = Reply.failure(ErrorCode.BUSY, "too many control connections; try again")
            conn.sendall(json.dumps(reply.to_json()).encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setblocking(True)
                conn.settimeout(IDLE_SECONDS)
                peer = _peer(conn)
                with conn.makefile("rb") as reader:
                    while not self._stopping.is_set():
                        line = reader.readline(MAX_LINE_BYTES + 1)
                        if not line:
                            return
                        if len(line) > MAX_LINE_BYTES:
                            reply = Reply.failure(ErrorCode.BAD_REQUEST, "request too long")
                            conn.sendall(json.dumps(reply.to_json()).encode() + b"\n")
                            return
                        if not line.strip():
                            continue
                        reply = self._handle(line, peer)
                        conn.sendall(json.dumps(reply.to_json()).encode() + b"\n")
        except (TimeoutError, OSError):
            return  # the client went away or idled: nothing to answer
        finally:
            self._slots.release()

    def _handle(self, line: bytes, peer: Peer | None) -> Reply:
        decoded = decode_request(line, peer)
        if isinstance(decoded, Reply):
            self._record("unknown", decoded, peer)
            return decoded
        cmd = decoded.cmd
        handler = self._handlers.get(cmd)
        label = cmd if cmd in COMMANDS else "unknown"
        if handler is None:
            reply = Reply.failure(
                ErrorCode.UNKNOWN_COMMAND,
                f"unknown command; known: {', '.join(sorted(self._handlers))}",
            )
        else:
            try:
                reply = handler(decoded)
            except Exception as exc:  # contain: a handler's bug must not kill the socket
                log.error("control command %s failed: %s", label, type(exc).__name__)
                reply = Reply.failure(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")
        self._record(label, reply, peer)
        return reply

    def _record(self, label: str, reply: Reply, peer: Peer | None) -> None:
        result = "ok" if reply.ok or reply.error is None else reply.error.code.value
        # Status is polled by monitoring: only what changes something is logged at info.
        level = logging.DEBUG if label == "status" and reply.ok else logging.INFO
        if peer is None:
            log.log(level, "control: cmd=%s result=%s peer=unknown", label, result)
        else:
            log.log(
                level,
                "control: cmd=%s result=%s peer_pid=%d peer_uid=%d peer_gid=%d",
                label,
                result,
                peer.pid,
                peer.uid,
                peer.gid,
            )
        hook = self._on_request
        if hook is not None:
            hook(label, result)
