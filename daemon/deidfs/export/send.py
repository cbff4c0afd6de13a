"""Send exports to DICOM nodes and DICOMweb servers: ``deidfs export FOLDER
--to-destination NAME``.

The files sent are the files the mount serves and a folder export writes: every source is
rendered by :func:`deidfs.view.render.render` with the folder's profile and the key, under the same
fail-closed rules (a refused source is never sent), and its bytes are those of
:func:`deidfs.view.render.write_view_fd`, checked against their SHA-256 right before they leave.
This module is part of the export edge: it takes its sources from
:func:`deidfs.export.folder.select_sources`, as :func:`deidfs.export.folder.export_folder` does.

C-STORE (PS3.4 Annex B, PS3.7 9.1.1) with pynetdicom: one association per batch of
``batch_size`` files; its presentation contexts are those of the batch's SOP classes, each
with the file's own transfer syntax, and for lossless files a second context with Explicit
VR Little Endian, used only where the node refuses the first. Lossless: uncompressed or in
a lossless-only compressed syntax (:data:`LOSSLESS_COMPRESSED`: RLE, JPEG Lossless, JPEG-LS
Lossless, JPEG 2000 Lossless), and neither the source nor the view saying Lossy Image
Compression "01" (pixels once lossy-compressed are not converted, whatever their syntax);
compressed ones are decoded (pydicom and its pylibjpeg plugins) and their header
updated as pydicom's ``decompress`` does, the pixel values unchanged. A lossy file is never
converted: refused by the node in its own syntax, it fails and says why. A file sent in its
own transfer syntax goes out as its very bytes (after the file meta group, which C-STORE
does not carry).

STOW-RS (PS3.18 10.5) with requests: one ``multipart/related; type="application/dicom"``
request per study of a batch, each part a file's exact Part 10 bytes; the answer's Failed
SOP Sequence and Referenced SOP Sequence (with Warning Reason) give each file's result.
HTTP 408, 429 and 5xx are temporary; any other 4xx is permanent (a wrong credential).

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
import datetime as dt
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from deidfs import __version__
from deidfs.config.model import Destination, DestinationKind
from deidfs.deid.pixels import LOSSY_SYNTAXES, MAX_DECODED_BYTES
from deidfs.errors import DeidfsError, NotFound, Refused
from deidfs.export.folder import (
    ExportListener,
    Selection,
    ServedIds,
    SourceSet,
    StopFlag,
    quiet_pydicom,
    select_sources,
    served_ids,
    write_manifest_file,
)
from deidfs.view.model import DEFLATED, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from deidfs.view.render import (
    SourceStat,
    View,
    render,
    source_unchanged,
    write_view_fd,
)

if TYPE_CHECKING:
    from deidfs.config.model import Config
    from deidfs.deid.pseudonym import Pseudonymizer
    from deidfs.ops.metrics import Metrics

log = logging.getLogger(__name__)

STATE_NAME = "sent.jsonl"
#: Presentation contexts one association may propose (PS3.8 9.3.2.2: odd ids 1 to 255).
MAX_CONTEXTS = 128
#: Transfer syntaxes that convert to Explicit VR Little Endian without loss.
UNCOMPRESSED = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED})
#: Compressed transfer syntaxes whose every encoding is lossless: RLE Lossless, JPEG
#: Lossless (Process 14, and its first-order prediction SV1), JPEG-LS Lossless, JPEG 2000
#: Lossless Only, HTJ2K Lossless and Lossless RPCL. Decoded, their pixels are the very
#: values encoded, so they convert to Explicit VR Little Endian without loss (unless Lossy
#: Image Compression says the pixels were lossy-compressed before).
LOSSLESS_COMPRESSED = frozenset(
    {
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
    }
)
SOP_CLASS_UID = 0x00080016
LOSSY_IMAGE_COMPRESSION = 0x00282110
_HASH_CHUNK = 1 << 20


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


# -- C-STORE --------------------------------------------------------------------------------
class _Temporary(Exception):
    """A failure worth another attempt (the node may be back or have room then)."""


class _Permanent(Exception):
    """The node refuses for good: another attempt gives the same answer."""


def _status_result(code: int) -> SendResult | None:
    """A C-STORE status as a result; None for a temporary one (0xA7xx: out of resources)."""
    if code == 0x0000:
        return SendResult("stored", code=code)
    if code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
        return SendResult("warning", f"status 0x{code:04X}", code)
    if code >> 8 == 0xA7:
        return None
    return SendResult("failed", f"status 0x{code:04X}", code)


class CStoreSender:
    """C-STORE to one ``kind = "dicom"`` destination with pynetdicom.

    ``sleep`` waits between attempts (injectable in tests); ``stop`` cancels between files.
    """

    def __init__(
        self,
        dest: Destination,
        *,
        sleep: Callable[[float], None] = time.sleep,
        stop: StopFlag | None = None,
    ) -> None:
        try:
            from pynetdicom import AE, _config  # noqa: PLC0415  (optional: the nodes extra)
        except ImportError:
            raise SendError(
                "sending to a DICOM node needs pynetdicom: pip install 'deidfs[nodes]'"
            ) from None
        # Send a file's dataset bytes as they are, from the file, never decoded and
        # encoded again (pynetdicom's own switch for this).
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.dest = dest
        self.sleep = sleep
        self.stop = stop
        self.error = ""
        self.ae = AE(ae_title=dest.ae_title)
        timeout = dest.timeout_seconds
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        self.ae.maximum_associations = 1

    @property
    def address(self) -> str:
        d = self.dest
        return f"{d.called_ae}@{d.host}:{d.port}"

    def _tls_args(self) -> tuple[Any, str] | None:
        if not self.dest.tls:
            return None
        import ssl  # noqa: PLC0415

        d = self.dest
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=os.fspath(d.ca_file) if d.ca_file else None
        )
        if d.cert_file is not None and d.key_file is not None:
            context.load_cert_chain(os.fspath(d.cert_file), os.fspath(d.key_file))
        return context, d.host

    def _contexts(self, batch: Sequence[Outgoing]) -> list[Any]:
        from pynetdicom import build_context  # noqa: PLC0415

        pairs: dict[tuple[str, str], None] = {}
        for out in batch:
            pairs[(out.sop_class, out.transfer_syntax)] = None
        for out in batch:  # fallbacks after every original syntax
            if out.convertible:
                pairs[(out.sop_class, EXPLICIT_LE)] = None
        return [build_context(sop, [ts]) for sop, ts in pairs]

    def _associate(self, batch: Sequence[Outgoing]) -> Any:
        self.ae.requested_contexts = self._contexts(batch)
        d = self.dest
        try:
            assoc = self.ae.associate(
                d.host, d.port, ae_title=d.called_ae, tls_args=self._tls_args()
            )
        except OSError as exc:
            raise _Temporary(f"cannot connect: {exc.strerror or type(exc).__name__}") from None
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            if rj is None:
                raise _Temporary("association rejected")
            why = f"association rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
            if rj.result == 0x01:
                raise _Permanent(why)
            raise _Temporary(why)
        if self.dest.tls:
            self._probe_tls()
        if assoc.is_aborted:
            # pynetdicom also says "aborted" when the connection fails or is closed.
            raise _Temporary("no association: the node could not be reached or aborted")
        raise _Temporary("no association (connection refused or timed out)")

    def _probe_tls(self) -> None:
        """After a failed TLS association: say why when it is the TLS handshake, which
        pynetdicom only logs. A certificate the CA file does not vouch for is permanent."""
        import socket  # noqa: PLC0415
        import ssl  # noqa: PLC0415

        tls = self._tls_args()
        assert tls is not None
        context, host = tls
        try:
            with (
                socket.create_connection((host, self.dest.port), self.dest.timeout_seconds) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                return
        except ssl.SSLCertVerificationError as exc:
            why = f"TLS: the node's certificate is not trusted ({exc.verify_message})"
            raise _Permanent(why) from None
        except ssl.SSLError as exc:
            raise _Permanent(f"TLS handshake failed ({exc.reason or type(exc).__name__})") from None
        except OSError:
            return  # not a TLS matter: the node is away

    @staticmethod
    def _context_for(assoc: Any, sop_class: str, ts: str) -> bool:
        return any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts
            for cx in assoc.accepted_contexts
        )

    def _send_one(self, assoc: Any, out: Outgoing, opened: Opened) -> SendResult:
        try:
            return self._send_opened(assoc, out, opened)
        except Refused as exc:
            return SendResult("failed", exc.reason)

    def _send_opened(self, assoc: Any, out: Outgoing, opened: Opened) -> SendResult:
        try:
            return self._send_opened_now(assoc, out, opened)
        except RuntimeError:  # pynetdicom: the association ended (the node went away)
            raise _Temporary("the association ended during C-STORE") from None

    def _send_opened_now(self, assoc: Any, out: Outgoing, opened: Opened) -> SendResult:
        if not assoc.is_established:
            raise _Temporary("the association ended during C-STORE")
        converted = False
        with opened(out) as path:
            if self._context_for(assoc, out.sop_class, out.transfer_syntax):
                status = assoc.send_c_store(Path(path))
            elif out.convertible and self._context_for(assoc, out.sop_class, EXPLICIT_LE):
                converted = True
                status = assoc.send_c_store(explicit_little_endian(path, out.transfer_syntax))
            elif not out.lossless:
                lossy = out.marked_lossy or out.transfer_syntax in LOSSY_SYNTAXES
                why = "its pixels are lossy-compressed" if lossy else "its syntax may be lossy"
                return SendResult(
                    "failed",
                    f"no presentation context accepted for its SOP class and syntax; {why}, "
                    "never converted",
                )
            else:
                return SendResult(
                    "failed", "no presentation context accepted for its SOP class and syntax"
                )
        if not assoc.is_established or "Status" not in status:
            raise _Temporary("association aborted or timed out during C-STORE")
        code = int(status.Status)
        result = _status_result(code)
        if result is None:
            raise _Temporary(f"out of resources (status 0x{code:04X})")
        if converted:
            result = SendResult(result.status, result.detail, result.code, converted=True)
        return result

    def send_batch(
        self,
        batch: Sequence[Outgoing],
        opened: Opened,
        on_result: Callable[[int, SendResult], None],
    ) -> dict[int, SendResult]:
        """Send ``batch`` in one association (more after a temporary failure); the result
        of each file by its index. ``on_result`` gets each file's result as it comes."""
        results: dict[int, SendResult] = {}
        todo = list(batch)
        attempt = 0
        while todo:
            if self.stop is not None and self.stop.is_set():
                break
            why = ""
            try:
                assoc = self._associate(todo)
            except _Permanent as exc:
                self.error = f"destination {self.dest.name!r} ({self.address}): {exc}"
                break
            except _Temporary as exc:
                why = str(exc)
            else:
                try:
                    while todo:
                        if self.stop is not None and self.stop.is_set():
                            break
                        out = todo[0]
                        results[out.index] = self._send_one(assoc, out, opened)
                        todo.pop(0)
                        attempt = 0  # progress: the next failure starts a fresh backoff
                        on_result(out.index, results[out.index])
                except _Temporary as exc:
                    why = str(exc)
                finally:
                    if assoc.is_established:
                        assoc.release()
            if not why:
                continue
            attempt += 1
            if attempt > self.dest.retries:
                self.error = (
                    f"destination {self.dest.name!r} ({self.address}): {why}, "
                    f"{self.dest.retries} retries failed"
                )
                break
            delay = self.dest.backoff_seconds * 2 ** (attempt - 1)
            log.warning(
                "destination %s: %s; retry %d of %d in %.1f s",
                self.dest.name,
                why,
                attempt,
                self.dest.retries,
                delay,
            )
            self.sleep(delay)
        for out in todo:
            results.setdefault(out.index, SendResult("failed", self.error or "cancelled"))
        return results


