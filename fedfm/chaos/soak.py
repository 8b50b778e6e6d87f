"""Many soak runs in a row, and the table of what they found."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedfm.chaos.plan import KINDS, plan_fault
from fedfm.chaos.runner import RunOutcome, SoakRun, soak_config


def soak(out: Path, seed: int, runs: int, rounds: int = 2, sites: int = 2, round_timeout_s: float = 90.0,
         reference: bool = True, log=print) -> dict:
    """Runs ``seed`` .. ``seed + runs - 1`` (after one unbroken run to compare with); writes
    ``out/soak.json`` after every run and returns its content."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = soak_config(rounds, sites, round_timeout_s)
    started = time.time()
    report = {"seed": seed, "runs": runs, "rounds": rounds, "sites": sites, "round_timeout_s": round_timeout_s,
              "command": f"fedfm chaos --seed {seed} --runs {runs} --rounds {rounds} --sites {sites}",
              "reference": None, "outcomes": []}
    ref_dir = None
    if reference:
        log("[chaos] the unbroken run, to compare the faulted runs with")
        base = SoakRun(config.model_copy(deep=True), None, out / "reference").execute()
        report["reference"] = base.__dict__
        if base.problems:
            log(f"[chaos] the unbroken run failed its checks: {base.problems}")
            report["summary"] = summarize([], time.time() - started)
            _write(out, report)
            return report
        ref_dir = Path(base.run_dir)
        log(f"[chaos] unbroken run done in {base.seconds:.0f} s")
    outcomes: list[RunOutcome] = []
    for number, run_seed in enumerate(range(seed, seed + runs), start=1):
        fault = plan_fault(run_seed, rounds, sites, round_timeout_s)
        log(f"[chaos] run {number}/{runs}: {fault.describe()} (replay: fedfm chaos --seed {run_seed} --runs 1)")
        outcome = SoakRun(config.model_copy(deep=True), fault, out / f"run-{run_seed}", ref_dir).execute()
        outcomes.append(outcome)
        verdict = "recovered" if outcome.recovered else "LOST" if outcome.lost else "not fired"
        compared = ", equal to the unbroken run" if outcome.compared and outcome.recovered else ""
        log(f"[chaos]   {verdict} after {outcome.attempts} tries in {outcome.seconds:.0f} s{compared}")
        for problem in outcome.problems:
            log(f"[chaos]   problem: {problem}")
        report["outcomes"] = [o.__dict__ for o in outcomes]
        report["summary"] = summarize(outcomes, time.time() - started)
        _write(out, report)
    report["summary"] = summarize(outcomes, time.time() - started)
    _write(out, report)
    return report


def summarize(outcomes: list[RunOutcome], seconds: float) -> dict:
    by_kind = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.fault and o.fault["kind"] == kind]
        by_kind[kind] = {"runs": len(mine), "injected": sum(o.fired for o in mine),
                         "recovered": sum(o.recovered for o in mine), "lost": sum(o.lost for o in mine),
                         "equal_to_unbroken": sum(o.compared and o.recovered for o in mine)}
    return {"runs": len(outcomes), "injected": sum(o.fired for o in outcomes),
            "recovered": sum(o.recovered for o in outcomes), "lost": sum(o.lost for o in outcomes),
            "not_fired": sum(not o.fired for o in outcomes),
            "equal_to_unbroken": sum(o.compared and o.recovered for o in outcomes),
            "resumes": sum(max(0, o.attempts - 1) for o in outcomes),
            "lost_replies": sum(v["lost_replies"] for o in outcomes for v in o.facts.values()),
            "seconds": round(seconds), "by_kind": by_kind}


def table(report: dict) -> str:
    s = report["summary"]
    lines = ["| fault | runs | injected | recovered | lost | equal to the unbroken run |", "|---|---|---|---|---|---|"]
    for kind, k in s["by_kind"].items():
        if k["runs"]:
            lines.append(f"| {kind} | {k['runs']} | {k['injected']} | {k['recovered']} | {k['lost']} | {k['equal_to_unbroken']} |")
    lines.append(f"| **all** | **{s['runs']}** | **{s['injected']}** | **{s['recovered']}** | **{s['lost']}** | "
                 f"**{s['equal_to_unbroken']}** |")
    lines.append(f"\n{s['resumes']} resumes, {s['lost_replies']} rounds trained whose reply a fault lost (in the "
                 f"ledgers, never aggregated), {s['not_fired']} faults whose moment never came; {s['seconds']} s.")
    return "\n".join(lines)


def _write(out: Path, report: dict) -> None:
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
