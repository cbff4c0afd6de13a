"""What a destination is to an export: the files going out, the results coming back,
the sender interface, and the state of what a node holds already.

Temporary failures (association refused transiently, aborted or timed out, connection
refused, status 0xA7xx out of resources) are retried with exponential backoff, from the
first file not yet stored; a permanent rejection of the association (a wrong AE title)
stops the export at once. Each file ends "stored", "warning" (stored with a warning status
0xB000, 0xB006, 0xB007) or "failed" with a reason.

State: ``<state_dir>/destinations/<name>/<folder>/sent.jsonl`` records every file stored,
by its view path, the SHA-256 of its bytes and a digest of the node's address; a re-run
sends only the others (a changed profile or key makes other bytes, a destination pointed
elsewhere another node: those are sent again). A manifest of each run,
``.deidfs-manifest-<UTC time>.jsonl`` beside it, has one line per file of the selection
(view path, SHA-256, served identifiers, result, status code) and a summary line. Neither
holds an original identifier or a source path; logs and metrics name the destination and the
folder only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from deidfs.config.model import Destination
from deidfs.errors import DeidfsError
from deidfs.export.selection import ServedIds
from deidfs.view.model import EXPLICIT_LE
from deidfs.view.render import View

if TYPE_CHECKING:
    from deidfs.config.model import Config

STATE_NAME = "sent.jsonl"


class SendError(DeidfsError):
    """A destination cannot take the export: unknown, misconfigured, or its node refuses
    the association for good or stays unreachable (exit 69). The message names the
    destination, its address and the node's reason, never a file."""

    exit_code = os.EX_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One rendered file waiting to be sent."""

    index: int
    path: str  #: its source (never logged, never in the manifest)
    relpath: str  #: the view path (pseudonymized)
    view: View
    sha256: str
    sop_class: str
    transfer_syntax: str
    ids: ServedIds
    #: its pixels were never lossy-compressed (syntax and Lossy Image Compression of the
    #: source and the view): it may be sent as Explicit VR Little Endian, decoded if need be
    lossless: bool = False
    #: the source or the view says Lossy Image Compression "01"
    marked_lossy: bool = False

    @property
    def convertible(self) -> bool:
        """Explicit VR Little Endian is a fallback for it (and not its own syntax)."""
        return self.lossless and self.transfer_syntax != EXPLICIT_LE


@dataclass(frozen=True, slots=True)
class SendResult:
    """How one file ended at the destination."""

    status: str  #: "stored", "warning" or "failed"
    detail: str = ""  #: the node's status or the reason of a failure (no PHI)
    code: int | None = None  #: the C-STORE status, when the node answered
    converted: bool = False  #: sent as Explicit VR Little Endian, not in its own syntax


class Opened(Protocol):
    """Opens the exact bytes of a file for sending: a path the sender may read."""

    def __call__(self, out: Outgoing) -> contextlib.AbstractContextManager[str]: ...


class Sender(Protocol):
    """Sends batches to one destination."""

    #: set when the destination refused for good or stayed unreachable: stop sending
    error: str

    def send_batch(
        self,
        batch: Sequence[Outgoing],
        opened: Opened,
        on_result: Callable[[int, SendResult], None],
    ) -> dict[int, SendResult]: ...


class _Temporary(Exception):
    """A failure worth another attempt (the node may be back or have room then)."""


class _Permanent(Exception):
    """The node refuses for good: another attempt gives the same answer."""


def node_key(dest: Destination) -> str:
    """A short digest of where ``dest`` points: a destination edited to point at another
    node (or AE) has sent nothing there yet."""
    where = (dest.kind.value, dest.called_ae, dest.host, str(dest.port), dest.url)
    return hashlib.sha256("\x00".join(where).encode()).hexdigest()[:16]


@dataclass
class _State:
    """The files a destination holds already: (view path, SHA-256), for one node."""

    path: Path
    node: str
    stored: set[tuple[str, str]] = field(default_factory=set)
    fd: int | None = None

    @classmethod
    def load(cls, path: Path, node: str) -> _State:
        state = cls(path, node)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return state
        except OSError as exc:
            raise SendError(f"cannot read the send state: {exc.strerror}") from None
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                if rec["node"] == node:
                    state.stored.add((str(rec["path"]), str(rec["sha256"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: that file is sent again
        return state

    def add(self, relpath: str, sha256: str) -> None:
        """Record one file stored; written at once (a crash of this process keeps it),
        flushed to disk by :meth:`sync`."""
        if self.fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o600)
        record = {"path": relpath, "sha256": sha256, "node": self.node}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode())
        self.stored.add((relpath, sha256))

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


def state_dir_of(config: Config, destination: str, folder: str) -> Path:
    """Where the state and manifests of ``folder`` sent to ``destination`` live."""
    return Path(config.daemon.state_dir) / "destinations" / destination / folder
