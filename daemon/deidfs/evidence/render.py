"""The report written out: JSON, Markdown, and the choice of format.

:func:`to_json_object` / :func:`render_json` give the machine-readable form,
:func:`render_markdown` the text one, both from an :class:`~deidfs.evidence.report.ExpertReport`;
:func:`render_report` picks the writer for a :class:`~deidfs.evidence.report.ReportFormat`
(HTML is :mod:`deidfs.evidence.html_page`).
"""

from __future__ import annotations

import json
from typing import Any

from deidfs.deid.tags import format_tag
from deidfs.evidence.html_page import (
    render_html,
)
from deidfs.evidence.report import (
    METHOD,
    REASON_MEANINGS,
    ExpertReport,
    ReportFormat,
)
from deidfs.evidence.tables import (
    Table,
    attributes_table,
    class_size_table,
    profile_table,
    quasi_identifier_table,
    responsibility_table,
    risk_table,
    rules_table,
    unique_patients_table,
    withheld_table,
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


# -- Markdown ---------------------------------------------------------------------------------
def _md(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    header = table.headers
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in table.rows]
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
        *_md_table(profile_table(p)),
        "",
    ]
    if p.rules:
        lines += [
            "Custom rules:",
            "",
            *_md_table(rules_table(p)),
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
        *_md_table(attributes_table(report.attributes)),
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
    lines += [*_md_table(risk_table(f)), "", "### Quasi-identifiers", ""]
    lines += _md_table(quasi_identifier_table(r))
    lines += ["", "### Equivalence class sizes", ""]
    lines += _md_table(class_size_table(r))
    lines += ["", "### What makes unique patients unique", ""]
    if not r.unique:
        lines += ["No patient is unique.", ""]
    else:
        lines += _md_table(responsibility_table(r))
        lines += [""]
        shown = unique_patients_table(r)
        lines += _md_table(shown)
        if len(r.unique_patients) > len(shown.rows):
            lines += [
                "",
                f"{len(r.unique_patients) - len(shown.rows)} more unique patients: see the JSON "
                "report.",
            ]
        lines += [""]
    lines += ["### Method", ""]
    lines += [f"- **{title}.** {text}" for title, text in METHOD]
    lines += ["", "## 4. Files withheld", ""]
    if not f.withheld:
        lines += ["None: every file found would be served.", ""]
    else:
        lines += _md_table(withheld_table(f))
        lines += ["", "Files are counted, never named.", ""]
    return "\n".join(lines)


def render_report(report: ExpertReport, fmt: ReportFormat) -> str:
    """The report in ``fmt``."""
    if fmt is ReportFormat.HTML:
        return render_html(report)
    if fmt is ReportFormat.JSON:
        return render_json(report)
    return render_markdown(report)
