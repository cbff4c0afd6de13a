"""``deidfs destination ...``: list, add and remove the DICOM nodes (C-STORE) and DICOMweb
servers (STOW-RS) that ``deidfs export --to-destination`` sends to.

Credentials stay in their own files: a destination names them. Edits go through
:func:`deidfs.cli.admin_common.run_edit`.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

from deidfs.cli.admin_common import (
    UsageError,
    action,
    group,
    load_config_file,
    option_parents,
    print_json,
    run_edit,
)
from deidfs.config import edit_destinations
from deidfs.config.model import DestinationKind


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``destination`` with its subcommands to ``sub``."""
    edit_opts, json_opt = option_parents()
    actions = group(
        sub,
        "destination",
        "list, add and remove the DICOM nodes exports are sent to",
        "Destinations of `deidfs export FOLDER --to-destination NAME`: DICOM nodes (C-STORE)\n"
        "and DICOMweb servers (STOW-RS). Credentials stay in their own files; retries,\n"
        "backoff_seconds, timeout_seconds and batch_size are edited in the TOML file.",
    )
    add = functools.partial(action, actions)

    p = add("list", "list the destinations", json_opt)
    p.set_defaults(func=destination_list)

    p = add("add", "add a destination", edit_opts)
    p.add_argument("name", help="its name (--to-destination NAME; a metric label)")
    p.add_argument(
        "--kind", choices=[k.value for k in DestinationKind], default="dicom", help="default: dicom"
    )
    p.add_argument("--ae-title", help="dicom: our AE title (default: DEIDFS)")
    p.add_argument("--called-ae", help="dicom: the node's AE title")
    p.add_argument("--host", help="dicom: the node's host name or address")
    p.add_argument("--port", type=int, help="dicom: the node's port")
    p.add_argument("--tls", action="store_true", help="dicom: TLS (PS3.15 Annex B.1)")
    for name in ("ca-file", "cert-file", "key-file"):
        p.add_argument(f"--{name}", help=f"dicom with --tls: {name.replace('-', ' ')}")
    p.add_argument("--url", help="dicomweb: the STOW-RS base URL")
    p.add_argument("--token-file", help="dicomweb: a file holding a bearer token")
    p.add_argument("--basic-auth-file", help="dicomweb: a file holding user:password")
    p.set_defaults(func=destination_add)

    p = add("remove", "remove a destination (what was sent there stays there)", edit_opts)
    p.add_argument("name", help="destination name")
    p.set_defaults(func=destination_remove)


# --------------------------------------------------------------------------------------------
# destination ...


def destination_list(args: argparse.Namespace) -> int:
    """``deidfs destination list``."""
    config = load_config_file(args)
    rows = []
    for d in config.destinations.values():
        if d.kind is DestinationKind.DICOM:
            address = f"{d.called_ae}@{d.host}:{d.port}" + (" (tls)" if d.tls else "")
        else:
            address = d.url
        rows.append(
            {"name": d.name, "kind": d.kind.value, "address": address, "ae_title": d.ae_title}
        )
    if args.json:
        print_json(rows)
        return os.EX_OK
    if not rows:
        print("no destinations (add one with: deidfs destination add NAME --called-ae ...)")
        return os.EX_OK
    wid = max(len("NAME"), *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{wid}}  {'KIND':<8} ADDRESS")
    for r in rows:
        print(f"{r['name']:<{wid}}  {r['kind']:<8} {r['address']}")
    return os.EX_OK


def destination_add(args: argparse.Namespace) -> int:
    """``deidfs destination add NAME --kind dicom|dicomweb ...``."""
    kind = DestinationKind(args.kind)
    pairs: list[tuple[str, Any]] = [("kind", kind.value)]
    if kind is DestinationKind.DICOM:
        wanted: tuple[str, ...] = (
            "ae_title",
            "called_ae",
            "host",
            "port",
            "ca_file",
            "cert_file",
            "key_file",
        )
        others: tuple[str, ...] = ("url", "token_file", "basic_auth_file")
    else:
        wanted = ("url", "token_file", "basic_auth_file")
        others = ("ae_title", "called_ae", "host", "port", "ca_file", "cert_file", "key_file")
    given = [n for n in others if getattr(args, n) is not None]
    if given or (args.tls and kind is not DestinationKind.DICOM):
        flags = [f"--{n.replace('_', '-')}" for n in given] + (["--tls"] if args.tls else [])
        raise UsageError(f"{', '.join(flags)}: not for --kind {kind.value}")
    for name in wanted:
        value = getattr(args, name)
        if value is None:
            continue
        if name.endswith("_file"):
            value = os.path.normpath(os.path.abspath(value))
        pairs.append((name, value))
    if args.tls:  # after the address, before the files
        at = max(i for i, (n, _) in enumerate(pairs) if not n.endswith("_file")) + 1
        pairs.insert(at, ("tls", True))
    return run_edit(
        args,
        edit_destinations.add_destination(args.name, pairs),
        f"destination {args.name!r} added",
    )


def destination_remove(args: argparse.Namespace) -> int:
    """``deidfs destination remove NAME``."""
    edit = edit_destinations.remove_destination(args.name)
    return run_edit(args, edit, f"destination {args.name!r} removed")
