"""Baselines beside the federated run: the same data, the same model, the same privacy budget.

- ``local``: every training site trains alone for the same rounds with DP-SGD and its own
  budget (its own ledger), and is evaluated on its own test split.
- ``centralized`` / ``centralized_nodp``: the training sites' data pooled in one place, trained
  for the same rounds (with DP at the shared budget, or without), evaluated on every site's
  test split.

They run without Flower, through the same :class:`fedfm.site.Site` the ClientApp uses, so the
training code, the accountant and the ledger are the ones of the federated run. The federated
run without DP (``federated_nodp``) is a Flower run and lives in :mod:`fedfm.study`.
Every baseline writes a ``results.json`` shaped like a federated run's (``sites``, ``pooled``,
``worst_site``), which is what the report reads. With ``eval.calibrate`` every baseline model gets
a temperature and threshold fitted as the federated model's are, on the validation splits it
trained with (:func:`part_calibrations`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.config import ExperimentConfig
from fedfm.data import SiteData, Split, load_sites
from fedfm.eval.calibration import CALIBRATED, Calibration, calibrated_metrics, fit_calibration, site_statistics, sum_statistics
from fedfm.models import adapter_state_dict
from fedfm.privacy.ledger import spent_epsilon
from fedfm.results import TEST_METRICS, SiteEvaluation, pooled_summary, summarize_site_test, worst_site, write_json
from fedfm.protocol import EPSILON, TRAIN_LOSS, site_name, sorted_sites
from fedfm.site import BudgetExhausted, Site

IN_PROCESS = ("local", "centralized", "centralized_nodp")
POOLED_SITE_ID = -1  # seeds the centralized model's sampling and noise; never a real site id


def training_sites(config: ExperimentConfig) -> list[SiteData]:
    """The sites the federation trains on (held-out sites never train, not even in a baseline)."""
    return [s for s in load_sites(config.data) if s.site_id not in config.eval.holdout_sites]


def pooled_site_data(sites: list[SiteData], name: str = "centralized") -> SiteData:
    """One site holding every given site's train/val/test images, as a central data lake would."""

    def concat(split: str) -> Split:
        parts = [getattr(s, split) for s in sites]
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))

    first = sites[0]
    return SiteData(POOLED_SITE_ID, name, concat("train"), concat("val"), concat("test"), first.num_classes, first.channels)


def train_alone(site: Site, rounds: int, log_prefix: str = "") -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], str | None]:
    """Train one site's adapter for ``rounds`` rounds on its own data, starting from the global init.

    Returns (adapter, per-round history, why it stopped early or None). A round its budget
    refuses ends training, as in the federation. With per-site ranks (lora.site_ranks) each round's
    adapter is stacked onto the global one, as the server does for a federation of one site.
    """
    adapter = adapter_state_dict(site.method.global_model())
    history: list[dict[str, Any]] = []
    for server_round in range(1, rounds + 1):
        try:
            reply = site.train(adapter, server_round)
        except BudgetExhausted as refusal:
            return adapter, history, str(refusal)
        adapter = site.method.combine(adapter, [(reply.adapter, 1.0)])  # a federation of one site
        entry = {"round": server_round, "train_loss": reply.metrics[TRAIN_LOSS], "epsilon": reply.metrics[EPSILON]}
        history.append(entry)
        print(f"[fedfm] {log_prefix}round {server_round}/{rounds}: train loss {entry['train_loss']:.4f}, "
              f"epsilon {entry['epsilon']:.3f}", flush=True)
    return adapter, history, None


def spent(site: Site) -> float:
    """What ``site``'s ledger records as spent: every attempt of the baseline on it (0 without DP-SGD)."""
    return spent_epsilon(site.ledger.path.parent, site.name) or 0.0


def evaluate_on(site: Site, adapter: dict[str, torch.Tensor], data: SiteData, split: str = "test") -> SiteEvaluation:
    """Evaluate ``adapter`` (trained by ``site``) on another site's ``split``."""
    probe = Site(site.config, data.site_id, site.ledger.path.parent, data=data)
    reply = probe.evaluate(adapter, split)
    return SiteEvaluation(dict(reply.metrics), reply.probs, reply.labels)


