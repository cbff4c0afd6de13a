"""``deidfs status``, ``reload`` and ``withheld``: ask the running daemon over its control socket.

The socket's path comes from ``--socket``, else from the configuration's
``[daemon] control_socket``. The configuration is read leniently for that one key: a file
someone just broke must not stop ``deidfs reload`` from reporting the daemon's verdict, nor
``deidfs status`` from showing that the last good configuration is still serving. A file
that is not TOML at all has no key to read: its syntax error is reported (file:line, exit 78)
rather than a guess at the default socket, which would say "the daemon is not running".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deidfs.cli.common import config_path
from deidfs.config.load import load_config
from deidfs.config.model import ConfigUnreadable, DaemonConfig
from deidfs.errors import ConfigError
from deidfs.ops.control_client import call
from deidfs.ops.control_protocol import ErrorCode, Reply

STATUS_EPILOG = """exit codes:
  0 the daemon answered, 69 the daemon is not running, 77 permission denied on the socket,
  75 no answer in time
"""
RELOAD_EPILOG = """exit codes:
  0 reloaded (or, without --wait, reload requested), 78 the new configuration was rejected
  and the last good one keeps serving, 69 the daemon is not running, 77 permission denied on
  the control socket, 75 no answer in time

systemd's ExecReload runs `deidfs reload --wait`, so `systemctl reload deidfs` fails visibly
when the configuration is rejected.
"""
WITHHELD_EPILOG = """output: one line per source, tab-separated: FOLDER, REASON, TOKEN, PATH; for a
duplicate also the TOKEN and PATH of the source served in its place. TOKEN is the keyed file
token the daemon's log lines name (file=...).

exit codes:
  0 listed, 77 not root nor the owner of the configuration file (or permission denied on the
  control socket), 69 the daemon is not running, 75 no answer in time, 1 no such folder
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``status`` and ``reload`` to ``sub``."""
    s = sub.add_parser(
        "status",
        help="show the running daemon's state: mount, folders, backlog, last reload",
        description=(
            "Ask the running daemon for its state: mount, each folder with its files served\n"
            "and withheld (by reason), the index backlog, how each folder is watched, the\n"
            "configuration's SHA-256 and the outcome of the last reload."
        ),
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(s)
    s.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    s.set_defaults(func=_status)

    r = sub.add_parser(
        "reload",
        help="make the running daemon read its configuration again",
        description=(
            "Ask the running daemon to read and apply its configuration file. A valid\n"
            "change applies without a restart; an invalid one is rejected with every\n"
            "problem (FILE:LINE: KEY: MESSAGE) and the last good configuration keeps serving."
        ),
        epilog=RELOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(r)
    r.add_argument(
        "--wait",
        action="store_true",
        help="wait for the reload to finish and report its outcome (exit 78 if rejected)",
    )
    r.set_defaults(func=_reload)

    w = sub.add_parser(
        "withheld",
        help="list the source files the daemon does not serve, and why (root or config owner)",
        description=(
            "List the source files of the running daemon's folders that are not served:\n"
            "withheld (not DICOM, truncated, unsafe...) or duplicates of a served file (the\n"
            "same view path, such as the same SOP Instance UID), with the reason and the\n"
            "keyed token the log names them by. Lists original paths, which may carry\n"
            "patient names: only root and the owner of the configuration file may run it."
        ),
        epilog=WITHHELD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(w)
    w.add_argument("folder", nargs="?", metavar="FOLDER", help="only this folder id")
    w.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    w.set_defaults(func=_withheld)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        type=Path,
        help="control socket (default: [daemon] control_socket of the configuration)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the daemon's answer (default: %(default)s)",
    )


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket to talk to (see the module's notes).

    Raises
    ------
    ConfigError
        The configuration cannot tell: it is missing or unreadable (exit code 66), or it is
        not TOML, or blank (the daemon refuses to reload a blank file), or names no usable
        ``control_socket`` while breaking the schema (78). The
        default socket would be a guess, and a wrong guess reads "the daemon is not running".
    """
    if args.socket is not None:
        return Path(args.socket)
    path = config_path(getattr(args, "config", None))
    if path is None:
        return DaemonConfig().control_socket
    try:
        config = load_config(path, allow_blank=False)
        return Path(os.path.abspath(config.daemon.control_socket))
    except ConfigUnreadable:
        raise
    except ConfigError as exc:
        invalid = exc
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise invalid from None  # not TOML: file:line of the syntax error, exit 78
    if not data:
        raise invalid from None  # blank: names no socket, and the daemon refuses it anyway
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise invalid from None
    if "control_socket" not in daemon:
        return DaemonConfig().control_socket  # what the daemon itself falls back to
    value = daemon.get("control_socket")
    if not isinstance(value, str) or not value:
        raise invalid from None
    # As the configuration does: relative to the file's directory.
    return Path(os.path.abspath(path.absolute().parent / value))


