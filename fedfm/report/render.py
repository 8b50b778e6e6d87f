"""Write the report as one self-contained HTML page (figures embedded as data URIs) and as Markdown."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from typing import Any

from fedfm.report import figures
from fedfm.report.tables import (
    Table, baselines_table, calibration_table, per_class_table, key_findings, loso_table, personal_table, runs_table, screening_table, shift_table,
    seeds_table, site_table, tuning_table,
)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d2733;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:2px solid #dfe5ec;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin-top:1.4em}.muted{color:#5b6b7c;font-size:.9em}
.findings{background:#eef5fb;border-left:4px solid #2f7cc1;padding:.6em 1.2em;margin:1em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d5dde5;padding:.3em .6em;text-align:right}
th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafbfc}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.15em 1.2em;font-size:.92em}dl.summary dt{color:#5b6b7c}
img{max-width:100%;border:1px solid #e3e8ee;margin:.4em 0}.note{color:#5b6b7c;font-size:.85em;max-width:900px}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table_html(table: Table | None) -> str:
    if table is None:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _summary_html(summary: dict[str, Any]) -> str:
    items = "".join(
        f"<dt>{html.escape(k.replace('_', ' '))}</dt><dd>{html.escape(_plain(v))}</dd>" for k, v in summary.items() if v not in (None, [], "")
    )
    return f'<dl class="summary">{items}</dl>'


def _plain(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def run_html(run: dict[str, Any]) -> str:
    parts = [f"<h2>Run {html.escape(run['name'])}</h2>", f'<p class="muted">{html.escape(run["path"])}</p>']
    findings = "".join(f"<li>{html.escape(s)}</li>" for s in key_findings(run))
    parts.append(f'<div class="findings"><strong>Key findings</strong><ul>{findings}</ul></div>')
    parts.append("<h3>Setup</h3>" + _summary_html(run["summary"]))
    parts.append('<p class="note">Model card: MODEL_CARD.md in the run folder (also written beside every '
                 "model fedfm export writes).</p>")
    parts.append(_table_html(site_table(run)))
    parts.append(_table_html(personal_table(run)))
    parts.append(_table_html(per_class_table(run)))
    parts.append(_table_html(calibration_table(run)))
    parts.append(_table_html(screening_table(run)))
    parts.append(_table_html(tuning_table(run)))
    parts.append(_table_html(seeds_table(run)))
    if run["reliability"]:
        parts.append("<h3>Calibration</h3><p class=\"note\">Accuracy against the model's confidence in 15 bins; points on "
                     "the dashed diagonal are perfectly calibrated, below it over-confident. Marker size: images in the bin.</p>")
        parts.append(_img(figures.reliability(run["reliability"]), "reliability diagrams"))
    if run["loso"]:
        parts.append("<h3>Hospitals the model never saw</h3>")
        parts.append(_img(figures.loso_heatmap(run["loso"]), "leave-one-site-out AUROC matrix"))
        parts.append(_table_html(loso_table(run)))
    if run["baselines"]:
        parts.append("<h3>Baselines</h3>")
        parts.append(_img(figures.baselines_bars(run["baselines"]), "federated model against baselines"))
        parts.append(_table_html(baselines_table(run)))
    if run["rounds"]["round"]:
        parts.append("<h3>Training over rounds</h3>")
        parts.append(_img(figures.round_curves(run["rounds"]), "training loss and validation AUROC per round"))
        if run["rounds"]["budget"]:
            parts.append(_img(figures.epsilon_curves(run["rounds"]), "epsilon per site per round against its budget"))
    parts.append(_table_html(shift_table(run)))
    comm = run["communication"]
    if comm.get("update_bytes"):
        parts.append(f'<p class="note">What crossed the network: adapter updates of {comm["update_bytes"] / 1e6:.3f} MB '
                     f'({100 * (comm.get("update_to_full_ratio") or 0):.2f} % of the full model), '
                     f'{comm["total_bytes_moved"] / 1e6:.1f} MB in total, and the metrics listed above.</p>')
    return "\n".join(p for p in parts if p)


def to_html(report: dict[str, Any]) -> str:
    title = "fedfm report: " + ", ".join(r["name"] for r in report["runs"])
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">Generated {report["generated"]} by fedfm. Every number comes from the runs\' results.json.</p>']
    if len(report["runs"]) > 1:
        body.append("<h2>Utility and privacy across runs</h2>")
        body.append(_img(figures.tradeoff(report["tradeoff"]), "AUROC against epsilon across runs"))
        body.append(_table_html(runs_table(report)))
    body += [run_html(run) for run in report["runs"]]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _table_md(table: Table | None) -> str:
    if table is None:
        return ""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + (f"\n\n{table.note}" if table.note else "")


def to_markdown(report: dict[str, Any]) -> str:
    out = [f"# fedfm report: {', '.join(r['name'] for r in report['runs'])}", "",
           f"Generated {report['generated']}. Figures are in report.html.", ""]
    out += [_table_md(runs_table(report)), ""]
    for run in report["runs"]:
        out += [f"## Run {run['name']}", "", *[f"- {s}" for s in key_findings(run)], ""]
        out += [f"- **{k.replace('_', ' ')}**: {_plain(v)}" for k, v in run["summary"].items() if v not in (None, [], "")]
        for table in (site_table(run), personal_table(run), per_class_table(run), calibration_table(run), screening_table(run), tuning_table(run), seeds_table(run), loso_table(run),
                      baselines_table(run), shift_table(run)):
            out += ["", _table_md(table)]
    return "\n".join(x for x in out if x is not None) + "\n"


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
