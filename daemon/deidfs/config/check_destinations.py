"""The ``[destinations.<name>]`` tables: where ``deidfs export --to-destination`` sends.

:class:`DestinationChecker` builds one :class:`~deidfs.config.model.Destination` per table:
a DICOM node (AE titles, host, port, TLS files) or a DICOMweb server (STOW-RS URL and one
credentials file), with the retry and batch settings both kinds take.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from deidfs.config.model import Destination, DestinationKind
from deidfs.config.tables import FOLDER_ID, Checks, Table

_COMMON_DESTINATION_KEYS = ("kind", "timeout_seconds", "retries", "backoff_seconds", "batch_size")
_DESTINATION_KEYS = {
    DestinationKind.DICOM: (
        *_COMMON_DESTINATION_KEYS,
        "ae_title",
        "called_ae",
        "host",
        "port",
        "tls",
        "ca_file",
        "cert_file",
        "key_file",
    ),
    DestinationKind.DICOMWEB: (*_COMMON_DESTINATION_KEYS, "url", "token_file", "basic_auth_file"),
}
#: PS3.5 Table 6.2-1, AE: 16 characters of the Default Character Repertoire, no backslash,
#: no control character, not only spaces (leading and trailing spaces are not significant).
_AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")


class DestinationChecker(Checks):
    """Checks the ``[destinations.*]`` tables."""

    def destinations(self, t: Table | None) -> dict[str, Destination]:
        out: dict[str, Destination] = {}
        if t is None:
            return out
        for name, sub in t.subtables():
            if sub is None:
                continue
            before = len(self.problems)
            if not FOLDER_ID.match(name):
                self.error(
                    sub.key,
                    f"invalid destination name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . - "
                    "(not starting with '.' or '-')",
                )
            if "kind" not in sub.data:
                self.error((*sub.key, "kind"), 'missing kind ("dicom" or "dicomweb")')
                continue
            kind = sub.choice("kind", DestinationKind, DestinationKind.DICOM)
            if len(self.problems) != before:
                continue
            sub.check_keys(_DESTINATION_KEYS[kind])
            d = Destination(name=name, kind=kind)
            common = {
                "timeout_seconds": sub.number(
                    "timeout_seconds", d.timeout_seconds, minimum=0.0, exclusive=True
                ),
                "retries": sub.integer("retries", d.retries, minimum=0, maximum=100),
                "backoff_seconds": sub.number("backoff_seconds", d.backoff_seconds, minimum=0.0),
                "batch_size": sub.integer("batch_size", d.batch_size, minimum=1, maximum=10000),
            }
            if kind is DestinationKind.DICOM:
                dest = self.dicom_destination(sub, d, common)
            else:
                dest = self.dicomweb_destination(sub, d, common)
            if len(self.problems) == before:
                out[name] = dest
        return out

    def ae_title(self, t: Table, name: str, default: str, *, required: bool) -> str:
        value = t.string(name, default, required=required)
        if (
            name in t.data
            and isinstance(t.data[name], str)
            and (not _AE_TITLE.match(value) or not value.strip())
        ):
            self.error(
                (*t.key, name),
                f"invalid AE title {value!r}: 1 to 16 printable ASCII characters, no "
                "backslash, not only spaces (PS3.5 Table 6.2-1)",
            )
        return value.strip()

    def dicom_destination(
        self, t: Table, d: Destination, common: Mapping[str, float | int]
    ) -> Destination:
        host = t.string("host", "", required=True)
        if (
            "host" in t.data
            and isinstance(t.data["host"], str)
            and (not host.strip() or any(c.isspace() or not c.isprintable() for c in host))
        ):
            self.error((*t.key, "host"), f"expected a host name or address, got {host!r}")
        port = t.integer("port", 0, minimum=1, maximum=65535)
        if "port" not in t.data:
            self.error((*t.key, "port"), "missing port (the node's DICOM port, e.g. 104)")
        tls = t.boolean("tls", False)
        files = {n: t.optional_path(n) for n in ("ca_file", "cert_file", "key_file")}
        if not tls:
            for n in files:
                if n in t.data:
                    self.error((*t.key, n), f"{n} is used only with tls = true")
        if (files["cert_file"] is None) != (files["key_file"] is None):
            given, missing = (
                ("cert_file", "key_file")
                if files["key_file"] is None
                else ("key_file", "cert_file")
            )
            self.error((*t.key, given), f"{given} needs {missing} too (they go together)")
        return Destination(
            name=d.name,
            kind=d.kind,
            ae_title=self.ae_title(t, "ae_title", d.ae_title, required=False),
            called_ae=self.ae_title(t, "called_ae", "", required=True),
            host=host,
            port=port,
            tls=tls,
            ca_file=files["ca_file"],
            cert_file=files["cert_file"],
            key_file=files["key_file"],
            timeout_seconds=float(common["timeout_seconds"]),
            retries=int(common["retries"]),
            backoff_seconds=float(common["backoff_seconds"]),
            batch_size=int(common["batch_size"]),
        )

    def dicomweb_destination(
        self, t: Table, d: Destination, common: Mapping[str, float | int]
    ) -> Destination:
        url = t.string("url", "", required=True)
        if "url" in t.data and isinstance(t.data["url"], str):
            m = re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", url)
            if m is None:
                self.error(
                    (*t.key, "url"),
                    f"expected an http:// or https:// URL without query (the STOW-RS base, "
                    f'e.g. "https://pacs.example.org/dicom-web"), got {url!r}',
                )
            elif "@" in url.split("/")[2]:
                self.error(
                    (*t.key, "url"),
                    "no credentials in the URL: put them in token_file or basic_auth_file",
                )
        token = t.optional_path("token_file")
        basic = t.optional_path("basic_auth_file")
        if token is not None and basic is not None:
            self.error((*t.key, "basic_auth_file"), "give token_file or basic_auth_file, not both")
        return Destination(
            name=d.name,
            kind=d.kind,
            url=url.rstrip("/"),
            token_file=token,
            basic_auth_file=basic,
            timeout_seconds=float(common["timeout_seconds"]),
            retries=int(common["retries"]),
            backoff_seconds=float(common["backoff_seconds"]),
            batch_size=int(common["batch_size"]),
        )
