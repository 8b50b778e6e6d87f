"""``fedfm tune``: hyperparameters chosen on validation only, the chosen ones tested once.

Layout of a search folder (it is also the final run's folder)::

    RUN/trials/trial-NNN/   one candidate: a complete run with eval.test=false (no site reads test)
    RUN/ledger/             every trial's and the final run's privacy entries, one ledger per site
    RUN/tuning.json         the trial table: each candidate's values, validation metrics, wall time
    RUN/results.json ...    the chosen candidate run once more, now with the test split (same seeds)

Every run of the search trains on the same private data, so the sites keep one ledger for all of
them: a site's budget covers the whole search (it refuses a round that would exceed it), and each
run's noise is calibrated for ``privacy.runs_in_budget`` = trials + 1 runs of its shape. The
selector sees validation metrics only (:class:`Trial` holds nothing else).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError, ExperimentConfig, apply_overrides, parse_override, validate_config
from fedfm.audit.search import TUNING_FILE, read_tuning, trial_dir



@dataclass(frozen=True)
class Candidate:
    number: int
    values: dict[str, Any]  # config key -> value

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.values.items()]  # JSON is YAML: typed as --set reads it


@dataclass(frozen=True)
class Trial:
    """What the selector sees of one finished candidate: validation metrics, never test."""

    number: int
    values: dict[str, Any]
    val_auroc: float | None
    val_auroc_kind: str  # pooled (sites shared predictions) | site-weighted
    val_metrics: dict[str, Any]
    wall_s: float
    status: str


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``--grid train.lr=0.01,0.03`` items -> {key: [values]}, each value YAML-typed like --set."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid '{item}' is not of the form section.key=v1,v2 (e.g. --grid train.lr=0.01,0.03)")
        key, raw = item.split("=", 1)
        if key in grid:
            raise ConfigError(f"--grid names {key} twice: give all its values in one item, e.g. {key}=v1,v2")
        values = [parse_override(f"{key}={v.strip()}")[1] for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {key}: no values (e.g. --grid {key}=v1,v2)")
        grid[key] = values
    if not grid:
        raise ConfigError("fedfm tune needs at least one --grid section.key=v1,v2")
    return grid


def parse_method_grids(items: list[str], grid: dict[str, list[Any]], methods: list[str]) -> dict[str, dict[str, list[Any]]]:
    """``--method-grid centralized_nodp:train.lr=0.001,0.003`` items -> {method: its grid}.

    A method's grid is the shared grid with the named keys' values replaced (or keys added). Every
    method keeps a search of the same size as the shared one, so no method is searched harder than
    another; values differ where a method needs them to (non-private SGD diverges at learning rates
    that clipping makes safe for DP-SGD)."""
    per_method: dict[str, list[str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or "=" not in rest:
            raise ConfigError(f"--method-grid '{item}' is not of the form METHOD:section.key=v1,v2 "
                              "(e.g. --method-grid centralized_nodp:train.lr=0.001,0.003)")
        if method not in METHODS:
            raise ConfigError(f"--method-grid '{item}': method '{method}' is not one of {', '.join(METHODS)}")
        if method not in methods:
            raise ConfigError(f"--method-grid '{item}': the study has no {method} (methods: {', '.join(methods)}); "
                              f"add it with --set 'eval.baselines=[..., {method}]' or drop this --method-grid")
        per_method.setdefault(method, []).append(rest)
    size = len(candidates(grid))
    out: dict[str, dict[str, list[Any]]] = {}
    for method, rests in per_method.items():
        own = {**grid, **parse_grid(rests)}
        if len(candidates(own)) != size:
            raise ConfigError(f"--method-grid {method}: {len(candidates(own))} candidates, the shared --grid has {size}: "
                              "every method gets a search of the same size (give each key as many values as in --grid)")
        out[method] = own
    return out


def candidates(grid: dict[str, list[Any]]) -> list[Candidate]:
    keys = list(grid)
    return [Candidate(i, dict(zip(keys, combo))) for i, combo in enumerate(itertools.product(*(grid[k] for k in keys)))]


def random_candidates(grid: dict[str, list[Any]], mean_trials: float, seed: int) -> list[Candidate]:
    """A random search for the bound of Papernot & Steinke: K ~ geometric with E[K] = mean_trials
    (their truncated negative binomial with eta = 1), each trial a candidate of the grid drawn
    uniformly and independently, with its own train.seed so that trials are independent runs."""
    import numpy as np

    if not (math.isfinite(mean_trials) and mean_trials > 1):
        raise ConfigError(f"--random-trials {mean_trials}: the mean number of trials must be a finite number > 1, "
                          "e.g. --random-trials 4")
    rng = np.random.default_rng(seed)
    grid_points = candidates(grid)
    k = int(rng.geometric(1.0 / mean_trials))
    picks = rng.integers(0, len(grid_points), k)
    return [Candidate(i, {**grid_points[int(j)].values, "train.seed": int(seed) * 1000 + i}) for i, j in enumerate(picks)]


def trial_config(config: ExperimentConfig, candidate: Candidate, runs: int) -> ExperimentConfig:
    """A candidate's run: its values, validation only, no study parts, noise for ``runs`` runs."""
    raw = apply_overrides(config.model_dump(mode="json"), candidate.overrides)
    raw["eval"].update({"test": False, "report": False, "baselines": [], "leave_one_site_out": False, "seeds": []})
    raw["output"]["dir"] = None
    raw["privacy"]["runs_in_budget"] = runs
    return validate_config(raw)