def run_local_site(config: ExperimentConfig, site_id: int, out_dir: Path, run_id: str = "") -> dict[str, Any]:
    """One site's local-only model: trained alone with its own DP budget, tested on its own test split."""
    site = Site(config, site_id, out_dir / "ledger", run_id=run_id)
    started = time.time()
    adapter, history, stopped = train_alone(site, config.federation.rounds, f"local {site.name}: ")
    evaluation = evaluate_on(site, adapter, site.data) if config.eval.test else None
    validation = evaluate_on(site, adapter, site.data, "val")
    return {"site": site.name, "evaluation": evaluation, "validation": {site.name: validation},
            "history": history, "stopped": stopped,
            "epsilon": spent(site), "n_train": len(site.data.train),
            "seconds": time.time() - started}


def run_pooled(config: ExperimentConfig, private: bool, out_dir: Path, run_id: str = "") -> dict[str, Any]:
    """The centralized model: every training site's data in one place, evaluated on every site's test split."""
    if not private:
        config = config.model_copy(deep=True)
        config.privacy.enabled = False
    sites = training_sites(config)
    site = Site(config, POOLED_SITE_ID, out_dir / "ledger", data=pooled_site_data(sites), run_id=run_id)
    started = time.time()
    name = "centralized" if private else "centralized_nodp"
    adapter, history, stopped = train_alone(site, config.federation.rounds, f"{name}: ")
    evaluations = ({site_name(s.site_id): evaluate_on(site, adapter, s) for s in load_sites(config.data)}
                   if config.eval.test else {})
    validation = {site_name(s.site_id): evaluate_on(site, adapter, s, "val") for s in sites}
    return {"site": site.name, "evaluations": evaluations, "validation": validation, "history": history, "stopped": stopped,
            "epsilon": spent(site), "n_train": len(site.data.train),
            "seconds": time.time() - started}


def fit_model_calibration(validation: dict[str, SiteEvaluation]) -> Calibration | None:
    """A baseline model's temperature and threshold, fitted as the federated model's are: on the
    summed statistics of the validation splits of the sites it trained on (None: nothing to fit on)."""
    stats = [site_statistics(ev.probs, ev.labels) for ev in validation.values() if ev.probs is not None and len(ev.labels)]
    return fit_calibration(sum_statistics(stats)) if stats else None


def part_calibrations(config: ExperimentConfig, parts: list[dict[str, Any]]) -> tuple[dict[str, Calibration], dict[str, Any]]:
    """With eval.calibrate, every model of a baseline calibrated on its own validation data: each
    local-only site on its own split, the centralized model on every training site's.

    Returns (evaluated site -> the calibration of the model that predicted it, model -> calibration)."""
    by_site: dict[str, Calibration] = {}
    by_model: dict[str, Any] = {}
    if not config.eval.calibrate:
        return by_site, by_model
    for part in parts:
        calibration = fit_model_calibration(part.get("validation", {}))
        if calibration is None:
            continue
        by_model[part["site"]] = calibration.to_dict()
        for site in [*part.get("validation", {}), *_part_evaluations(part)]:
            by_site[site] = calibration
    return by_site, by_model


def _part_evaluations(part: dict[str, Any]) -> dict[str, SiteEvaluation]:
    return part.get("evaluations") or ({part["site"]: part["evaluation"]} if part.get("evaluation") else {})


