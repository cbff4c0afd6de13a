"""The control socket's server: JSON lines over a Unix stream socket, protocol version 1
(:mod:`deidfs.ops.control_protocol`; the client is :mod:`deidfs.ops.control_client`).

The running daemon listens on ``[daemon] control_socket`` (``/run/deidfs/control.sock``)
with one handler per command (:class:`ControlServer`).

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
from collections.abc import Callable, Mapping
from pathlib import Path

from deidfs.errors import DeidfsError
from deidfs.ops.control_protocol import (
    COMMANDS,
    MAX_LINE_BYTES,
    ErrorCode,
    Handler,
    Peer,
    Reply,
    decode_request,
)

log = logging.getLogger(__name__)

#: A connection idle this long is closed.
IDLE_SECONDS = 60.0
#: Connections served at once; more are answered ``busy``.
MAX_CONNECTIONS = 16
SOCKET_MODE = 0o660


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


def _peer(conn: socket.socket) -> Peer | None:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


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
