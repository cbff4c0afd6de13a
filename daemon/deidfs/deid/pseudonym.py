"""Keyed, deterministic pseudonyms (HMAC-SHA-256 with a per-installation secret).

Same key, same output on every run and machine, with no mapping database; without the key
the originals cannot be recovered by dictionary attack, unlike unkeyed MD5 schemes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from deidfs.errors import SecretError

MIN_KEY_BYTES = 16
TOKEN_LENGTH = 16  #: fits SH (16) and every longer string VR; base32 fits CS too
MAX_SHIFT_DAYS = 3650
#: Digest bytes that make the first TOKEN_LENGTH base32 characters: 8 per 5 bytes.
_TOKEN_BYTES = (TOKEN_LENGTH * 5 + 39) // 40 * 5
#: Entries each memo holds before it starts over: values that repeat (a study's UIDs, a
#: patient's ID) come back at once; one-off values (every SOP Instance UID of a folder being
#: indexed) do not pin memory. A miss costs one HMAC, about a microsecond.
MEMO_ENTRIES = 8192
#: Token domains whose values never repeat in a useful way (a source's path, a view's
#: state): derived each time, never memoized.
_UNMEMOIZED = frozenset({"path", "mtime"})


class Pseudonymizer:
    """Derive UIDs, tokens and per-patient date shifts from one secret key.

    Each kind of value is derived in its own domain, so a UID and an ID with the same text
    never collide.
    """

    __slots__ = ("_key", "_tokens", "_uids")

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise SecretError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._uids: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], str] = {}

    def _mac(self, domain: str, value: str) -> bytes:
        msg = domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.digest(self._key, msg, hashlib.sha256)

    def uid(self, uid: str) -> str:
        """``2.25.<decimal of 128 keyed bits>`` (PS3.5 B.2), at most 44 characters."""
        uid = uid.strip().rstrip("\x00")
        out = self._uids.get(uid)
        if out is None:
            out = "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))
            if len(self._uids) >= MEMO_ENTRIES:
                self._uids.clear()
            self._uids[uid] = out
        return out

    def token(self, value: str, domain: str = "id") -> str:
        """A fixed-length token of upper-case letters and digits 2-7 (base32)."""
        value = value.strip()
        out = self._tokens.get((domain, value))
        if out is None:
            digest = self._mac(domain, value)[:_TOKEN_BYTES]
            out = base64.b32encode(digest).decode()[:TOKEN_LENGTH]
            if len(value) <= 256 and domain not in _UNMEMOIZED:
                if len(self._tokens) >= MEMO_ENTRIES:
                    self._tokens.clear()
                self._tokens[(domain, value)] = out
        return out

    def fingerprint(self) -> str:
        """A digest that tells keys apart without revealing them (an HMAC in a domain of
        its own): two processes compare it to prove they hold the same key."""
        return self._mac("key-fingerprint", "deidfs").hex()[:32]

    def date_shift_days(self, patient_key: str) -> int:
        """Days (1 to 3650) by which every date of this patient moves into the past."""
        mac = self._mac("date-shift", patient_key.strip())
        return 1 + int.from_bytes(mac[:8], "big") % MAX_SHIFT_DAYS