def _socket(args: argparse.Namespace) -> Path:
    """:func:`socket_path`; its error says how to reach the daemon all the same."""
    try:
        return socket_path(args)
    except ConfigError as exc:
        exc.args = (
            f"{exc}\n  (the daemon's control socket is named in this file: give it with "
            "--socket to ask the daemon all the same)",
        )
        raise


def _status(args: argparse.Namespace) -> int:
    reply = call(_socket(args), "status", timeout=args.timeout)
    if not reply.ok:
        return _failed(reply)
    if args.json:
        print(json.dumps(reply.result, indent=2, sort_keys=True))
    else:
        print(format_status(reply.result))
    return 0


def _reload(args: argparse.Namespace) -> int:
    reply = call(_socket(args), "reload", {"wait": args.wait}, timeout=args.timeout)
    if not reply.ok:
        return _failed(reply)
    result = reply.result
    if not args.wait:
        print("reload requested")
        return 0
    changes = result.get("changes") or []
    print(
        "reloaded"
        + (":" if changes else ": nothing changed (the running configuration is current)")
    )
    for change in changes:
        print(f"  {change}")
    for warning in result.get("warnings") or []:
        print(f"deidfs: warning: {warning}", file=sys.stderr)
    return 0


def _withheld(args: argparse.Namespace) -> int:
    request = {} if args.folder is None else {"folder": args.folder}
    reply = call(_socket(args), "withheld", request, timeout=args.timeout)
    if not reply.ok:
        return _failed(reply)
    if args.json:
        print(json.dumps(reply.result, indent=2, sort_keys=True))
        return 0
    for folder in reply.result.get("folders") or []:
        for src in folder.get("sources") or []:
            fields = [str(folder.get("id")), str(src.get("reason")), str(src.get("token"))]
            fields.append(_printable(src.get("path")))
            if src.get("served") is not None:
                fields += [str(src.get("served_token")), _printable(src.get("served"))]
            print("\t".join(fields))
    return 0