# -- STOW-RS --------------------------------------------------------------------------------
#: HTTP statuses worth another attempt: the server is busy, restarting or behind a proxy
#: that lost it (RFC 9110 15.6; 429 RFC 6585).
_HTTP_TEMPORARY = frozenset({408, 429, 500, 502, 503, 504})
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _json_value(item: Any, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object (PS3.18 F.2), None if absent."""
    if not isinstance(item, dict):
        return None
    elem = item.get(tag)
    if not isinstance(elem, dict):
        return None
    values = elem.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _json_items(doc: Any, tag: str) -> list[Any]:
    if not isinstance(doc, dict):
        return []
    elem = doc.get(tag)
    values = elem.get("Value") if isinstance(elem, dict) else None
    return values if isinstance(values, list) else []


class StowSender:
    """STOW-RS (PS3.18 10.5) to one ``kind = "dicomweb"`` destination with requests: one
    ``multipart/related`` request per study of a batch, each part a file's exact bytes."""

    def __init__(
        self,
        dest: Destination,
        *,
        sleep: Callable[[float], None] = time.sleep,
        stop: StopFlag | None = None,
    ) -> None:
        try:
            import requests  # noqa: PLC0415  (optional: the nodes extra)
        except ImportError:
            raise SendError(
                "sending to a DICOMweb server needs requests: pip install 'deidfs[nodes]'"
            ) from None
        self.requests = requests
        self.dest = dest
        self.sleep = sleep
        self.stop = stop
        self.error = ""
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/dicom+json"
        if dest.token_file is not None:
            token = self._secret(dest.token_file, "token_file")
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif dest.basic_auth_file is not None:
            user, sep, password = self._secret(dest.basic_auth_file, "basic_auth_file").partition(
                ":"
            )
            if not sep:
                raise SendError(
                    f"destination {dest.name!r}: basic_auth_file holds no user:password"
                )
            self.session.auth = (user, password)

    def _secret(self, path: Path, what: str) -> str:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise SendError(f"destination {self.dest.name!r}: cannot read {what}: {why}") from None
        if not text:
            raise SendError(f"destination {self.dest.name!r}: {what} is empty")
        return text

    @property
    def address(self) -> str:
        return self.dest.url

    def _post(self, files: Sequence[tuple[Outgoing, bytes]]) -> tuple[int, Any]:
        boundary = f"deidfs-{os.urandom(12).hex()}"
        parts = []
        for _, data in files:
            parts.append(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            r = self.session.post(
                f"{self.dest.url}/studies",
                data=body,
                headers={"Content-Type": content_type},
                timeout=self.dest.timeout_seconds,
            )
        except self.requests.RequestException as exc:
            raise _Temporary(f"cannot reach the server ({type(exc).__name__})") from None
        try:
            doc = r.json()
        except ValueError:
            doc = None
        return r.status_code, doc

    def _study(self, files: Sequence[Outgoing], opened: Opened) -> dict[int, SendResult]:
        loaded: list[tuple[Outgoing, bytes]] = []
        results: dict[int, SendResult] = {}
        for out in files:
            try:
                with opened(out) as path, open(path, "rb") as f:
                    loaded.append((out, f.read()))
            except Refused as exc:
                results[out.index] = SendResult("failed", exc.reason)
        if not loaded:
            return results
        code, doc = self._post(loaded)
        if code in _HTTP_TEMPORARY:
            raise _Temporary(f"HTTP {code}")
        if code not in (200, 202, 409):
            raise _Permanent(f"HTTP {code}")
        failed = {
            str(_json_value(item, _REFERENCED_SOP_INSTANCE_UID)): _json_value(item, _FAILURE_REASON)
            for item in _json_items(doc, _FAILED_SOP_SEQUENCE)
        }
        warned = {
            str(_json_value(item, _REFERENCED_SOP_INSTANCE_UID)): _json_value(item, _WARNING_REASON)
            for item in _json_items(doc, _REFERENCED_SOP_SEQUENCE)
        }
        for out, _ in loaded:
            uid = out.ids.SOPInstanceUID
            if uid in failed:
                reason = failed[uid]
                if isinstance(reason, int) and reason >> 8 == 0xA7:
                    raise _Temporary(f"out of resources (status 0x{reason:04X})")
                detail = f"status 0x{reason:04X}" if isinstance(reason, int) else f"HTTP {code}"
                results[out.index] = SendResult(
                    "failed", detail, reason if isinstance(reason, int) else None
                )
            elif isinstance(warned.get(uid), int):
                reason = warned[uid]
                results[out.index] = SendResult("warning", f"status 0x{reason:04X}", reason)
            elif code == 200 or uid in warned:
                results[out.index] = SendResult("stored", code=0)
            else:
                results[out.index] = SendResult("failed", f"HTTP {code}: not in the answer")
        return results

    def send_batch(
        self,
        batch: Sequence[Outgoing],
        opened: Opened,
        on_result: Callable[[int, SendResult], None],
    ) -> dict[int, SendResult]:
        """Send ``batch``, one request per study (again after a temporary failure)."""
        studies: dict[str, list[Outgoing]] = {}
        for out in batch:
            studies.setdefault(out.ids.StudyInstanceUID, []).append(out)
        results: dict[int, SendResult] = {}
        todo = list(studies.values())
        attempt = 0
        while todo:
            if self.stop is not None and self.stop.is_set():
                break
            try:
                got = self._study(todo[0], opened)
            except _Permanent as exc:
                self.error = f"destination {self.dest.name!r} ({self.address}): {exc}"
                break
            except _Temporary as exc:
                attempt += 1
                if attempt > self.dest.retries:
                    self.error = (
                        f"destination {self.dest.name!r} ({self.address}): {exc}, "
                        f"{self.dest.retries} retries failed"
                    )
                    break
                delay = self.dest.backoff_seconds * 2 ** (attempt - 1)
                log.warning(
                    "destination %s: %s; retry %d of %d in %.1f s",
                    self.dest.name,
                    exc,
                    attempt,
                    self.dest.retries,
                    delay,
                )
                self.sleep(delay)
                continue
            attempt = 0
            todo.pop(0)
            for index, res in got.items():
                results[index] = res
                on_result(index, res)
        for study in todo:
            for out in study:
                results.setdefault(out.index, SendResult("failed", self.error or "cancelled"))
        return results


@contextlib.contextmanager
def quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs every association and, at debug level, dumps what it sends."""
    lib_log = logging.getLogger("pynetdicom")
    saved = lib_log.level, lib_log.propagate
    lib_log.setLevel(logging.CRITICAL + 1)
    lib_log.propagate = False
    try:
        yield
    finally:
        lib_log.setLevel(saved[0])
        lib_log.propagate = saved[1]


# -- rendering the files --------------------------------------------------------------------
def _sha256_view(view: View, src_fd: int) -> tuple[str, int]:
    """SHA-256 and size of the view's bytes, written through a memory file."""
    fd = os.memfd_create("deidfs-view", os.MFD_CLOEXEC)
    try:
        write_view_fd(view, src_fd, fd)
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    at = 0
    while chunk := os.pread(fd, _HASH_CHUNK, at):
        h.update(chunk)
        at += len(chunk)
    return h.hexdigest(), at


def _classes(view: View) -> tuple[str, str, bool]:
    """The SOP Class UID and the Transfer Syntax UID of ``view`` ("" when absent), and
    whether its Lossy Image Compression says "01"."""
    from pydicom import dcmread  # noqa: PLC0415

    try:
        ds = dcmread(
            io.BytesIO(view.header),
            stop_before_pixels=True,
            specific_tags=[SOP_CLASS_UID, LOSSY_IMAGE_COMPRESSION],
            force=True,
        )
        ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        return str(ds.get("SOPClassUID", "") or ""), ts, _says_lossy(ds)
    except Exception:  # pydicom raises many types; such a view is not sent
        return "", "", True


def _says_lossy(ds: Any) -> bool:
    value = ds.get("LossyImageCompression", "")
    return str(value or "").strip() == "01"


def _lossy_marked(f: Any) -> bool:
    """Whether the source open as ``f`` says Lossy Image Compression "01" (or cannot be
    read: then it is not taken as lossless either)."""
    from pydicom import dcmread  # noqa: PLC0415

    try:
        f.seek(0)
        ds = dcmread(
            f, stop_before_pixels=True, specific_tags=[LOSSY_IMAGE_COMPRESSION], force=True
        )
        return _says_lossy(ds)
    except Exception:  # pydicom raises many types: not known lossless
        return True


def explicit_little_endian(path: str, transfer_syntax: str) -> Any:
    """The file at ``path`` (whose pixels are lossless) as a data set in Explicit VR Little
    Endian: as it is when uncompressed, else its pixel data decoded and its header updated
    as pydicom's ``decompress`` does (Transfer Syntax UID, Photometric Interpretation after a
    colour transform the decoder undid). Pixel values are the decoded values, unchanged.

    Raises
    ------
    Refused
        ``too_large`` or ``bad_pixel_data`` (no decoder, decoding failed).
    """
    from pydicom import dcmread  # noqa: PLC0415

    try:
        ds = dcmread(path)
    except Exception as exc:  # pydicom raises many types
        raise Refused("bad_pixel_data", f"cannot read it again: {type(exc).__name__}") from None
    if transfer_syntax in UNCOMPRESSED or "PixelData" not in ds:
        if transfer_syntax not in UNCOMPRESSED:
            from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415

            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    size = 1
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames"):
        size *= int(ds.get(keyword, 1) or 1)
    size *= max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
    if size > MAX_DECODED_BYTES:
        raise Refused("too_large", "decoded pixel data exceeds the size limit")
    try:
        # as_rgb=False: YCbCr stays YCbCr (a conversion to RGB would change values); the
        # instance keeps its (served) SOP Instance UID.
        ds.decompress(as_rgb=False, generate_instance_uid=False)
    except Exception as exc:  # decoders raise many types
        raise Refused("bad_pixel_data", f"decoding failed: {type(exc).__name__}") from None
    return ds


def _open_source(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        raise Refused("unreadable", "cannot open the source") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("not_regular", "not a regular file")
    return fd


@contextlib.contextmanager
def opened_view(out: Outgoing) -> Iterator[str]:
    """The exact bytes of ``out`` in a memory file, as a path: rendered from its source
    again, refused (``source_changed``) unless they are the bytes hashed before."""
    src = _open_source(out.path)
    fd = os.memfd_create("deidfs-view", os.MFD_CLOEXEC)
    try:
        if SourceStat.of(os.fstat(src)) != out.view.source:
            raise Refused("source_changed", "the source changed since it was rendered")
        write_view_fd(out.view, src, fd)
        if not source_unchanged(out.view, src) or _sha256_fd(fd)[0] != out.sha256:
            raise Refused("source_changed", "the source changed while it was read")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
        os.close(src)


# -- the export -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendSummary:
    """What one export to a destination did. Carries no original identifier or path."""

    folder: str
    destination: str
    profile: str
    files: int = 0  #: files of the selection stored at the destination (now or before)
    stored: int = 0  #: sent and stored now (warnings included)
    warnings: int = 0
    already: int = 0  #: stored by an earlier run: not sent again
    failed: int = 0
    duplicates: int = 0
    refused: tuple[tuple[str, int], ...] = ()
    skipped: int = 0
    seconds: float = 0.0
    manifest: str = ""
    error: str = ""  #: why the destination stopped taking files ("" if it did not)

    @property
    def refused_total(self) -> int:
        return sum(n for _, n in self.refused)

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object (the control socket's answer)."""
        return {
            "folder": self.folder,
            "destination": self.destination,
            "profile": self.profile,
            "files": self.files,
            "stored": self.stored,
            "warnings": self.warnings,
            "already": self.already,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "refused": dict(self.refused),
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "manifest": self.manifest,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SendSummary:
        """Read :meth:`to_json`'s form back; missing or odd fields count as zero."""

        def num(key: str) -> int:
            value = data.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        refused = data.get("refused", {})
        pairs: tuple[tuple[str, int], ...] = ()
        if isinstance(refused, Mapping):
            pairs = tuple(sorted((str(k), v) for k, v in refused.items() if isinstance(v, int)))
        seconds = data.get("seconds", 0.0)
        return cls(
            folder=str(data.get("folder", "")),
            destination=str(data.get("destination", "")),
            profile=str(data.get("profile", "")),
            files=num("files"),
            stored=num("stored"),
            warnings=num("warnings"),
            already=num("already"),
            failed=num("failed"),
            duplicates=num("duplicates"),
            refused=pairs,
            skipped=num("skipped"),
            seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
            manifest=str(data.get("manifest", "")),
            error=str(data.get("error", "")),
        )


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


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_sender(
    dest: Destination, *, sleep: Callable[[float], None], stop: StopFlag | None
) -> Sender:
    """The sender of ``dest``'s kind."""
    if dest.kind is DestinationKind.DICOM:
        return CStoreSender(dest, sleep=sleep, stop=stop)
    return StowSender(dest, sleep=sleep, stop=stop)


def send_folder(
    config: Config,
    folder_id: str,
    destination: str,
    pseudonymizer: Pseudonymizer,
    *,
    selection: Selection | None = None,
    profile: str | None = None,
    listener: ExportListener | None = None,
    metrics: Metrics | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    on_stored: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send a configured folder, as the mount serves it, to ``destination``.

    Sources and selection are those of :func:`deidfs.export.folder.export_folder`; files already
    stored there by an earlier run (same view path, same bytes) are not sent again.
    ``on_stored`` is called with the count of files stored so far after each one (tests).

    Raises
    ------
    NotFound
        Unknown folder, profile or destination; a selector that matches nothing.
    SendError
        The destination cannot be used at all (kind, missing pynetdicom, state unwritable).
        A node that refuses or stays unreachable is not raised but reported in
        :attr:`SendSummary.error`, with the files not stored "failed".
    """
    listener = listener if listener is not None else ExportListener()
    dest = destination_of(config, destination)
    since = (time.monotonic(), clock())  # the scan of a selection is part of the export
    sources = select_sources(
        config,
        folder_id,
        pseudonymizer,
        selection=selection,
        profile=profile,
        listener=listener,
        stop=stop,
    )
    return send_sources(
        config,
        sources,
        dest,
        pseudonymizer,
        listener=listener,
        metrics=metrics,
        stop=stop,
        clock=clock,
        sleep=sleep,
        on_stored=on_stored,
        since=since,
    )


def destination_of(config: Config, name: str) -> Destination:
    """The destination ``name`` of ``config``.

    Raises
    ------
    NotFound
        There is no such destination.
    """
    dest = config.destinations.get(name)
    if dest is None:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise NotFound(f"no destination {name!r} in the configuration (have: {known})")
    return dest


def send_sources(
    config: Config,
    sources: SourceSet,
    dest: Destination,
    pseudonymizer: Pseudonymizer,
    *,
    listener: ExportListener | None = None,
    metrics: Metrics | None = None,
    stop: StopFlag | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    on_stored: Callable[[int], None] | None = None,
    since: tuple[float, dt.datetime] | None = None,
) -> SendSummary:
    """Render ``sources`` (their items, in order: the first of two with one view path is
    sent) with their plan and layout, and send what ``dest`` does not hold yet; the state
    and manifests are those of ``sources.folder.id`` (see :func:`send_folder`). ``since``:
    when the export began (monotonic and wall clock), if before this call."""
    listener = listener if listener is not None else ExportListener()
    start, started = since if since is not None else (time.monotonic(), clock())
    folder = sources.folder
    sender = make_sender(dest, sleep=sleep, stop=stop)
    where = state_dir_of(config, dest.name, folder.id)
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SendError(f"cannot create the send state directory: {exc.strerror}") from None
    state = _State.load(where / STATE_NAME, node_key(dest))
    refused: Counter[str] = Counter()
    outgoing: list[Outgoing] = []
    duplicates = 0
    seen: set[str] = set()
    listener.phase("render", len(sources.items))
    with quiet_pydicom():
        for index, path, rel in sources.items:
            try:
                out = _render_one(index, path, rel, sources, pseudonymizer, config)
            except Refused as exc:
                refused[exc.reason] += 1
                listener.file("refused", exc.reason, pseudonymizer.token(path, "path")[:12])
                continue
            finally:
                listener.advance(1)
            if out.relpath in seen:  # the first source by path is served, as in the mount
                duplicates += 1
                continue
            seen.add(out.relpath)
            outgoing.append(out)
    results: dict[int, SendResult] = {}
    already = [o for o in outgoing if (o.relpath, o.sha256) in state.stored]
    todo = [o for o in outgoing if (o.relpath, o.sha256) not in state.stored]
    by_index = {o.index: o for o in todo}
    stored_now = 0
    listener.phase("send", len(todo))

    def on_result(index: int, result: SendResult) -> None:
        nonlocal stored_now
        listener.advance(1)
        if result.status in ("stored", "warning"):
            out = by_index[index]
            state.add(out.relpath, out.sha256)
            stored_now += 1
            if on_stored is not None:
                on_stored(stored_now)

    try:
        with quiet_pynetdicom(), quiet_pydicom():
            for batch in _batches(todo, dest.batch_size):
                if sender.error or (stop is not None and stop.is_set()):
                    for o in batch:
                        results[o.index] = SendResult("failed", sender.error or "cancelled")
                    continue
                results.update(sender.send_batch(batch, opened_view, on_result))
                state.sync()
    finally:
        state.close()
    tally: Counter[str] = Counter(r.status for r in results.values())
    for r in results.values():
        if metrics is not None:
            metrics.file_sent(dest.name, r.status)
    for index, r in sorted(results.items()):
        if r.status == "failed" and r.detail != sender.error:  # that one is said once
            listener.file(
                "failed", r.detail, pseudonymizer.token(by_index[index].path, "path")[:12]
            )
    manifest = _write_manifest(
        where, started, clock, sources, dest, outgoing, already, results, refused, duplicates
    )
    summary = SendSummary(
        folder=folder.id,
        destination=dest.name,
        profile=sources.profile.name,
        files=len(already) + tally["stored"] + tally["warning"],
        stored=tally["stored"] + tally["warning"],
        warnings=tally["warning"],
        already=len(already),
        failed=tally["failed"],
        duplicates=duplicates,
        refused=tuple(sorted(refused.items())),
        skipped=sources.skipped,
        seconds=time.monotonic() - start,
        manifest=manifest,
        error=sender.error,
    )
    log.info(
        "sent: folder=%s destination=%s stored=%d already=%d failed=%d",
        folder.id,
        dest.name,
        summary.stored,
        summary.already,
        summary.failed,
    )
    return summary


def _render_one(
    index: int,
    path: str,
    rel: str,
    sources: SourceSet,
    pseudonymizer: Pseudonymizer,
    config: Config,
) -> Outgoing:
    """Render one source as the mount serves it, and hash its bytes."""
    src = _open_source(path)
    try:
        with os.fdopen(os.dup(src), "rb") as f:
            state = SourceStat.of(os.fstat(src))
            view = render(
                f,
                state,
                sources.plan,
                pseudonymizer,
                sources.folder.layout,
                PurePosixPath(rel),
                max_header_bytes=config.daemon.max_header_bytes,
            )
            source_lossy = _lossy_marked(f)
        sha, _ = _sha256_view(view, src)
        if not source_unchanged(view, src):
            raise Refused("source_changed", "the source changed while it was read")
    finally:
        os.close(src)
    sop_class, ts, view_lossy = _classes(view)
    if not sop_class or not ts:
        raise Refused("no_sop_class", "no SOP Class UID or Transfer Syntax UID")
    marked = source_lossy or view_lossy
    lossless = (ts in UNCOMPRESSED or ts in LOSSLESS_COMPRESSED) and not marked
    ids = served_ids(view)
    return Outgoing(index, path, str(view.relpath), view, sha, sop_class, ts, ids, lossless, marked)


def _batches(items: Sequence[Outgoing], size: int) -> Iterator[list[Outgoing]]:
    """Batches of at most ``size`` files whose presentation contexts fit one association."""
    batch: list[Outgoing] = []
    pairs: set[tuple[str, str]] = set()
    for out in items:
        new = {(out.sop_class, out.transfer_syntax), (out.sop_class, EXPLICIT_LE)} - pairs
        if batch and (len(batch) >= size or len(pairs) + len(new) > MAX_CONTEXTS):
            yield batch
            batch, pairs = [], set()
            new = {(out.sop_class, out.transfer_syntax), (out.sop_class, EXPLICIT_LE)}
        batch.append(out)
        pairs |= new
    if batch:
        yield batch


def _write_manifest(
    where: Path,
    started: dt.datetime,
    clock: Callable[[], dt.datetime],
    sources: SourceSet,
    dest: Destination,
    outgoing: Sequence[Outgoing],
    already: Sequence[Outgoing],
    results: dict[int, SendResult],
    refused: Counter[str],
    duplicates: int,
) -> str:
    if not results:
        return ""
    common = {
        "destination": dest.name,
        "profile": sources.profile.name,
        "plan_digest": sources.plan.digest,
        "deidfs_version": __version__,
    }
    lines = []
    was_there = {o.index for o in already}
    for out in sorted(outgoing, key=lambda o: o.relpath):
        res = results.get(out.index)
        if res is None and out.index not in was_there:
            continue
        record: dict[str, Any] = {
            "type": "file",
            "path": out.relpath,
            "size": out.view.size,
            "sha256": out.sha256,
            "result": "already_stored" if res is None else res.status,
            "status": None if res is None or res.code is None else f"0x{res.code:04X}",
            "detail": "" if res is None else res.detail,
            "converted": False if res is None else res.converted,
            "StudyInstanceUID": out.ids.StudyInstanceUID,
            "SeriesInstanceUID": out.ids.SeriesInstanceUID,
            "SOPInstanceUID": out.ids.SOPInstanceUID,
            "PatientID": out.ids.PatientID,
            **common,
        }
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    tally = Counter(r.status for r in results.values())
    lines.append(
        json.dumps(
            {
                "type": "summary",
                "folder": sources.folder.id,
                **common,
                "started": _iso(started),
                "finished": _iso(clock()),
                "stored": tally["stored"],
                "warning": tally["warning"],
                "failed": tally["failed"],
                "already_stored": len(already),
                "duplicates": duplicates,
                "refused": dict(refused),
            },
            separators=(",", ":"),
        )
    )
    data = ("\n".join(lines) + "\n").encode()
    path = write_manifest_file(where, started, data, durable=True)
    return str(path)
