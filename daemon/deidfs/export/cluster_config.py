"""What a run on a Dask cluster is given, checked before anything is written: the address
(:func:`parse_address`: ``local:N`` or a scheduler's ``tcp://`` or ``tls://`` address), the
``--cluster`` options (:class:`ClusterOptions`), how the pseudonym key reaches the workers
(:class:`KeyFile`, :class:`KeyInTask`, :func:`key_source`) and the TLS security of a
``tls://`` scheduler (:func:`security_of`). :func:`prepare` checks all of it.

dask.distributed is optional (``pip install 'deidfs[cluster]'``) and imported only through
:func:`import_distributed`, only when a run uses a cluster; the runner, its tasks and the
connection are in :mod:`deidfs.export.cluster`.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any

from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError, DeidfsError

INSTALL_HINT = "pip install 'deidfs[cluster]'"
LOCAL_PREFIX = "local:"
#: Files per task at most. A directory is split only when it holds more; smaller ones are
#: packed together. Large enough that a task's overhead (about a millisecond of scheduling
#: and transfer) is noise beside its files, small enough that progress moves and a lost
#: worker costs little work.
DEFAULT_BATCH_FILES = 256
_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


# -- errors -------------------------------------------------------------------------------------
class ClusterUnavailable(DeidfsError):
    """The cluster cannot be used: dask.distributed is missing, the scheduler is
    unreachable or has no worker (exit 69)."""

    exit_code = os.EX_UNAVAILABLE


# -- address, key and options -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """Where a run goes: ``local:N`` (a LocalCluster of N worker processes started here) or
    a scheduler's ``tcp://`` or ``tls://`` address."""

    text: str
    local_workers: int = 0  #: N of ``local:N``; 0 for a scheduler's address

    @property
    def local(self) -> bool:
        """Whether the cluster is started here, on loopback."""
        return self.local_workers > 0

    @property
    def scheme(self) -> str:
        """``local``, ``tcp`` or ``tls``."""
        return "local" if self.local else self.text.split("://", 1)[0]


def parse_address(text: str) -> ClusterAddress:
    """``--cluster``'s value.

    Raises
    ------
    ValueError
        When it is neither ``local:N`` (N at least 1) nor ``tcp://HOST:PORT`` or
        ``tls://HOST:PORT``.
    """
    if text.startswith(LOCAL_PREFIX):
        count = text[len(LOCAL_PREFIX) :]
        if count.isdigit() and int(count) >= 1:
            return ClusterAddress(text, int(count))
    elif _ADDRESS.match(text) and int(text.rsplit(":", 1)[1]) < 65536:
        return ClusterAddress(text)
    raise ValueError(
        f"{text!r}: give local:N (N worker processes on this machine) or a scheduler "
        "address tcp://HOST:PORT or tls://HOST:PORT"
    )


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """The ``--cluster`` options of a command."""

    address: ClusterAddress
    batch_files: int = DEFAULT_BATCH_FILES
    allow_plain_key: bool = False
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True, slots=True, repr=False)
class KeyFile:
    """Workers read the key from ``path`` (shared storage); ``fingerprint`` proves it is
    the client's (:meth:`~deidfs.deid.pseudonym.Pseudonymizer.fingerprint`)."""

    path: str
    fingerprint: str

    def __repr__(self) -> str:
        return "KeyFile(read by each worker)"


@dataclass(frozen=True, slots=True, repr=False)
class KeyInTask:
    """The key itself, sent in the tasks."""

    key: bytes
    fingerprint: str

    def __repr__(self) -> str:
        return "KeyInTask(withheld)"


KeySource = KeyFile | KeyInTask


def key_source(options: ClusterOptions, key: bytes, key_file: str | None) -> KeySource:
    """How the workers get ``key``: from ``key_file`` when there is one (each worker reads
    it), else inside the task, where the connection allows it.

    Raises
    ------
    ConfigError
        A plain ``tcp://`` scheduler with the key in the task, unless ``allow_plain_key``.
    """
    fingerprint = Pseudonymizer(key).fingerprint()
    if key_file:
        return KeyFile(os.path.abspath(key_file), fingerprint)
    if options.address.scheme == "tcp" and not options.allow_plain_key:
        raise ConfigError(
            f"--cluster {options.address.text}: a plain tcp:// connection would carry the "
            "pseudonym key in clear to the scheduler and the workers. Give --key-file FILE "
            "on storage the workers share (each reads the key itself), use a tls:// "
            "scheduler, or pass --allow-plain-key on a network you trust"
        )
    return KeyInTask(key, fingerprint)


def prepare(options: ClusterOptions, key: bytes, key_file: str | None) -> KeySource:
    """Check ``options`` before anything is written, and how the workers get ``key``
    (:func:`key_source`).

    Raises
    ------
    ClusterUnavailable
        dask.distributed is not installed.
    ConfigError
        The key may not travel so (:func:`key_source`), or TLS files are missing.
    """
    import_distributed()
    source = key_source(options, key, key_file)
    security_of(options)
    return source


def security_of(options: ClusterOptions) -> Any:
    """The ``distributed.security.Security`` of a ``tls://`` address (None otherwise):
    from ``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``, else Dask's configuration
    (``distributed.comm.tls``).

    Raises
    ------
    ConfigError
        A ``tls://`` address without certificates, or only some of the three files.
    """
    if options.address.scheme != "tls":
        if options.tls_ca_file or options.tls_cert or options.tls_key:
            raise ConfigError("--tls-ca-file, --tls-cert and --tls-key need a tls:// address")
        return None
    security_module = import_distributed("distributed.security")
    given = (options.tls_ca_file, options.tls_cert, options.tls_key)
    if any(given):
        if not all(given):
            raise ConfigError(
                "a tls:// scheduler needs all of --tls-ca-file, --tls-cert, --tls-key"
            )
        for path in given:
            assert path is not None
            if not os.path.isfile(path):
                raise ConfigError(f"TLS file {path} does not exist")
        return security_module.Security(
            tls_ca_file=options.tls_ca_file,
            tls_client_cert=options.tls_cert,
            tls_client_key=options.tls_key,
            require_encryption=True,
        )
    security = security_module.Security(require_encryption=True)
    if not security.tls_ca_file or not security.tls_client_cert:
        raise ConfigError(
            f"--cluster {options.address.text}: give --tls-ca-file, --tls-cert and --tls-key, "
            "or set distributed.comm.tls.ca-file and .client.cert/.key in Dask's configuration"
        )
    return security


def import_distributed(name: str = "distributed") -> Any:
    """Import dask.distributed (or one of its modules), or say what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ClusterUnavailable(f"--cluster needs dask.distributed: {INSTALL_HINT}") from None