def final_config(config: ExperimentConfig, candidate: Candidate, runs: int) -> ExperimentConfig:
    """The chosen candidate, run once more with the test split and the study the config asks for."""
    raw = apply_overrides(config.model_dump(mode="json"), candidate.overrides)
    raw["eval"]["test"] = True
    raw["output"]["dir"] = None
    raw["privacy"]["runs_in_budget"] = runs
    return validate_config(raw)


def check_candidates(config: ExperimentConfig, found: list[Candidate], source: str = "--grid") -> None:
    """Every candidate must be a valid config: checked before anything runs. ``source`` names where
    the candidates came from in the message (``--grid``, or ``--method-grid METHOD``)."""
    for candidate in found:
        try:
            trial_config(config, candidate, len(found) + 1)
        except ConfigError as err:
            raise ConfigError(f"{source} candidate {candidate.values}: {err}") from None


def read_trial(run_dir: Path, candidate: Candidate) -> Trial:
    """The candidate's validation results (results.json 'validation' and its rounds); test is never read."""
    results = json.loads((run_dir / "results.json").read_text())
    validation = results.get("validation") or {}
    return Trial(
        number=candidate.number,
        values=candidate.values,
        val_auroc=validation.get("auroc"),
        val_auroc_kind=validation.get("auroc_kind", "site-weighted"),
        val_metrics=validation.get("pooled") or {},
        wall_s=float(results.get("wall_time_s", 0.0)),
        status=results.get("status", "unknown"),
    )


def scored(trials: list[Trial]) -> list[Trial]:
    """The trials that finished with a validation AUROC (a diverged one has none)."""
    return [t for t in trials if t.val_auroc is not None and t.status == "complete"]


def select(trials: list[Trial]) -> Trial:
    """The trial with the highest validation AUROC (the first of ties); trials without one lose."""
    finished = scored(trials)
    if not finished:
        raise RuntimeError("no trial finished with a validation AUROC: nothing to choose from")
    return max(finished, key=lambda t: (t.val_auroc, -t.number))


def _complete(run_dir: Path) -> bool:
    path = run_dir / "results.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


METHODS = ("federated", "federated_nodp", "local", "centralized", "centralized_nodp")


def method_trial_dir(out: Path, method: str, number: int) -> Path:
    return trial_dir(out, number) if method == "federated" else out / "trials" / method / f"trial-{number:03d}"


