"""The Expert Determination report: a profile's decisions and a folder's residual risk.

:func:`build_report` gathers, for one profile, (1) its settings and plan digest, (2) every
attribute's decision with its source and rationale and, when a folder is given, (3) the
residual re-identification risk measured on that folder's files *after* de-identification
with the profile, and (4) the files withheld and why. :mod:`deidfs.evidence.render`
(JSON, Markdown) and :mod:`deidfs.evidence.html_page` write it out; the HTML is one
self-contained page (inline CSS, an inline SVG chart, no script, no external asset).

The folder's files are rendered exactly as the mount would serve them (header only: pixels
are not read) and the rendered header bytes are parsed back, so the risk is measured on what
recipients receive. The profile evaluated is the one named, applied to the folder's files,
even when the folder is configured with another profile: the report then says so, which
lets a privacy officer compare profiles on the same data before assigning one.

What the report prints: served (de-identified) values only, never an original value, path or
file name. Quasi-identifier values are printed because they are exactly what a recipient of
the data sees, and the privacy officer needs them to judge the risk; a retained rare value is
shown so it can be suppressed. Patients are named by their served, pseudonymized Patient ID.
Withheld files are counted by reason, never named.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from pydicom import dcmread

from deidfs import __version__
from deidfs.config.model import FolderConfig
from deidfs.deid.plan import Plan, Source, compile_plan, describe
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.risk import (
    Assessment,
    Extractor,
    FileQI,
    assess_files,
)
from deidfs.deid.standard import EDITION
from deidfs.deid.tags import format_tag, keyword_of, parse_tag
from deidfs.errors import NotFound, ProfileError, Refused
from deidfs.ops.logs import source_token
from deidfs.view.render import View, render_path

log = logging.getLogger(__name__)

#: Names the watcher never takes (partial uploads), so the report does not count them either.
IGNORED_SUFFIXES = (".part", ".partial")
#: Unique patients listed one by one in Markdown and HTML (all of them are in JSON).
MAX_LISTED_UNIQUE = 50
DUPLICATE = "duplicate_view_path"
UNREADABLE_VIEW = "unreadable_view"

#: What each withholding reason means, for readers of the report.
REASON_MEANINGS: dict[str, str] = {
    "not_dicom": "not a DICOM file",
    "unparseable": "DICOM that cannot be parsed safely",
    "dicomdir": "DICOMDIR media directory (never served)",
    "encapsulated_document": "encapsulated PDF/CDA/3-D document (content cannot be cleaned)",
    "burned_in_no_mask": "image that may carry burned-in text, no mask matches (Clean Pixel Data)",
    "pixel_unsupported": "pixel data a mask must redact in a form deidfs cannot redact",
    "no_sop_instance_uid": "SOP Instance UID missing",
    "truncated": "file cut short (an element, item or sequence not closed inside the file)",
    "trailing_data": "bytes that are no DICOM element after the data set (garbage, a hole)",
    "transfer_syntax_mismatch": "data set not encoded as its transfer syntax says",
    "element_order": "an element repeated, or one after pixel data that precedes one before it",
    "header_too_large": "header (everything before pixel data) past the configured size limit",
    "untrusted_attribute": "an attribute the file cannot lose is not what its tag claims",
    "bad_pixel_data": "malformed encapsulated pixel data",
    "too_large": "deflated data set or pixel data to redact past the size limit",
    "unwritable": "a de-identified value could not be encoded",
    "bad_value": "an element value could not be decoded",
    "bad_sequence": "a sequence could not be read",
    "unreadable": "file cannot be opened (permissions, symbolic link)",
    "not_regular": "not a regular file",
    "source_changed": "file changed while it was read",
    "parse_timeout": "header took longer to read than [daemon] parse_timeout_seconds allows",
    DUPLICATE: "same view path as another file (one of them is served)",
    UNREADABLE_VIEW: "rendered, but its header could not be read back (not measured)",
}

#: The method, as the report states it (kept in step with :mod:`deidfs.deid.risk`).
METHOD = (
    (
        "Quasi-identifiers",
        "Attributes an adversary may know from elsewhere (patient characteristics, dates, "
        "acquisition, device, institution, descriptions). A quasi-identifier is retained "
        "when at least one served file carries a non-empty value for it; only retained "
        "ones form the equivalence classes.",
    ),
    (
        "Dates",
        "A date kept as is counts at full precision and a date reduced to its year counts "
        "by year. A date shifted by the keyed per-patient offset is not linkable by itself, "
        "but intervals between one patient's shifted dates are real: the age at the study "
        "in days and the days between a patient's studies count. Dummy, emptied and removed "
        "dates do not count.",
    ),
    (
        "Patients",
        "A patient is a served, pseudonymized Patient ID. Files without one are grouped by "
        "their served Study Instance UID, which can only split a person into more records.",
    ),
    (
        "Patients with several studies",
        "A patient's record holds, for every quasi-identifier, the set of distinct served "
        "values over all of the patient's files. Two patients share an equivalence class "
        "when all their sets are equal. This errs towards more uniqueness.",
    ),
    (
        "k-anonymity",
        "k is the size of the smallest equivalence class. A patient alone in a class is "
        "unique. Maximum risk is 1/k; average risk is the number of classes divided by the "
        "number of patients.",
    ),
    (
        "Why a patient is unique",
        "For a unique patient, each other patient differs on some set of quasi-identifiers; "
        "removing all of them would put the two in one class. The minimal such sets (no "
        "smaller set works) are listed, smallest first. 'Singled out by' names the "
        "quasi-identifiers whose value no other patient shares. Per attribute, the summary "
        "counts the unique patients it singles out, the unique patients for whom it is in a "
        "smallest removal set, and those who stay unique while it is kept (it is in every "
        "removal set).",
    ),
    (
        "Values shown",
        "Every value in this report is a de-identified value as served, what a recipient "
        "sees; no original value, path or file name is printed. Rare values are shown on "
        "purpose so that they can be suppressed.",
    ),
)


# -- gathering --------------------------------------------------------------------------------
def iter_sources(root: Path) -> Iterator[tuple[Path, PurePosixPath]]:
    """The files the watcher takes under ``root``, sorted: regular files, not dotfiles nor
    in dot-directories, not partial uploads (``*.part``, ``*.partial``); no symlink followed.
    """
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # vanished or unreadable: the watcher skips it too
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and not name.lower().endswith(
                    IGNORED_SUFFIXES
                ):
                    path = Path(entry.path)
                    yield path, PurePosixPath(path.relative_to(root).as_posix())
            except OSError:
                continue  # vanished while read
        stack.extend(reversed(subdirs))


@dataclass(frozen=True, slots=True)
class SourceOutcome:
    """One source file of a folder, rendered or withheld."""

    path: Path
    source_rel: PurePosixPath
    token: str  #: keyed token of the source path, the form in which logs name a file
    view: View | None
    refused: str  #: the withholding reason, ``""`` when rendered


def render_folder(
    folder: FolderConfig, plan: Plan, pseudo: Pseudonymizer
) -> Iterator[SourceOutcome]:
    """Render every source of ``folder`` as the mount would, one at a time.

    Raises
    ------
    NotFound
        When the folder's source directory does not exist.
    """
    if not folder.path.is_dir():
        raise NotFound(f"folder {folder.id!r}: its source directory does not exist")
    for path, rel in iter_sources(folder.path):
        token = pseudo.token(str(path), "path")
        try:
            with source_token(token):
                view = render_path(path, plan, pseudo, folder.layout, rel)
        except Refused as exc:
            log.debug("folder %s: file %s withheld: %s", folder.id, token, exc.reason)
            yield SourceOutcome(path, rel, token, None, exc.reason)
            continue
        except OSError as exc:
            log.debug("folder %s: file %s unreadable: errno %s", folder.id, token, exc.errno)
            yield SourceOutcome(path, rel, token, None, "unreadable")
            continue
        yield SourceOutcome(path, rel, token, view, "")


@dataclass(frozen=True, slots=True)
class FolderAssessment:
    """Sections 3 and 4 of the report for one folder."""

    folder: str
    configured_profile: str
    evaluated_profile: str
    layout: str
    sources: int  #: candidate files found
    served: int  #: files that would be served
    withheld: tuple[tuple[str, int], ...]  #: reason -> files, most first
    risk: Assessment


def assess_folder(folder: FolderConfig, plan: Plan, pseudo: Pseudonymizer) -> FolderAssessment:
    """Render ``folder``'s files under ``plan`` and measure the residual risk of the result."""
    extractor = Extractor(plan)
    files: list[FileQI] = []
    withheld: Counter[str] = Counter()
    seen: set[PurePosixPath] = set()
    sources = 0
    for outcome in render_folder(folder, plan, pseudo):
        sources += 1
        if outcome.view is None:
            withheld[outcome.refused] += 1
            continue
        if outcome.view.relpath in seen:
            withheld[DUPLICATE] += 1
            continue
        try:
            ds = dcmread(io.BytesIO(outcome.view.header), stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many types; the view is then not measured
            log.warning(
                "folder %s: view of %s unreadable: %s", folder.id, outcome.token, type(exc).__name__
            )
            withheld[UNREADABLE_VIEW] += 1
            continue
        seen.add(outcome.view.relpath)
        files.append(extractor.extract(ds))
    return FolderAssessment(
        folder=folder.id,
        configured_profile=folder.profile,
        evaluated_profile=plan.profile.name,
        layout=folder.layout.value,
        sources=sources,
        served=len(files),
        withheld=tuple(sorted(withheld.items(), key=lambda kv: (-kv[1], kv[0]))),
        risk=assess_files(files),
    )


# -- the document -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RuleSummary:
    """A custom rule as the admin wrote it."""

    id: str
    act: str
    note: str


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """Section 1: the profile's settings."""

    name: str
    base: str
    comment: str
    enabled: bool
    builtin: bool
    digest: str
    edition: str
    options: tuple[str, ...]
    disabled: tuple[str, ...]
    rules: tuple[RuleSummary, ...]
    #: identifiers the profile serves on purpose (``accepted``): verify does not fail on them
    accepted: tuple[str, ...]
    date_modification: str
    max_age: int | None
    apply_masks: bool
    masks: int


@dataclass(frozen=True, slots=True)
class AttributeDecision:
    """Section 2: one attribute's decision."""

    tag: str
    keyword: str
    name: str
    action: str  #: PS3.15 action code or custom act
    op: str  #: what deidfs does
    source: str  #: basic profile, option ..., disabled, custom rule, ...
    rationale: str
    accepted: bool = False  #: listed in the profile's ``accepted``


@dataclass(frozen=True, slots=True)
class ExpertReport:
    """The whole report."""

    generated: str  #: ISO 8601, UTC
    version: str
    profile: ProfileSummary
    attributes: tuple[AttributeDecision, ...]
    folder: FolderAssessment | None


class ReportFormat(Enum):
    """Output formats of ``deidfs report``."""

    MD = "md"
    HTML = "html"
    JSON = "json"


#: How an attribute of the profile's ``accepted`` list is described.
ACCEPTED_TEXT = "accepted: served on purpose, listed in the profile's accepted identifiers"


def _rationale(source: Source, option: str | None, note: str) -> str:
    if source is Source.CUSTOM:
        return note or "custom rule (no note recorded)"
    if source is Source.DISABLED:
        return "disabled in this profile: the attribute is left as it is"
    if source is Source.OPTION:
        text = f"PS3.15 Table E.1-1, option column {option}"
        return f"{text}: {note}" if note else text
    if source is Source.BASIC:
        return "PS3.15 Table E.1-1, Basic Profile column"
    return note or source.value


def _keyword(tag_text: str) -> str:
    try:
        return keyword_of(parse_tag(tag_text))
    except ProfileError:
        return ""  # a repeating-group row such as (50xx,xxxx)


def summarize_profile(plan: Plan) -> ProfileSummary:
    """Section 1 of the report."""
    p: Profile = plan.profile
    return ProfileSummary(
        name=p.name,
        base=p.base or "",
        comment=p.comment,
        enabled=p.enabled,
        builtin=p.builtin,
        digest=plan.digest,
        edition=EDITION,
        options=tuple(sorted(o.value for o in p.options)),
        disabled=tuple(format_tag(t) for t in sorted(p.disabled)),
        accepted=tuple(format_tag(t) for t in sorted(p.accepted)),
        rules=tuple(
            RuleSummary(r.id_text or format_tag(r.tag), r.act_text or r.act.value, r.note)
            for r in p.rules
        ),
        date_modification=p.date_modification.value,
        max_age=p.max_age,
        apply_masks=p.apply_masks,
        masks=len(p.masks),
    )


def attribute_decisions(plan: Plan) -> tuple[AttributeDecision, ...]:
    """Section 2 of the report: :func:`deidfs.deid.plan.describe` with rationales."""
    out = []
    accepted = {format_tag(t) for t in plan.profile.accepted}
    for row in describe(plan):
        d = row.decision
        option = d.option.value if d.option is not None else None
        rationale = _rationale(d.source, option, d.note)
        if row.tag in accepted:
            rationale += f"; {ACCEPTED_TEXT}"
        out.append(
            AttributeDecision(
                tag=row.tag,
                keyword=_keyword(row.tag),
                name=row.name,
                action=d.action.value,
                op=d.op.value,
                source=d.describe(),
                rationale=rationale,
                accepted=row.tag in accepted,
            )
        )
    return tuple(out)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def build_report(
    profile: Profile,
    folder: FolderConfig | None = None,
    pseudonymizer: Pseudonymizer | None = None,
    *,
    now: Callable[[], dt.datetime] = _utcnow,
) -> ExpertReport:
    """Build the report of ``profile``; with ``folder``, measure it on the folder's files.

    ``pseudonymizer`` (the installation's key) is needed with ``folder``, so that the
    pseudonymized values shown are the ones served.
    """
    plan = compile_plan(profile)
    assessment = None
    if folder is not None:
        if pseudonymizer is None:
            raise ValueError("a folder assessment needs the installation's pseudonymizer")
        assessment = assess_folder(folder, plan, pseudonymizer)
    return ExpertReport(
        generated=now().astimezone(dt.UTC).replace(microsecond=0).isoformat(),
        version=__version__,
        profile=summarize_profile(plan),
        attributes=attribute_decisions(plan),
        folder=assessment,
    )
