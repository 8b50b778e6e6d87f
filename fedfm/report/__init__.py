"""``fedfm report RUN_DIR [RUN_DIR ...]``: one report of how the model does at every hospital.

Writes ``report.json`` (every number shown), ``report.md`` (the tables) and ``report.html`` (one
self-contained page, figures embedded, readable offline). With several run folders it adds the
utility-privacy trade-off across them.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.report.collect import ReportError, collect
from fedfm.results import write_json

__all__ = ["ReportError", "build_report", "missing_report", "write_report"]

REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}


def build_report(run_dirs: list[str | Path]) -> dict:
    if not run_dirs:
        raise ReportError("fedfm report needs at least one run folder")
    from fedfm.report.render import timestamp

    report = collect([Path(d).expanduser().resolve() for d in run_dirs])
    report["generated"] = timestamp()
    return report


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; returns their paths."""
    from fedfm.report.render import to_html, to_markdown  # matplotlib: only when a report is written

    report = build_report(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    write_json(paths["json"], report)
    report = json.loads(paths["json"].read_text())  # render exactly what report.json holds (NaN -> null)
    paths["md"].write_text(to_markdown(report))
    paths["html"].write_text(to_html(report))
    if len(run_dirs) == 1 and Path(out_dir).resolve() == Path(run_dirs[0]).resolve():
        from fedfm.report.model_card import write_model_card

        paths["card"] = write_model_card(run_dirs[0], out)  # the report's page links it
    return paths


def missing_report(run_dir: str | Path) -> list[str]:
    """What ``write_report([run_dir], run_dir)`` writes that ``run_dir`` lacks: the report's files and the model card's."""
    from fedfm.report.model_card import CARD_FILE, CARD_JSON

    return [name for name in (*REPORT_FILES.values(), CARD_FILE, CARD_JSON) if not (Path(run_dir) / name).is_file()]
