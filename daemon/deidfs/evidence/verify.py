"""``deidfs verify``: check what the mount or an export serves against the originals.

Every served file is mapped to its original by rendering the folder's originals with the
folder's configured profile and the installation's key and matching the view paths. Then:

No original value of an attribute the profile does not keep appears in the served bytes
    Each original value of an attribute whose action is not keep (anywhere in the data set:
    nested sequences and private blocks included, file meta too) is searched as bytes in
    the whole served file and in its served path: text as UTF-8 and Latin-1 (case as
    stored), dates also as ``YYYY-MM-DD``, person names also by component, binary and UN
    values as their bytes. Skipped, because a match would mean nothing: text shorter than
    4 characters; binary values shorter than 8 bytes (4 when printable) or made of fewer
    than 3 distinct bytes; numbers (IS, DS, US...); registered UIDs (SOP classes, transfer
    syntaxes); the engine's own dummy values; values that also occur in an attribute the
    profile keeps in the same file; dates whose year-only form is the date itself (year
    only dates) and times of day (shifted dates move by whole days); and the text of
    Clean (C) descriptors, which keep whatever part of them is not identifying (the
    identifying values they might contain are searched for through their own attributes).
    An all-digit value shorter than 8 characters counts only where it is not part of a
    longer number (so ``123456`` is not found inside a served ``2.25.`` UID). In pixel
    data, which is random-looking binary, only values of 8 bytes or more are searched.
    Short and numeric values are checked structurally instead: a top-level attribute whose
    action is not keep must not be served with its original value.
UIDs are remapped consistently
    Original and served UIDs are paired element by element (sequence items by position);
    one original UID must map to one served UID across all files, two original UIDs must not
    map to one, and a reference inside a sequence to an instance, series, study or frame of
    reference of the folder must carry the same served UID as the referenced object.
Pixel data is the original's
    Where no pixel rule applies, the served Pixel Data element is byte for byte the
    original's.
Nothing else carries original values
    Files of the served tree that are not served DICOM files (a manifest, a temporary file)
    are searched for every original value of the folder. A DICOM file without an original is
    a finding: verify cannot vouch for it.
Bytes are judged by what they are, not by their tag
    What an original's element is, is decided as the engine decides it
    (:func:`deidfs.deid.element_rules.element_decision`,
    :func:`~deidfs.deid.element_rules.distrust`):
    a value kept by its tag's row that cannot be that attribute (Patient's Name under Image
    Type, a description under a command element) is one the engine removes, so it is
    searched for like any removed value, and exempts nothing. Every served element the
    profile keeps must pass the same judgement (VR, length, repertoire, enumerated values),
    and no command or file meta element may be served inside the data set.

These are findings: the served bytes are not what the profile says. Apart from them, verify
lists the identifiers served *because the profile keeps them*: attributes a custom rule, an
option or a disabled attribute keeps (served with their original value) where PS3.15 Basic
removes or replaces them, each with what keeps it and in how many files. Those that are
direct identifiers (:func:`deidfs.deid.identifiers.direct_kind`) fail verification unless the
profile lists them in ``accepted``.

Findings name a kind, a tag and keyword, and the file as a keyed token of its path (the form
in which logs name files); never a value or a path.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from deidfs.config.model import FolderConfig
from deidfs.deid.plan import Plan
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.errors import NotFound
from deidfs.evidence.checks import _Original, _Verifier
from deidfs.evidence.findings import (
    Finding,
    FindingKind,
    Verification,
)
from deidfs.evidence.report import render_folder
from deidfs.evidence.scan import (
    _is_dicom,
    _served_files,
)
from deidfs.ops.logs import source_token


def verify_tree(
    folder: FolderConfig, plan: Plan, pseudo: Pseudonymizer, served_root: Path
) -> Verification:
    """Check every file under ``served_root`` (a mount's or export's folder tree).

    Parameters
    ----------
    folder
        The folder as configured: its sources are the originals.
    plan
        The folder's profile, compiled.
    pseudo
        The installation's key.
    served_root
        ``<mountpoint>/<folder>`` or ``<export_dir>/<folder>``.

    Raises
    ------
    NotFound
        When ``served_root`` or the folder's source directory is missing.
    """
    if not served_root.is_dir():
        raise NotFound(f"folder {folder.id!r}: nothing served at {served_root}")
    originals: dict[PurePosixPath, _Original] = {}
    withheld = 0
    for outcome in render_folder(folder, plan, pseudo):
        view = outcome.view
        if view is None:
            withheld += 1
            continue
        originals.setdefault(
            view.relpath,
            _Original(outcome.path, outcome.token, view.pixel_offset, view.pixel_length),
        )
    v = _Verifier(plan)
    seen: set[PurePosixPath] = set()
    others: list[tuple[Path, str]] = []
    served_files = 0
    for path, rel in _served_files(served_root):
        served_files += 1
        orig = originals.get(rel)
        if orig is not None and not rel.name.startswith("."):
            seen.add(rel)
            with source_token(orig.token):
                v.check(path, rel, orig)
            continue
        token = pseudo.token(str(rel), "path")
        if _is_dicom(path) and not rel.name.startswith("."):
            v.add(FindingKind.NO_ORIGINAL, token)
        others.append((path, token))
    references = v.finish_uids()
    if others:
        searcher = v.other_searcher()
        for path, token in others:
            v.check_other(path, token, searcher)
    return Verification(
        folder=folder.id,
        profile=plan.profile.name,
        served_files=served_files,
        matched=len(seen),
        not_served=len(set(originals) - seen),
        withheld=withheld,
        other_files=len(others),
        values_searched=len(v.all_secret),
        uids_checked=v.uids_checked,
        references_checked=references,
        pixel_checked=v.pixel_checked,
        pixel_skipped=v.pixel_skipped,
        findings=tuple(sorted(v.findings, key=Finding.sort_key)),
        kept=v.kept_identifiers(),
    )
