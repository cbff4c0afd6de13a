"""The rows the report's formats share: settings, risk measures, quasi-identifiers.

Markdown and HTML show the same facts in the same tables; the rows are made here once, from
an :class:`~deidfs.evidence.report.ExpertReport`'s parts, and each format only writes them
out (:mod:`deidfs.evidence.render`, :mod:`deidfs.evidence.html_page`).
"""

from __future__ import annotations

from collections.abc import Sequence

from deidfs.deid.risk import (
    MAX_LISTED_VALUES,
    Assessment,
)
from deidfs.evidence.report import (
    FolderAssessment,
    ProfileSummary,
)


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


def _sets_text(sets: Sequence[Sequence[str]], total: int, analyzed: bool) -> str:
    if not analyzed:
        return "not analyzed (too many unique patients)"
    if not sets:
        return "none: no other patient"
    text = "; ".join("{" + ", ".join(s) + "}" for s in sets)
    if total > len(sets):
        text += f"; and {total - len(sets)} more"
    return text
