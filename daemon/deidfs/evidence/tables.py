"""The report's tables, built once for every format: settings, decisions, risk measures.

Markdown and HTML show the same facts in the same tables. Each table is made here once, as a
:class:`Table` (its headers, its rows, which columns hold numbers), from an
:class:`~deidfs.evidence.report.ExpertReport`'s parts; each format only writes tables out
(:func:`deidfs.evidence.render._md_table`, :func:`deidfs.evidence.html_page._html_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deidfs.deid.risk import (
    MAX_LISTED_VALUES,
    Assessment,
)
from deidfs.evidence.report import (
    MAX_LISTED_UNIQUE,
    REASON_MEANINGS,
    AttributeDecision,
    FolderAssessment,
    ProfileSummary,
)


@dataclass(frozen=True, slots=True)
class Table:
    """One table of the report, whatever the format: column headers and rows of cells."""

    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    numeric: Sequence[int] = ()  #: indexes of the columns that hold numbers


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


def _sets_text(sets: Sequence[Sequence[str]], total: int, analyzed: bool) -> str:
    if not analyzed:
        return "not analyzed (too many unique patients)"
    if not sets:
        return "none: no other patient"
    text = "; ".join("{" + ", ".join(s) + "}" for s in sets)
    if total > len(sets):
        text += f"; and {total - len(sets)} more"
    return text


# -- the tables -------------------------------------------------------------------------------
def profile_table(p: ProfileSummary) -> Table:
    """Section 1: the profile's settings (HTML shows them as a facts table, no header)."""
    return Table(["Setting", "Value"], _profile_facts(p))


def rules_table(p: ProfileSummary) -> Table:
    """Section 1: the profile's custom rules."""
    return Table(["Tag", "Act", "Note"], [(r.id, r.act, r.note) for r in p.rules])


def attributes_table(attributes: Sequence[AttributeDecision]) -> Table:
    """Section 2: every attribute's decision."""
    return Table(
        ["Tag", "Keyword", "Name", "Action", "Operation", "Source", "Rationale"],
        [(a.tag, a.keyword, a.name, a.action, a.op, a.source, a.rationale) for a in attributes],
    )


def risk_table(f: FolderAssessment) -> Table:
    """Section 3: the folder's risk measures (HTML shows them as a facts table, no header)."""
    return Table(["Measure", "Value"], _risk_facts(f))


def quasi_identifier_table(r: Assessment) -> Table:
    """Section 3: what each quasi-identifier is served as."""
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
    return Table(headers, rows, numeric=(3, 4))


def class_size_table(r: Assessment) -> Table:
    """Section 3: patients per equivalence class size."""
    return Table(
        ["Class size", "Classes", "Patients"],
        [(c.size, c.classes, c.patients) for c in r.class_sizes],
        numeric=(0, 1, 2),
    )


def responsibility_table(r: Assessment) -> Table:
    """Section 3: the quasi-identifiers that make unique patients unique."""
    return Table(
        [
            "Quasi-identifier",
            "Singles out",
            "In a smallest removal set",
            "In every removal set",
        ],
        [(x.qi, x.singles_out, x.in_smallest_set, x.in_every_set) for x in r.responsibility],
        numeric=(1, 2, 3),
    )


def unique_patients_table(r: Assessment) -> Table:
    """Section 3: the first :data:`~deidfs.evidence.report.MAX_LISTED_UNIQUE` unique patients
    (by served ID) and what singles each out; the rest are counted by the formats."""
    return Table(
        ["Patient (served ID)", "Singled out by", "Minimal removal sets"],
        [
            (
                u.patient,
                ", ".join(u.singled_out_by) or "-",
                _sets_text(u.removal_sets, u.removal_set_count, u.analyzed),
            )
            for u in r.unique_patients[:MAX_LISTED_UNIQUE]
        ],
    )


def withheld_table(f: FolderAssessment) -> Table:
    """Section 4: the files withheld, counted by reason."""
    return Table(
        ["Reason", "Files", "Meaning"],
        [(reason, n, REASON_MEANINGS.get(reason, "")) for reason, n in f.withheld],
        numeric=(1,),
    )
