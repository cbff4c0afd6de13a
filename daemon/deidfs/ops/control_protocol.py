"""The control socket's wire protocol: JSON lines, protocol version 1.

The running daemon listens on ``[daemon] control_socket`` (``/run/deidfs/control.sock``,
:mod:`deidfs.ops.control`); ``deidfs status``, ``deidfs reload`` and ``deidfs export`` talk
to it (:mod:`deidfs.ops.control_client`). One request per line, one reply per line, several
requests per connection allowed::

    -> {"v": 1, "cmd": "status", "args": {}}
    <- {"v": 1, "ok": true, "result": {...}}
    -> {"v": 1, "cmd": "reload", "args": {"wait": true}}
    <- {"v": 1, "ok": false, "error": {"code": "config_invalid", "message": "...",
        "details": ["/etc/deidfs/deidfs.toml:12: folders.ct.profle: unknown key"]}}

Commands: ``status``; ``reload`` (``wait``: reply with the outcome, default true);
``export`` (see :class:`ExportRequest` for its arguments and :data:`EXPORT_RESULT_KEYS`
for its result); ``withheld`` (``folder``: one folder id, default all): the source paths
not served, each with its reason and keyed token, so that a token in the log can be traced
to its file. Error codes are the values of :class:`ErrorCode`. This module holds the
messages and their codec (:class:`Request`, :class:`Reply`, :func:`decode_request`), no
socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deidfs.errors import DeidfsError

PROTOCOL_VERSION = 1
#: A request line longer than this is refused (and the connection closed).
MAX_LINE_BYTES = 1 << 20
#: Known commands; any other name is counted as ``unknown`` (bounded metric labels).
COMMANDS = ("status", "reload", "export", "withheld")
#: Keys of a successful export's ``result``.
EXPORT_RESULT_KEYS = ("folder", "destination", "files", "written", "unchanged", "failed", "bytes")


class ControlProtocolError(DeidfsError):
    """The daemon's answer could not be understood."""


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
