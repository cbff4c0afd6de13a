"""``deidfs report`` and ``deidfs verify``: evidence for an Expert Determination."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from deidfs.cli.common import config_path
from deidfs.config.load import load_config
from deidfs.config.model import Config, FolderConfig
from deidfs.deid.plan import compile_plan
from deidfs.deid.profiles import BUILTIN_PROFILES, Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import ConfigError, NotFound
from deidfs.evidence.findings import KeptIdentifier, Verification
from deidfs.evidence.render import render_report
from deidfs.evidence.report import ReportFormat, build_report
from deidfs.evidence.verify import verify_tree
from deidfs.secret import key_path, load_or_create_key

_SUFFIX_FORMATS = {
    ".html": ReportFormat.HTML,
    ".htm": ReportFormat.HTML,
    ".json": ReportFormat.JSON,
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``report`` and ``verify``."""
    p = sub.add_parser(
        "report",
        help="document a profile's decisions and a folder's residual re-identification risk",
        description=(
            "Write the evidence for an Expert Determination: (1) the profile's settings and "
            "digest, (2) every attribute's decision with its source and rationale and, with "
            "--folder, (3) the residual risk measured on the folder's files after "
            "de-identification with PROFILE (quasi-identifiers retained, k-anonymity, unique "
            "patients and the attributes that make them unique) and (4) the files withheld "
            "and why. PROFILE defaults to the folder's profile; a different PROFILE shows "
            "what the folder would serve under it. Only served (de-identified) values are "
            "printed."
        ),
    )
    p.add_argument("profile", nargs="?", help="profile to document (default: the folder's)")
    p.add_argument("--folder", metavar="ID", help="measure the residual risk on this folder")
    p.add_argument(
        "--format",
        choices=[f.value for f in ReportFormat],
        help="md (default), html (self-contained page) or json; default from --out's suffix",
    )
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.set_defaults(func=run_report)

    v = sub.add_parser(
        "verify",
        help="check what the mount (or an export) serves against the originals",
        description=(
            "Read every file the running mount serves at <mountpoint>/FOLDER (or an export "
            "tree) and compare it with its original: no original value of an attribute the "
            "folder's profile does not keep may appear in the served bytes or paths, UIDs "
            "must be remapped consistently and references resolve, pixel data must equal "
            "the original's where no pixel rule applies, and every served value must be one its "
            "tag's VR can hold. Also lists the identifiers served because the profile keeps "
            "what PS3.15 Basic removes or replaces (attribute, the rule, option or disabled "
            "attribute that keeps it, file count). Exits 1 with a list of findings (kind, tag, "
            "keyword, keyed token of the file; never a value or a path) when anything is "
            "wrong, or when a kept direct identifier (names, IDs, dates, addresses, phone, "
            "account and serial numbers, UIDs) is not in the profile's accepted list."
        ),
    )
    v.add_argument("folder", metavar="FOLDER", help="folder id")
    v.add_argument(
        "--export",
        metavar="DIR",
        nargs="?",
        const="",
        help="check an export instead of the mount: DIR/FOLDER when DIR holds a FOLDER "
        "directory (DIR is an export directory like [daemon] export_dir), else the tree DIR "
        "itself; without DIR: <export_dir>/FOLDER",
    )
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=run_verify)


def _config(arg: str | None, *, required: bool) -> Config:
    path = config_path(arg)
    if path is None:
        if required:
            raise ConfigError("no configuration file (use --config or $DEIDFS_CONFIG)")
        return Config()
    return load_config(path)


def _folder(config: Config, folder_id: str) -> FolderConfig:
    folder = config.folders.get(folder_id)
    if folder is None:
        have = ", ".join(sorted(config.folders)) or "none"
        raise NotFound(f"no folder named {folder_id!r} (have: {have})")
    return folder


def _profile(config: Config, name: str) -> Profile:
    profiles = config.profiles or BUILTIN_PROFILES
    profile = profiles.get(name)
    if profile is None:
        raise NotFound(f"no profile named {name!r} (have: {', '.join(sorted(profiles))})")
    return profile


