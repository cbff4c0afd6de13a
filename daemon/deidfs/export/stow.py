"""STOW-RS of rendered files to one DICOMweb server with requests (imported when used).

STOW-RS (PS3.18 10.5) with requests: one ``multipart/related; type="application/dicom"``
request per study of a batch, each part a file's exact Part 10 bytes; the answer's Failed
SOP Sequence and Referenced SOP Sequence (with Warning Reason) give each file's result.
HTTP 408, 429 and 5xx are temporary; any other 4xx is permanent (a wrong credential).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deidfs.config.model import Destination
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

log = logging.getLogger(__name__)

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