def _printable(path: object) -> str:
    """A path as the terminal can show it: undecodable bytes and control characters escaped."""
    raw = os.fsencode(str(path))
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _failed(reply: Reply) -> int:
    error = reply.error
    assert error is not None
    print(f"deidfs: {error.message}", file=sys.stderr)
    for detail in error.details:
        print(f"  {detail}", file=sys.stderr)
    if error.code is ErrorCode.CONFIG_INVALID:
        return os.EX_CONFIG
    if error.code is ErrorCode.BUSY:
        return os.EX_TEMPFAIL
    if error.code is ErrorCode.NOT_AVAILABLE:
        return os.EX_UNAVAILABLE
    if error.code is ErrorCode.DENIED:
        return os.EX_NOPERM
    return 1


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _when(unix: object) -> str:
    if not isinstance(unix, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(st: Mapping[str, Any]) -> str:
    """The daemon's ``status`` answer as text for people."""
    out: list[str] = []
    ready = "ready" if st.get("ready") else "NOT READY"
    out.append(
        f"deidfs {st.get('version', '?')} (pid {st.get('pid', '?')}), "
        f"up {_duration(float(st.get('uptime_seconds', 0)))}, {ready}"
    )
    mount = st.get("mount") or {}
    state = f"mounted (libfuse {mount.get('libfuse')})" if mount.get("mounted") else "NOT MOUNTED"
    out.append(f"mount:   {mount.get('mountpoint', '?')}  {state}")
    cfg = st.get("config") or {}
    out.append(f"config:  {cfg.get('path') or '-'}  sha256 {cfg.get('sha256') or '-'}")
    last = st.get("last_reload")
    if isinstance(last, dict):
        if last.get("ok"):
            changes = "; ".join(last.get("changes") or []) or "nothing changed"
            if last.get("trigger") == "start":
                changes = "loaded at start"
            out.append(f"reload:  ok at {_when(last.get('finished_at'))} ({last.get('trigger')})")
            out.append(f"         {changes}")
            for warning in last.get("warnings") or []:
                out.append(f"         warning: {warning}")
        else:
            out.append(
                f"reload:  REJECTED at {_when(last.get('finished_at'))} ({last.get('trigger')}); "
                "the last good configuration is serving"
            )
            for error in last.get("errors") or []:
                out.append(f"         {error}")
    index = st.get("index") or {}
    out.append(
        f"index:   {index.get('backlog', 0)} queued, {index.get('rendered', 0)} rendered, "
        f"{index.get('reused', 0)} reused from the index"
    )
    for job in index.get("in_progress") or []:
        out.append(
            f"         rendering folder={job.get('folder')} file={job.get('file')} "
            f"for {float(job.get('seconds', 0)):.1f} s"
        )
    cache = st.get("cache") or {}
    lookups = int(cache.get("hits", 0)) + int(cache.get("misses", 0))
    ratio = f", {100 * int(cache.get('hits', 0)) // lookups}% hits" if lookups else ""
    fuse = st.get("fuse") or {}
    out.append(
        f"cache:   {cache.get('entries', 0)} header(s), "
        f"{int(cache.get('bytes', 0)) / 1048576:.1f} MiB{ratio}; "
        f"{fuse.get('open_files', 0)} open file(s)"
    )
    if fuse.get("refused_opens"):
        out.append(
            f"fuse:    {fuse['refused_opens']} open(s) refused: out of file descriptors "
            f"(at most {fuse.get('open_limit', 0)} open at once)"
        )
    warned = (st.get("warnings") or {}).get("pydicom") or {}
    if warned:
        counts = ", ".join(f"{c} {n}" for c, n in sorted(warned.items()))
        out.append(
            f"pydicom: {sum(int(n) for n in warned.values())} warning(s): {counts} "
            "(the first of each category is logged with its file token)"
        )
    folders = st.get("folders") or []
    if not folders:
        out.append("folders: none configured")
        return "\n".join(out)
    out.append("folders:")
    rows = [["FOLDER", "PROFILE", "LAYOUT", "VISIBLE", "DUPLICATES", "WITHHELD", "SETTLING"]]
    rows[0].append("WATCH")
    notes: list[str] = []
    for f in folders:
        watch = f.get("watch") or {}
        health = "ok" if watch.get("healthy") else "UNHEALTHY"
        if watch.get("overflows"):
            health += f", {watch.get('overflows')} overflow(s)"
        rows.append(
            [
                str(f.get("id")),
                str(f.get("profile")),
                str(f.get("layout")),
                str(f.get("visible", 0)),
                str(f.get("duplicates", 0)),
                str(f.get("withheld_total", 0)),
                str(watch.get("settling", 0)),
                f"{watch.get('kind') or '-'} {health}",
            ]
        )
        withheld = f.get("withheld") or {}
        if withheld:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(withheld.items()))
            notes.append(f"  {f.get('id')}: withheld {reasons}")
        if watch.get("degraded"):
            notes.append(f"  {f.get('id')}: polled: {watch.get('degraded')}")
        overflows = int(watch.get("overflows") or 0)
        if overflows:
            age = watch.get("last_overflow_seconds_ago")
            last = f", last {_duration(float(age))} ago" if isinstance(age, int | float) else ""
            notes.append(
                f"  {f.get('id')}: inotify queue OVERFLOWED {overflows} time(s){last}; "
                "events were lost and the folder was rescanned"
            )
    out.extend("  " + line for line in _table(rows))
    out.extend(notes)
    return "\n".join(out)
