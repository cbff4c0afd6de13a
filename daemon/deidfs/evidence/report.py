"""The Expert Determination report: a profile's decisions and a folder's residual risk.

:func:`build_report` gathers, for one profile, (1) its settings and plan digest, (2) every
attribute's decision with its source and rationale and, when a folder is given, (3) the
residual re-identification risk measured on that folder's files *after* de-identification
with the profile, and (4) the files withheld and why. :func:`render_markdown`,
:func:`render_html` and :func:`render_json` write it out; the HTML is one self-contained
page (inline CSS, an inline SVG chart, no script, no external asset).

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
import html
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom import dcmread

from deidfs import __version__
from deidfs.config.model import FolderConfig
from deidfs.deid.plan import Plan, Source, compile_plan, describe
from deidfs.deid.profiles import Profile
from deidfs.deid.pseudonym import Pseudonymizer
from deidfs.deid.risk import (
    MAX_LISTED_VALUES,
    Assessment,
    ClassSize,
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


# -- JSON ---------------------------------------------------------------------------------------
def to_json_object(report: ExpertReport) -> dict[str, Any]:
    """The report as plain JSON-serializable data."""
    p = report.profile
    doc: dict[str, Any] = {
        "generated": report.generated,
        "deidfs_version": report.version,
        "method": dict(METHOD),
        "profile": {
            "name": p.name,
            "base": p.base or None,
            "comment": p.comment,
            "enabled": p.enabled,
            "builtin": p.builtin,
            "digest": p.digest,
            "standard_edition": p.edition,
            "options": list(p.options),
            "disabled": list(p.disabled),
            "accepted": list(p.accepted),
            "rules": [{"id": r.id, "act": r.act, "note": r.note} for r in p.rules],
            "date_modification": p.date_modification,
            "max_age": p.max_age,
            "apply_masks": p.apply_masks,
            "masks": p.masks,
        },
        "attributes": [
            {
                "tag": a.tag,
                "keyword": a.keyword,
                "name": a.name,
                "action": a.action,
                "op": a.op,
                "source": a.source,
                "rationale": a.rationale,
                "accepted": a.accepted,
            }
            for a in report.attributes
        ],
        "folder": None,
    }
    f = report.folder
    if f is None:
        return doc
    r = f.risk
    doc["folder"] = {
        "id": f.folder,
        "configured_profile": f.configured_profile,
        "evaluated_profile": f.evaluated_profile,
        "layout": f.layout,
        "sources": f.sources,
        "served": f.served,
        "withheld": [
            {"reason": reason, "files": n, "meaning": REASON_MEANINGS.get(reason, "")}
            for reason, n in f.withheld
        ],
        "risk": {
            "patients": r.patients,
            "files": r.files,
            "studies": r.studies,
            "k": r.k,
            "unique_patients": r.unique,
            "unique_share": r.unique_share,
            "average_risk": r.average_risk,
            "max_risk": r.max_risk,
            "retained_quasi_identifiers": list(r.retained),
            "quasi_identifiers": [
                {
                    "name": s.qi.name,
                    "group": s.qi.group.value,
                    "tag": format_tag(s.qi.tag) if s.qi.tag is not None else None,
                    "description": s.qi.description,
                    "retained": s.retained,
                    "distinct_values": s.distinct,
                    "patients_with_value": s.patients_with_value,
                    "values": [{"value": v, "patients": n} for v, n in s.values],
                    "values_not_listed": s.more_values,
                }
                for s in r.summaries
            ],
            "class_sizes": [
                {"size": c.size, "classes": c.classes, "patients": c.patients}
                for c in r.class_sizes
            ],
            "responsibility": [
                {
                    "quasi_identifier": x.qi,
                    "singles_out": x.singles_out,
                    "in_smallest_removal_set": x.in_smallest_set,
                    "in_every_removal_set": x.in_every_set,
                }
                for x in r.responsibility
            ],
            "unique": [
                {
                    "patient": u.patient,
                    "singled_out_by": list(u.singled_out_by),
                    "minimal_removal_sets": [list(s) for s in u.removal_sets],
                    "minimal_removal_set_count": u.removal_set_count,
                    "analyzed": u.analyzed,
                }
                for u in r.unique_patients
            ],
        },
    }
    return doc


def render_json(report: ExpertReport) -> str:
    """The report as JSON text."""
    return json.dumps(to_json_object(report), indent=2, ensure_ascii=False) + "\n"


# -- shared wording ---------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _risk_facts(f: FolderAssessment) -> list[tuple[str, str]]:
    r = f.risk
    return [
        ("Folder", f.folder),
        ("Profile evaluated", f.evaluated_profile),
        ("Profile the folder is configured with", f.configured_profile),
        ("Files found / served", f"{f.sources} / {f.served}"),
        ("Patients / studies", f"{r.patients} / {r.studies}"),
        ("Retained quasi-identifiers", ", ".join(r.retained) or "none"),
        ("k (smallest equivalence class)", "n/a" if r.k is None else str(r.k)),
        ("Unique patients (k = 1)", f"{r.unique} of {r.patients} ({_pct(r.unique_share)})"),
        ("Maximum risk (1/k)", f"{r.max_risk:.3f}"),
        ("Average risk (classes / patients)", f"{r.average_risk:.3f}"),
    ]


def _values_text(values: Sequence[tuple[str, int]], more: int) -> str:
    text = ", ".join(f"{v} ({n})" for v, n in values)
    if more:
        text += f", and {more} more"
    return text


def _profile_facts(p: ProfileSummary) -> list[tuple[str, str]]:
    return [
        ("Name", p.name + (" (built-in)" if p.builtin else "")),
        ("Based on", p.base or "-"),
        ("Comment", p.comment or "-"),
        ("Enabled", "yes" if p.enabled else "no"),
        ("Options", ", ".join(p.options) or "none"),
        ("Disabled attributes", ", ".join(p.disabled) or "none"),
        ("Accepted identifiers (served on purpose)", ", ".join(p.accepted) or "none"),
        ("Custom rules", str(len(p.rules))),
        ("Modified Dates method", p.date_modification),
        ("Ages capped above", "-" if p.max_age is None else str(p.max_age)),
        ("Pixel masks", f"{p.masks} ({'applied' if p.apply_masks else 'not applied'})"),
        ("Standard", f"DICOM PS3.15 {p.edition}, Table E.1-1"),
        ("Plan digest (SHA-256)", p.digest),
    ]


# -- Markdown ---------------------------------------------------------------------------------
def _md(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _quasi_identifier_table(r: Assessment) -> tuple[list[str], list[tuple[object, ...]]]:
    """Headers and rows of the quasi-identifier table, in either format."""
    headers = [
        "Quasi-identifier",
        "Group",
        "Retained",
        "Distinct values",
        "Patients with a value",
        f"Values (patients; {MAX_LISTED_VALUES} most frequent)",
    ]
    rows: list[tuple[object, ...]] = [
        (
            s.qi.name,
            s.qi.group.value,
            "yes" if s.retained else "no",
            s.distinct,
            s.patients_with_value,
            _values_text(s.values, s.more_values) or "-",
        )
        for s in r.summaries
    ]
    return headers, rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(report: ExpertReport) -> str:
    """The report as Markdown."""
    p = report.profile
    lines = [
        f"# De-identification report: profile {_md(p.name)}",
        "",
        f"Generated {report.generated} by deidfs {report.version}.",
        "",
        "## 1. Profile",
        "",
        *_md_table(["Setting", "Value"], _profile_facts(p)),
        "",
    ]
    if p.rules:
        lines += [
            "Custom rules:",
            "",
            *_md_table(["Tag", "Act", "Note"], [(r.id, r.act, r.note) for r in p.rules]),
            "",
        ]
    lines += [
        "## 2. Attribute decisions",
        "",
        f"{len(report.attributes)} attributes: every row of PS3.15 Table E.1-1, then custom "
        "rules and disabled attributes the table does not list. Attributes in neither are "
        "kept, except person names (emptied), instance UIDs (replaced), private attributes "
        "(removed) and group lengths (removed).",
        "",
        *_md_table(
            ["Tag", "Keyword", "Name", "Action", "Operation", "Source", "Rationale"],
            [
                (a.tag, a.keyword, a.name, a.action, a.op, a.source, a.rationale)
                for a in report.attributes
            ],
        ),
        "",
    ]
    f = report.folder
    if f is None:
        lines += [
            "## 3. Residual risk",
            "",
            "No folder was given (`--folder`): no residual risk was measured.",
            "",
            "## 4. Files withheld",
            "",
            "No folder was given.",
            "",
        ]
        return "\n".join(lines)
    r = f.risk
    lines += [f"## 3. Residual risk: folder {_md(f.folder)}", ""]
    if f.configured_profile != f.evaluated_profile:
        lines += [
            f"Note: the folder is configured with profile {_md(f.configured_profile)}; this "
            f"section measures what it would serve under {_md(f.evaluated_profile)}.",
            "",
        ]
    lines += [*_md_table(["Measure", "Value"], _risk_facts(f)), "", "### Quasi-identifiers", ""]
    lines += _md_table(*_quasi_identifier_table(r))
    lines += ["", "### Equivalence class sizes", ""]
    lines += _md_table(
        ["Class size", "Classes", "Patients"],
        [(c.size, c.classes, c.patients) for c in r.class_sizes],
    )
    lines += ["", "### What makes unique patients unique", ""]
    if not r.unique:
        lines += ["No patient is unique.", ""]
    else:
        lines += _md_table(
            [
                "Quasi-identifier",
                "Singles out",
                "In a smallest removal set",
                "In every removal set",
            ],
            [(x.qi, x.singles_out, x.in_smallest_set, x.in_every_set) for x in r.responsibility],
        )
        lines += [""]
        shown = r.unique_patients[:MAX_LISTED_UNIQUE]
        lines += _md_table(
            ["Patient (served ID)", "Singled out by", "Minimal removal sets"],
            [
                (
                    u.patient,
                    ", ".join(u.singled_out_by) or "-",
                    _sets_text(u.removal_sets, u.removal_set_count, u.analyzed),
                )
                for u in shown
            ],
        )
        if len(r.unique_patients) > len(shown):
            lines += [
                "",
                f"{len(r.unique_patients) - len(shown)} more unique patients: see the JSON report.",
            ]
        lines += [""]
    lines += ["### Method", ""]
    lines += [f"- **{title}.** {text}" for title, text in METHOD]
    lines += ["", "## 4. Files withheld", ""]
    if not f.withheld:
        lines += ["None: every file found would be served.", ""]
    else:
        lines += _md_table(
            ["Reason", "Files", "Meaning"],
            [(reason, n, REASON_MEANINGS.get(reason, "")) for reason, n in f.withheld],
        )
        lines += ["", "Files are counted, never named.", ""]
    return "\n".join(lines)


def _sets_text(sets: Sequence[Sequence[str]], total: int, analyzed: bool) -> str:
    if not analyzed:
        return "not analyzed (too many unique patients)"
    if not sets:
        return "none: no other patient"
    text = "; ".join("{" + ", ".join(s) + "}" for s in sets)
    if total > len(sets):
        text += f"; and {total - len(sets)} more"
    return text


# -- HTML -------------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;
background:#fff;margin:0 auto;max-width:1120px;padding:24px 32px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 8px;
border-bottom:2px solid #d7dde3;padding-bottom:4px}h3{font-size:16px;margin:20px 0 6px}
p.meta{color:#5b6670;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 14px;width:100%}
th,td{border:1px solid #d7dde3;padding:3px 7px;text-align:left;vertical-align:top}
td{overflow-wrap:anywhere}table.narrow{width:auto;min-width:40%}table.attrs{font-size:13px}
nav ol{margin:4px 0 0;padding-left:22px}
th{background:#eef2f5}tr:nth-child(even) td{background:#f8fafb}
table.facts th{width:32%}td.num{text-align:right;font-variant-numeric:tabular-nums}
.k{display:inline-block;font-size:22px;font-weight:700;padding:6px 14px;border-radius:6px;
color:#fff;background:#2e7d32}.k.bad{background:#c62828}.k.warn{background:#ef6c00}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px}
details{margin:6px 0}code{font-size:13px}dl.method dt{font-weight:600}
dl.method dd{margin:0 0 8px 16px}
@media print{details{display:block}body{max-width:none}}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    numeric: Sequence[int] = (),
    cls: str = "",
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


def _chart_bins(sizes: Sequence[ClassSize]) -> list[tuple[str, int, bool]]:
    """(label, patients, is unique) per bar; sizes are binned when there are many."""
    if len(sizes) <= 30:
        return [(str(c.size), c.patients, c.size == 1) for c in sizes]
    edges = [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 5),
        (6, 10),
        (11, 20),
        (21, 50),
        (51, 100),
        (101, 1000),
        (1001, 10**12),
    ]
    bins = []
    for lo, hi in edges:
        n = sum(c.patients for c in sizes if lo <= c.size <= hi)
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10**12 else f">{lo - 1}")
        bins.append((label, n, lo == 1))
    return bins


def class_size_chart(sizes: Sequence[ClassSize]) -> str:
    """An inline SVG bar chart: patients per equivalence class size."""
    bins = _chart_bins(sizes)
    width, height = 760, 300
    left, right, top, bottom = 56, 16, 16, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((n for _, n, _ in bins), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Patients per equivalence class size">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h - frac * plot_h
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
            'stroke="#d7dde3" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="12" text-anchor="end" '
            f'fill="#5b6670">{_e(round(frac * peak))}</text>'
        )
    slot = plot_w / max(len(bins), 1)
    bar_w = max(2.0, min(48.0, slot * 0.7))
    for i, (label, n, unique) in enumerate(bins):
        h = plot_h * n / peak
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h - h
        color = "#c62828" if unique else "#1e6fb8"
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{color}"><title>class size {_e(label)}: {n} patients</title></rect>'
        )
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" font-size="12" '
            f'text-anchor="middle" fill="#1d2329">{_e(label)}</text>'
        )
        if n:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" font-size="11" '
                f'text-anchor="middle" fill="#1d2329">{n}</text>'
            )
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        'stroke="#1d2329" stroke-width="1"/>'
    )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" font-size="13" '
        'text-anchor="middle" fill="#1d2329">equivalence class size (red: unique patients)'
        "</text>"
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="13" text-anchor="middle" '
        f'fill="#1d2329" transform="rotate(-90 14 {top + plot_h / 2:.1f})">patients</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: ExpertReport) -> str:
    """The report as one self-contained HTML page (no script, no external asset)."""
    p = report.profile
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>De-identification report: {_e(p.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>De-identification report: profile {_e(p.name)}</h1>",
        f'<p class="meta">Generated {_e(report.generated)} by deidfs {_e(report.version)}.</p>',
    ]
    f = report.folder
    if f is not None:
        out.append(_html_headline(f))
    out += [
        "<nav><ol>"
        '<li><a href="#profile">Profile</a></li>'
        '<li><a href="#decisions">Attribute decisions</a></li>'
        '<li><a href="#risk">Residual risk</a></li>'
        '<li><a href="#withheld">Files withheld</a></li>'
        "</ol></nav>",
        '<h2 id="profile">1. Profile</h2>',
        _facts(_profile_facts(p)),
    ]
    if p.rules:
        out += [
            "<h3>Custom rules</h3>",
            _html_table(["Tag", "Act", "Note"], [(r.id, r.act, r.note) for r in p.rules]),
        ]
    out += [
        '<h2 id="decisions">2. Attribute decisions</h2>',
        f"<p>{len(report.attributes)} attributes: every row of PS3.15 Table E.1-1, then "
        "custom rules and disabled attributes the table does not list. Attributes in neither "
        "are kept, except person names (emptied), instance UIDs (replaced), private "
        "attributes (removed) and group lengths (removed).</p>",
        f"<details open><summary>{len(report.attributes)} decisions</summary>",
        _html_table(
            ["Tag", "Keyword", "Name", "Action", "Operation", "Source", "Rationale"],
            [
                (a.tag, a.keyword, a.name, a.action, a.op, a.source, a.rationale)
                for a in report.attributes
            ],
            cls="attrs",
        ),
        "</details>",
    ]
    if f is None:
        out += [
            '<h2 id="risk">3. Residual risk</h2>',
            "<p>No folder was given (<code>--folder</code>): no residual risk was measured.</p>",
            '<h2 id="withheld">4. Files withheld</h2><p>No folder was given.</p>',
        ]
    else:
        out += _html_risk(f)
    out.append("</body></html>\n")
    return "\n".join(out)


def _html_headline(f: FolderAssessment) -> str:
    r = f.risk
    if r.k is None:
        return '<p class="note">No file of the folder would be served.</p>'
    cls = "k bad" if r.k < 2 else ("k warn" if r.k < 5 else "k")
    return (
        f'<p><span class="{cls}">k = {r.k}</span> &nbsp; {r.unique} of {r.patients} patients '
        f"unique ({_e(_pct(r.unique_share))}) in folder {_e(f.folder)}</p>"
    )


def _html_risk(f: FolderAssessment) -> list[str]:
    r = f.risk
    out = [f'<h2 id="risk">3. Residual risk: folder {_e(f.folder)}</h2>']
    if f.configured_profile != f.evaluated_profile:
        out.append(
            f'<p class="note">The folder is configured with profile '
            f"{_e(f.configured_profile)}; this section measures what it would serve under "
            f"{_e(f.evaluated_profile)}.</p>"
        )
    out.append(_facts(_risk_facts(f)))
    out += ["<h3>Equivalence class sizes</h3>", class_size_chart(r.class_sizes)]
    out.append(
        _html_table(
            ["Class size", "Classes", "Patients"],
            [(c.size, c.classes, c.patients) for c in r.class_sizes],
            numeric=(0, 1, 2),
            cls="narrow",
        )
    )
    out += [
        "<h3>Quasi-identifiers</h3>",
        _html_table(*_quasi_identifier_table(r), numeric=(3, 4)),
        "<h3>What makes unique patients unique</h3>",
    ]
    if not r.unique:
        out.append("<p>No patient is unique.</p>")
    else:
        out.append(
            _html_table(
                [
                    "Quasi-identifier",
                    "Singles out",
                    "In a smallest removal set",
                    "In every removal set",
                ],
                [
                    (x.qi, x.singles_out, x.in_smallest_set, x.in_every_set)
                    for x in r.responsibility
                ],
                numeric=(1, 2, 3),
            )
        )
        shown = r.unique_patients[:MAX_LISTED_UNIQUE]
        out.append(
            _html_table(
                ["Patient (served ID)", "Singled out by", "Minimal removal sets"],
                [
                    (
                        u.patient,
                        ", ".join(u.singled_out_by) or "-",
                        _sets_text(u.removal_sets, u.removal_set_count, u.analyzed),
                    )
                    for u in shown
                ],
            )
        )
        if len(r.unique_patients) > len(shown):
            out.append(
                f"<p>{len(r.unique_patients) - len(shown)} more unique patients: see the "
                "JSON report.</p>"
            )
    out.append('<h3>Method</h3><dl class="method">')
    out += [f"<dt>{_e(title)}</dt><dd>{_e(text)}</dd>" for title, text in METHOD]
    out += ["</dl>", '<h2 id="withheld">4. Files withheld</h2>']
    if not f.withheld:
        out.append("<p>None: every file found would be served.</p>")
    else:
        out.append(
            _html_table(
                ["Reason", "Files", "Meaning"],
                [(reason, n, REASON_MEANINGS.get(reason, "")) for reason, n in f.withheld],
                numeric=(1,),
            )
        )
        out.append("<p>Files are counted, never named.</p>")
    return out


def render_report(report: ExpertReport, fmt: ReportFormat) -> str:
    """The report in ``fmt``."""
    if fmt is ReportFormat.HTML:
        return render_html(report)
    if fmt is ReportFormat.JSON:
        return render_json(report)
    return render_markdown(report)