def run_trial(config: ExperimentConfig, method: str, folder: Path, ledger: Path, verbose: bool, resume: bool) -> Path:
    """One candidate of one method, validation only; returns the folder holding its results.json.

    The federated trials share the sites' ledgers (``ledger``); a baseline's trials keep their own,
    each calibrated for the search's runs_in_budget."""
    from fedfm.simulate import run_simulation
    from fedfm.study import baseline_config, run_in_process_baselines

    if method in ("federated", "federated_nodp"):
        if _complete(folder):
            return folder
        again = resume and (folder / "checkpoint" / "state.json").is_file()
        if folder.exists() and not again:
            shutil.rmtree(folder)  # started, never checkpointed: its spent rounds stay in the ledger
        part = config if method == "federated" else baseline_config(config, "federated_nodp")
        run_simulation(part, str(folder), verbose=verbose, resume=again, ledger_dir=ledger if method == "federated" else None)
        return folder
    if resume and _complete(folder / method):
        return folder / method
    run_in_process_baselines(config, [method], folder)
    return folder / method


def with_baseline_values(config: ExperimentConfig, method: str, values: list[str]) -> ExperimentConfig:
    """``config`` with ``values`` applied to ``method``'s baseline after the config's own
    eval.baseline_overrides (a searched value wins over a fixed override of the same key)."""
    if method == "federated" or not values:
        return config
    raw = config.model_dump(mode="json")
    raw["eval"]["baseline_overrides"][method] = [*config.eval.baseline_overrides.get(method, []), *values]
    return validate_config(raw)


def method_candidates(grid: dict[str, list[Any]], random_trials: float | None, seed: int) -> list[Candidate]:
    return candidates(grid) if random_trials is None else random_candidates(grid, random_trials, seed)


def run_tuning(config: ExperimentConfig, grid: dict[str, list[Any]], out: str | Path, verbose: bool = False,
               resume: bool = False, random_trials: float | None = None, seed: int = 0,
               method_grids: dict[str, dict[str, list[Any]]] | None = None) -> Path:
    """Run every candidate on validation (or, with ``random_trials``, a random number of random
    candidates) for the federated model and for every baseline of the study (each method its own
    selection over the same candidates, or over its own grid of the same size from
    ``method_grids``), choose per method, then run the study once with the test split: the
    federated model with its values, each baseline with its own. Returns RUN."""
    from fedfm.study import run_study

    out = Path(out).expanduser().resolve()
    methods = ["federated", *config.eval.baselines]
    grids = {m: (method_grids or {}).get(m, grid) for m in methods}
    # the same seed draws the same K and the same grid indices for every method (grids of one size)
    found = {m: method_candidates(grids[m], random_trials, seed) for m in methods}
    trials_count = len(found["federated"])
    if random_trials is not None:
        print(f"[fedfm] tune: random search, K ~ geometric with mean {random_trials} (seed {seed}): drew K = "
              f"{trials_count} trials", flush=True)
    runs = trials_count + 1  # every candidate, then the chosen one again with the test split
    for m in methods:
        check_candidates(config, found[m], f"--method-grid {m}" if m in (method_grids or {}) else "--grid")
    if (out / TUNING_FILE).exists() and not resume:
        raise ConfigError(f"--out {out} already holds a search: pass a new --out, or --resume to continue it")
    if resume and not ((out / TUNING_FILE).is_file() or (out / "trials").is_dir()):
        raise ConfigError(f"--resume: {out} holds no search to continue (no {TUNING_FILE}, no trials/): pass the "
                          "--out of the search, or drop --resume to start a new one")
    if resume:
        check_same_search(out, grids)
    out.mkdir(parents=True, exist_ok=True)
    state = SearchState(grid, runs, random_trials, seed, {m: [] for m in methods}, {},
                        {m: g for m, g in grids.items() if g != grid})
    for method in methods:
        for candidate in found[method]:
            print(f"[fedfm] tune: {method} trial {candidate.number + 1}/{trials_count} {candidate.values} "
                  "(validation only)", flush=True)
            started = time.time()
            part = trial_config(with_baseline_values(config, method, candidate.overrides), candidate, runs)
            folder = run_trial(part, method,
                               method_trial_dir(out, method, candidate.number), out / "ledger", verbose, resume)
            trial = read_trial(folder, candidate)
            state.trials[method].append(trial)
            write_tuning(out, state)
            print(f"[fedfm] tune: {method} trial {candidate.number + 1} validation AUROC {trial.val_auroc} "
                  f"({trial.val_auroc_kind}), {time.time() - started:.0f} s", flush=True)
        if method != "federated" and not scored(state.trials[method]):
            print(f"[fedfm] tune: {method}: no candidate finished with a validation AUROC (every one diverged): "
                  "left out of the test study, shown as diverged in the report", flush=True)
            write_tuning(out, state)
            continue
        state.chosen[method] = select(state.trials[method])
        write_tuning(out, state)
        chosen = state.chosen[method]
        print(f"[fedfm] tune: {method} chose trial {chosen.number + 1} {chosen.values} "
              f"(validation AUROC {chosen.val_auroc:.4f})", flush=True)
    final = final_config(config, found["federated"][state.chosen["federated"].number], runs)
    final.eval.baselines = [m for m in final.eval.baselines if m in state.chosen]
    final.eval.baseline_overrides = {m: [*config.eval.baseline_overrides.get(m, []), *found[m][state.chosen[m].number].overrides]
                                     for m in final.eval.baselines}
    if not _complete(out):  # else run_study keeps it, and writes what a kill kept its end from writing
        print("[fedfm] tune: the chosen values, once, with the test split", flush=True)
    return run_study(final, str(out), verbose, resume=resume and (out / "checkpoint" / "state.json").is_file())


