"""The client of the control socket: :func:`call` sends one request to the daemon and
returns its reply (:mod:`deidfs.ops.control_protocol`), turning a socket that is missing,
refuses this user or does not answer into an error with the command's exit code
(:class:`ControlUnavailable` 69, :class:`ControlDenied` 77, :class:`ControlTimeout` 75).
``deidfs status``, ``deidfs reload`` and ``deidfs export`` use it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deidfs.errors import DeidfsError
from deidfs.ops.control_protocol import (
    MAX_LINE_BYTES,
    PROTOCOL_VERSION,
    ControlProtocolError,
    Reply,
)


class ControlUnavailable(DeidfsError):
    """No daemon listens on the control socket (exit 69, EX_UNAVAILABLE)."""

    exit_code = os.EX_UNAVAILABLE


class ControlDenied(DeidfsError):
    """The control socket refuses this user (exit 77, EX_NOPERM)."""

    exit_code = os.EX_NOPERM


class ControlTimeout(DeidfsError):
    """The daemon did not answer in time (exit 75, EX_TEMPFAIL)."""

    exit_code = os.EX_TEMPFAIL


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
