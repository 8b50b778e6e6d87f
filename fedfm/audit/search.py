"""The privacy of a hyperparameter search (``fedfm tune``): every trial trained on the same
private data, so a site's guarantee composes every trial's ledger entries with the final run's;
for a random search with a geometric number of trials, Papernot & Steinke's sharper bound for
whoever sees only the chosen model. Also where a search folder keeps its trials and table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.audit.ledgers import find_ledgers
from fedfm.privacy.tuning import ORDERS, composed_epsilon, ps_epsilon_of_curve, trial_rdp
from fedfm.protocol import NOISE_MULTIPLIER, SAMPLE_RATE, STEPS

TUNING_FILE = "tuning.json"  # a search's trial table, beside the final run's results.json
DP_BASELINES = ("local", "centralized")  # the baselines that train with DP-SGD, each trial in a ledger of its own


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"trial-{number:03d}"


def read_tuning(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / TUNING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def tuning_privacy(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per site: runs of the search it trained in and the epsilon of all of them composed (the
    site's ledger holds every trial's entries and the final run's)."""
    run_dir = Path(run_dir)
    tuning = read_tuning(run_dir) or {}
    runs = len(tuning.get("trials", [])) + int((run_dir / "results.json").is_file())
    out: dict[str, dict[str, Any]] = {}
    for ledger in find_ledgers(run_dir):
        entries = ledger.entries()
        if not entries:
            continue
        delta, epsilon = composed_site_epsilon([entries])
        out[ledger.site] = {
            "runs": runs, "entries": len(entries),
            "epsilon_total": epsilon,
            "delta": delta,
            "ps_epsilon": random_search_epsilon(run_dir, tuning, ledger.site, delta),
        }
    return out


def _run_rdp(run_dir: Path, site: str, lams) -> Any:
    """RDP curve of one site's DP-SGD in one run, from the run's per-round train metrics."""
    curve = np.zeros(len(lams))
    path = run_dir / "results.json"
    if not path.is_file():
        return curve
    for entry in json.loads(path.read_text()).get("rounds", []):
        m = entry.get("train", {}).get(site)
        if m and m.get(NOISE_MULTIPLIER):
            curve += trial_rdp(float(m[NOISE_MULTIPLIER]), float(m[SAMPLE_RATE]), int(m[STEPS]), lams)
    return curve


def random_search_epsilon(run_dir: Path, tuning: dict[str, Any], site: str, delta: float) -> float | None:
    """Papernot & Steinke's bound for the chosen model of a random search (K geometric): the largest
    trial RDP curve over the trials (a trial's candidate is drawn at random), then the final run.
    It holds for whoever sees only the chosen model; the coordinator saw every trial's updates,
    for which composition (epsilon_total) is the guarantee. None for a grid search."""
    if tuning.get("search") != "random" or not tuning.get("trials"):
        return None
    lams = np.sort(np.asarray(ORDERS, dtype=float))
    curves = [_run_rdp(trial_dir(run_dir, t["number"]), site, lams) for t in tuning["trials"]]
    worst = np.max(curves, axis=0)
    if not worst.any():
        return None
    mean = float(tuning["random_trials_mean"])
    bound = ps_epsilon_of_curve(worst, lams, delta, "tnb", eta=1.0, gamma=1.0 / mean, then=_run_rdp(run_dir, site, lams))
    return bound.epsilon


def baseline_search_privacy(run_dir: str | Path, method: str) -> dict[str, dict[str, Any]]:
    """Per site: a DP baseline's search in a tuned study, every run composed.

    Each of the baseline's trials trained on the same private data as its final run, in a ledger
    of its own (``trials/METHOD/trial-NNN/METHOD/ledger``, ``baselines/METHOD/ledger``); what the
    search cost a site is all of them composed, as the federated model's one ledger does."""
    run_dir = Path(run_dir)
    folders = [*sorted((run_dir / "trials" / method).glob(f"trial-*/{method}/ledger")),
               run_dir / "baselines" / method / "ledger"]
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for ledger in find_ledgers(folder):
            entries = ledger.entries()
            if entries:
                histories.setdefault(ledger.site, []).append(entries)
    out: dict[str, dict[str, Any]] = {}
    for site, runs in histories.items():
        delta, epsilon = composed_site_epsilon(runs)
        out[site] = {"runs": len(runs), "delta": delta, "epsilon_total": epsilon}
    return out


def composed_site_epsilon(runs: list[list[dict[str, Any]]]) -> tuple[float, float]:
    """(delta, epsilon) of one site's ledger entries of every run composed, at the delta and with the
    accountant of its latest entry."""
    last = runs[-1][-1]
    delta = float(last["delta"])
    return delta, composed_epsilon(runs, delta, str(last.get("accountant", "prv")))
