"""The one exception hierarchy of deidfs.

Messages never carry PHI: no element value, no original path. Edges translate these into
errno values (FUSE), exit codes (CLI) or JSON errors (control socket).
"""

from __future__ import annotations

#: Exit codes of sysexits.h (``os.EX_*``), spelled out so that the de-identification core,
#: which raises these errors, imports no I/O module.
EX_CONFIG = 78
EX_NOINPUT = 66
EX_TEMPFAIL = 75


class DeidfsError(Exception):
    """Base of every error deidfs raises on purpose."""

    exit_code: int = 1


class ProfileError(DeidfsError):
    """A profile, rule, tag or option is invalid."""

    exit_code = EX_CONFIG


class ConfigError(DeidfsError):
    """The configuration file is invalid; carries file, line and key where known."""

    exit_code = EX_CONFIG

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, key: str = ""
    ) -> None:
        where = ""
        if path is not None:
            where = path if line is None else f"{path}:{line}"
        if key:
            where = f"{where}: {key}" if where else key
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line
        self.key = key
        self.reason = message


class Refused(DeidfsError):
    """A source cannot be de-identified safely; it is withheld (fail closed).

    ``reason`` is a short, bounded identifier fit for a metric label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SecretError(DeidfsError):
    """The pseudonym key is missing, malformed or readable by others."""

    exit_code = EX_CONFIG


class NotFound(DeidfsError):
    """A requested folder, profile, study or file does not exist."""

    exit_code = EX_NOINPUT


class Exhausted(DeidfsError):
    """The daemon is out of a bounded resource (file descriptors); the request may be retried.

    ``resource`` is a short, bounded identifier fit for a metric label.
    """

    exit_code = EX_TEMPFAIL

    def __init__(self, resource: str) -> None:
        super().__init__(f"out of {resource}")
        self.resource = resource
