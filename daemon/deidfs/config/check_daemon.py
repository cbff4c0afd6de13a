"""The ``[daemon]`` table: paths, the metrics address, intervals and bounds.

:class:`DaemonChecker` builds the :class:`~deidfs.config.model.DaemonConfig`, with its
defaults for absent keys, and refuses a mount point that is, contains or lies inside the
export or state directory.
"""

from __future__ import annotations

from deidfs.config.model import DaemonConfig
from deidfs.config.tables import Checks, Table, overlaps

_MAX_WORKERS = 256

_DAEMON_KEYS = (
    "mountpoint",
    "export_dir",
    "state_dir",
    "metrics_address",
    "control_socket",
    "allow_other",
    "settle_seconds",
    "reconcile_seconds",
    "poll_seconds",
    "cache_mib",
    "workers",
    "max_header_mib",
    "parse_timeout_seconds",
)


class DaemonChecker(Checks):
    """Checks the ``[daemon]`` table."""

    def daemon(self, t: Table | None) -> DaemonConfig:
        d = DaemonConfig()
        if t is None:
            return d
        t.check_keys(_DAEMON_KEYS)
        out = DaemonConfig(
            mountpoint=t.path("mountpoint", d.mountpoint),
            export_dir=t.path("export_dir", d.export_dir),
            state_dir=t.path("state_dir", d.state_dir),
            metrics_address=self.metrics_address(t, d.metrics_address),
            control_socket=t.path("control_socket", d.control_socket),
            allow_other=t.boolean("allow_other", d.allow_other),
            settle_seconds=t.number("settle_seconds", d.settle_seconds, minimum=0.0),
            reconcile_seconds=t.number("reconcile_seconds", d.reconcile_seconds, minimum=0.0),
            poll_seconds=t.number("poll_seconds", d.poll_seconds, minimum=0.0, exclusive=True),
            cache_mib=t.integer("cache_mib", d.cache_mib, minimum=1),
            workers=t.integer("workers", d.workers, minimum=1, maximum=_MAX_WORKERS),
            max_header_mib=t.integer("max_header_mib", d.max_header_mib, minimum=1),
            parse_timeout_seconds=t.number(
                "parse_timeout_seconds", d.parse_timeout_seconds, minimum=0.0, exclusive=True
            ),
        )
        for name, other in (("export_dir", out.export_dir), ("state_dir", out.state_dir)):
            if overlaps(out.mountpoint, other):
                at = "mountpoint" if "mountpoint" in t.data else name
                self.error(
                    (*t.key, at),
                    f"the mount point ({out.mountpoint}) must not be, contain or lie inside "
                    f"{name} ({other})",
                )
        return out

    def metrics_address(self, t: Table, default: str) -> str:
        value = t.string("metrics_address", default)
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if (
            not sep
            or not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
            or (":" in host and not bracketed)
        ):
            self.error(
                (*t.key, "metrics_address"),
                f'expected "host:port" (e.g. "127.0.0.1:9464", "[::1]:9464") or "" to turn '
                f"metrics off, got {value!r}",
            )
            return default
        return value
