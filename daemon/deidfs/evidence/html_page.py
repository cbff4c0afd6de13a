"""The report as one self-contained HTML page: inline CSS, an inline SVG chart, no script.

:func:`render_html` writes an :class:`~deidfs.evidence.report.ExpertReport` with the tables of
:mod:`deidfs.evidence.tables`; :func:`class_size_chart` draws the equivalence class sizes.
No external asset is referenced, so the page can be archived and opened anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from deidfs.deid.risk import (
    ClassSize,
)
from deidfs.evidence.report import (
    METHOD,
    ExpertReport,
    FolderAssessment,
)
from deidfs.evidence.tables import (
    Table,
    _pct,
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


def _html_table(table: Table, cls: str = "") -> str:
    numeric = table.numeric
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    body = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(table: Table) -> str:
    """A table of (what, value) rows, without its header."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in table.rows)
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
        _facts(profile_table(p)),
    ]
    if p.rules:
        out += [
            "<h3>Custom rules</h3>",
            _html_table(rules_table(p)),
        ]
    out += [
        '<h2 id="decisions">2. Attribute decisions</h2>',
        f"<p>{len(report.attributes)} attributes: every row of PS3.15 Table E.1-1, then "
        "custom rules and disabled attributes the table does not list. Attributes in neither "
        "are kept, except person names (emptied), instance UIDs (replaced), private "
        "attributes (removed) and group lengths (removed).</p>",
        f"<details open><summary>{len(report.attributes)} decisions</summary>",
        _html_table(attributes_table(report.attributes), cls="attrs"),
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
    out.append(_facts(risk_table(f)))
    out += ["<h3>Equivalence class sizes</h3>", class_size_chart(r.class_sizes)]
    out.append(_html_table(class_size_table(r), cls="narrow"))
    out += [
        "<h3>Quasi-identifiers</h3>",
        _html_table(quasi_identifier_table(r)),
        "<h3>What makes unique patients unique</h3>",
    ]
    if not r.unique:
        out.append("<p>No patient is unique.</p>")
    else:
        out.append(_html_table(responsibility_table(r)))
        shown = unique_patients_table(r)
        out.append(_html_table(shown))
        if len(r.unique_patients) > len(shown.rows):
            out.append(
                f"<p>{len(r.unique_patients) - len(shown.rows)} more unique patients: see the "
                "JSON report.</p>"
            )
    out.append('<h3>Method</h3><dl class="method">')
    out += [f"<dt>{_e(title)}</dt><dd>{_e(text)}</dd>" for title, text in METHOD]
    out += ["</dl>", '<h2 id="withheld">4. Files withheld</h2>']
    if not f.withheld:
        out.append("<p>None: every file found would be served.</p>")
    else:
        out.append(_html_table(withheld_table(f)))
        out.append("<p>Files are counted, never named.</p>")
    return out