def write_baseline_results(config: ExperimentConfig, name: str, out_dir: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``results.json`` of a baseline, in the shape of a federated run's."""
    delta = config.privacy.delta if name != "centralized_nodp" and config.privacy.sample_level else 0.0
    calibrations, models = part_calibrations(config, parts)
    sites: dict[str, Any] = {}
    evaluations: dict[str, SiteEvaluation] = {}
    validation: dict[str, SiteEvaluation] = {}
    for part in parts:
        validation.update(part.get("validation", {}))
        for site, ev in _part_evaluations(part).items():
            metrics = dict(ev.metrics)
            evaluations[site] = ev
            sites[site] = {
                "n_train": part["n_train"],
                "n_test": int(metrics.get("n", 0)),
                **summarize_site_test(metrics, ev),
                "epsilon": float(part["epsilon"]),
                "delta": delta,
                "trained_by": part["site"],
                "held_out": site in {site_name(k) for k in config.eval.holdout_sites},
            }
            if site in calibrations and ev.probs is not None and len(ev.labels):
                after = calibrated_metrics(ev.probs, ev.labels, calibrations[site])
                sites[site]["test_calibrated"] = {k: after[CALIBRATED + k] for k in TEST_METRICS if CALIBRATED + k in after}
    results = {
        "status": "complete",
        "baseline": name,
        "config": config.model_dump(),
        "sites": {site: sites[site] for site in sorted_sites(sites)},
        "pooled": pooled_summary(evaluations),
        "worst_site": worst_site(evaluations),
        "pooled_calibrated": calibrated_pooled(evaluations, calibrations) or {},
        "calibration_per_model": {"fitted_on": "each model on the validation splits of the sites it trained on",
                                  "models": models} if models else None,
        "validation": validation_summary(validation, calibrations, separate_models=len(models) > 1),
        "history": {p["site"]: p["history"] for p in parts},
        "stopped_early": {p["site"]: p["stopped"] for p in parts if p["stopped"]},
        "wall_time_s": round(sum(p["seconds"] for p in parts), 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    return results


def calibrated_pooled(evaluations: dict[str, SiteEvaluation], calibrations: dict[str, Calibration]) -> dict[str, Any] | None:
    """Pooled metrics of the calibrated predictions, or None unless every evaluated site's model
    has a calibration (pooling calibrated and uncalibrated probabilities would mean nothing)."""
    if not calibrations or not set(evaluations) <= set(calibrations):
        return None
    return pooled_summary(evaluations, calibrations)


def validation_summary(evaluations: dict[str, SiteEvaluation], calibrations: dict[str, Calibration] | None = None,
                       separate_models: bool = False) -> dict[str, Any]:
    """The baseline's validation metrics, pooled over the training sites: what a search selects by.

    Where the pooled predictions come from ``separate_models`` each calibrated on its own (local only),
    the calibrated predictions are what the baseline deploys and their pooled AUROC is what it is
    selected by: one model's temperature and threshold keep its ranking, several models' do not."""
    pooled = {k: v for k, v in pooled_summary(evaluations).items() if k != "reliability"}
    if not pooled:
        return {}
    summary = {"pooled": pooled, "auroc": pooled.get("auroc"), "auroc_kind": "pooled"}
    after = calibrated_pooled(evaluations, calibrations or {})
    if after is not None:
        after = {k: v for k, v in after.items() if k != "reliability"}
        summary["pooled_calibrated"] = after
        if separate_models:
            summary.update(auroc=after.get("auroc"), auroc_uncalibrated=pooled.get("auroc"),
                           auroc_kind="pooled, each site's model calibrated on its own validation split")
    return summary


def run_job(config_json: str, kind: str, site_id: int, out_dir: str, run_id: str = "") -> dict[str, Any]:
    """One unit of baseline work, picklable for a process pool: a local site, or a centralized model;
    ``run_id`` names the attempt in its ledger entries (a restart after an interruption is another)."""
    config = ExperimentConfig.model_validate_json(config_json)
    if kind == "local":
        return run_local_site(config, site_id, Path(out_dir), run_id)
    return run_pooled(config, private=(kind == "centralized"), out_dir=Path(out_dir), run_id=run_id)


def baseline_jobs(config: ExperimentConfig, names: list[str], root: Path) -> list[tuple[str, str, int, str]]:
    """(baseline, kind, site id, out dir) for every unit of work of the in-process baselines in ``names``."""
    jobs = []
    for name in names:
        out = str(root / name)
        if name == "local":
            jobs += [(name, "local", s.site_id, out) for s in training_sites(config)]
        elif name in ("centralized", "centralized_nodp"):
            jobs.append((name, name, POOLED_SITE_ID, out))
    # longest first: the centralized models hold all the data
    return sorted(jobs, key=lambda j: j[1] == "local")


def is_complete(run_dir: Path) -> bool:
    results = run_dir / "results.json"
    return results.is_file() and json.loads(results.read_text()).get("status") == "complete"
