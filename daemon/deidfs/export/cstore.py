"""C-STORE of rendered files to one DICOM node with pynetdicom (imported when used).

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
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deidfs.config.model import Destination
from deidfs.deid.pixels import LOSSY_SYNTAXES, MAX_DECODED_BYTES
from deidfs.errors import Refused
from deidfs.export.destinations import (
    Opened,
    Outgoing,
    SendError,
    SendResult,
    _Permanent,
    _Temporary,
)
from deidfs.export.workers import StopFlag
from deidfs.view.model import DEFLATED, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE

log = logging.getLogger(__name__)

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