def _write_atomically(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_report(args: argparse.Namespace) -> int:
    config = _config(args.config, required=args.folder is not None)
    folder = _folder(config, args.folder) if args.folder else None
    name = args.profile or (folder.profile if folder is not None else None)
    if name is None:
        print("deidfs report: name a PROFILE, or a --folder to use its profile", file=sys.stderr)
        return 2
    profile = _profile(config, name)
    pseudo = None
    if folder is not None:
        pseudo = Pseudonymizer(load_or_create_key(config.daemon.state_dir))
    report = build_report(profile, folder, pseudo)
    if args.format:
        fmt = ReportFormat(args.format)
    elif args.out:
        fmt = _SUFFIX_FORMATS.get(Path(args.out).suffix.lower(), ReportFormat.MD)
    else:
        fmt = ReportFormat.MD
    text = render_report(report, fmt)
    if args.out:
        try:
            _write_atomically(Path(args.out), text)
        except OSError as exc:
            print(f"deidfs report: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return os.EX_CANTCREAT
        return 0
    sys.stdout.write(text)
    return 0


def _verification_json(result: Verification, root: Path) -> dict[str, Any]:
    return {
        "folder": result.folder,
        "profile": result.profile,
        "served_root": str(root),
        "ok": result.ok,
        "served_files": result.served_files,
        "matched": result.matched,
        "not_served": result.not_served,
        "withheld": result.withheld,
        "other_files": result.other_files,
        "values_searched": result.values_searched,
        "uids_checked": result.uids_checked,
        "references_checked": result.references_checked,
        "pixel_checked": result.pixel_checked,
        "pixel_skipped": result.pixel_skipped,
        "findings": [
            {
                "kind": f.kind.value,
                "tag": f.tag,
                "keyword": f.keyword,
                "file": f.file,
                **({"reason": f.reason} if f.reason else {}),
            }
            for f in result.findings
        ],
        "kept": [
            {
                "tag": k.tag,
                "keyword": k.keyword,
                "source": k.source,
                "files": k.files,
                "direct": k.direct or None,
                "accepted": k.accepted,
                "fails": k.fails,
            }
            for k in result.kept
        ],
    }


def _kept_status(k: KeptIdentifier) -> str:
    if k.accepted:
        return "accepted"
    return f"FAIL: direct identifier ({k.direct}), not accepted" if k.direct else "not direct"


def _print_kept(result: Verification) -> None:
    if not result.kept:
        return
    n = len(result.kept)
    print(
        f"{n} identifier{'s' if n != 1 else ''} served because the profile keeps what PS3.15 "
        f"Basic removes or replaces ({len(result.failing_kept)} direct and not accepted):"
    )
    for k in result.kept:
        files = f"{k.files} file{'s' if k.files != 1 else ''}"
        print(f"  {k.tag:<12} {k.keyword or '-':<32} {k.source:<44} {files:>10}  {_kept_status(k)}")


def run_verify(args: argparse.Namespace) -> int:
    config = _config(args.config, required=True)
    folder = _folder(config, args.folder)
    if args.export is None:
        root = config.daemon.mountpoint / folder.id
        if not root.is_dir():
            print(
                f"deidfs verify: folder {folder.id!r} is not mounted at {root} "
                "(is the daemon running?)",
                file=sys.stderr,
            )
            return os.EX_UNAVAILABLE
    else:
        base = Path(args.export) if args.export else config.daemon.export_dir
        root = base / folder.id if (base / folder.id).is_dir() or not args.export else base
    state_dir = config.daemon.state_dir
    if not key_path(state_dir).exists():
        # Creating a key here would check against pseudonyms nothing was served with.
        raise NotFound(f"no pseudonym key in {state_dir}: this installation has served nothing")
    pseudo = Pseudonymizer(load_or_create_key(state_dir))
    result = verify_tree(folder, compile_plan(_profile(config, folder.profile)), pseudo, root)
    if args.json:
        json.dump(_verification_json(result, root), sys.stdout, indent=2)
        print()
        return 0 if result.ok else 1
    print(
        f"verify {folder.id} (profile {result.profile}) at {root}: "
        f"{result.served_files} files, {result.matched} checked against their originals"
    )
    print(
        f"  {result.values_searched} original values searched, {result.uids_checked} UIDs "
        f"and {result.references_checked} references checked, {result.pixel_checked} pixel "
        f"data compared ({result.pixel_skipped} under a pixel rule)"
    )
    print(
        f"  {result.not_served} files the profile serves are not in the tree; "
        f"{result.withheld} withheld by the profile; {result.other_files} other files searched"
    )
    _print_kept(result)
    if result.findings:
        print(f"{len(result.findings)} findings:")
        for f in result.findings:
            reason = f" ({f.reason})" if f.reason else ""
            print(
                f"  {f.kind.value:<22} {f.tag or '-':<12} {f.keyword or '-':<32} "
                f"file {f.file}{reason}"
            )
    if result.failing_kept:
        print(
            f"{len(result.failing_kept)} direct identifiers kept and not accepted: list "
            'those served on purpose in the profile\'s accepted (accepted = ["(0010,0010)"])'
        )
    if result.ok:
        print("ok: no findings" + ("; kept identifiers listed above" if result.kept else ""))
        return 0
    return 1