def check_same_search(out: Path, grids: dict[str, dict[str, list[Any]]]) -> None:
    """--resume keeps finished trials by number: a method whose trials ran over other values would
    be read as if they were this search's. Such a method fails in one line (its trials must go)."""
    before = read_tuning(out) or {}
    for method, grid in grids.items():
        record = (before.get("methods") or {}).get(method)
        folder = out / "trials" / method if method != "federated" else out / "trials"
        if record is None or not folder.is_dir():
            continue
        old = record.get("grid", before.get("grid"))
        if old != json.loads(json.dumps(grid)):
            raise ConfigError(f"--resume: {method}'s trials in {out} searched {old}, this search asks {grid}: pass the "
                              f"same --grid / --method-grid, or remove {folder} to search {method} again")


@dataclass
class SearchState:
    grid: dict[str, list[Any]]
    runs: int
    random_trials: float | None
    seed: int
    trials: dict[str, list[Trial]]  # per method
    chosen: dict[str, Trial]
    method_grids: dict[str, dict[str, list[Any]]]  # methods searched over their own grid (same size)


def write_tuning(out: Path, state: SearchState) -> Path:
    path = out / TUNING_FILE
    fed = state.chosen.get("federated")
    payload = {
        "selection": "highest validation AUROC of the final adapter (pooled when sites share predictions); "
                     "test evaluated once, for the chosen candidate",
        "grid": state.grid,
        "search": "grid" if state.random_trials is None else "random",
        "random_trials_mean": state.random_trials,
        "seed": state.seed,
        "candidates": len(list(itertools.product(*state.grid.values()))),
        "runs_in_budget": state.runs,
        "trials": [asdict(t) for t in state.trials.get("federated", [])],
        "chosen": None if fed is None else fed.number,
        "chosen_values": None if fed is None else fed.values,
        "methods": {m: {"grid": state.method_grids.get(m, state.grid),
                        "trials": [asdict(t) for t in ts],
                        "chosen": state.chosen[m].number if m in state.chosen else None,
                        "chosen_values": state.chosen[m].values if m in state.chosen else None,
                        # every candidate finished without a validation AUROC: not run on test
                        "diverged": bool(ts) and not scored(ts)}
                    for m, ts in state.trials.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    return path
