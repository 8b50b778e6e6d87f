"""What a run's privacy statement covers beyond each site's ledger: a search's trials and the
statistics released without DP noise. The audit prints these notes under the per-site statements."""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.audit.search import DP_BASELINES, baseline_search_privacy, read_tuning, tuning_privacy


def scope_notes(run_dir: str | Path) -> list[str]:
    """Plain sentences for ``audit.md`` about the run folder ``run_dir`` (empty for a bare ledger folder)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    tuning = read_tuning(run_dir)
    if tuning is not None:
        trials = len(tuning.get("trials", []))
        notes.append(
            f"This folder is a hyperparameter search ({tuning.get('search', 'grid')}, {trials} trials, then the chosen "
            "candidate once more with the test split). Every trial trained on the same private images, so each site's "
            "ledger holds every trial's rounds and the epsilons above are those of the whole search (composition, "
            f"valid whatever was chosen; noise calibrated for {tuning.get('runs_in_budget')} runs)."
        )
        for site, spent in tuning_privacy(run_dir).items():
            if spent.get("ps_epsilon") is not None:
                notes.append(
                    f"{site}: for whoever receives only the chosen model (not the coordinator, which saw every trial's "
                    f"updates), the random-search bound of Papernot & Steinke (ICLR 2022; geometric number of trials, "
                    f"mean {tuning.get('random_trials_mean')}) gives epsilon {spent['ps_epsilon']:.3f} at delta "
                    f"{spent['delta']:g}, against {spent['epsilon_total']:.3f} by composition."
                )
        for method in DP_BASELINES:
            spent = baseline_search_privacy(run_dir, method)
            if spent:
                per_site = ", ".join(f"{site} {p['epsilon_total']:.3f} over {p['runs']} runs" for site, p in spent.items())
                notes.append(
                    f"The {method} baseline searched its own values on the same private images, each trial in a "
                    f"ledger of its own under trials/{method}/; every run of its search composed: {per_site}."
                )
    results = run_dir / "results.json"
    if results.is_file() and json.loads(results.read_text()).get("calibration"):
        notes.append(
            "The temperature and decision threshold were fitted on statistics of the sites' validation splits (NLL per "
            "temperature, confusion counts per threshold) sent without DP noise: the validation images are not covered "
            "by the statements above, as no evaluation metric is."
        )
    return notes
