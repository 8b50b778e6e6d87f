"""Everything the report shows, gathered from run folders into one JSON-ready dict.

The report never recomputes a metric: every number comes from a ``results.json`` written by a
run (federated, leave-one-site-out or baseline). What this module adds is arrangement: one row
per site, the trained-on x evaluated-on matrix, the baselines side by side, the curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedfm import protocol
from fedfm.audit.search import DP_BASELINES, baseline_search_privacy, read_tuning, tuning_privacy
from fedfm.config import ConfigError, DataConfig, ExperimentConfig
from fedfm.data.shift import site_shift_params
from fedfm.models.method import update_size_varies
from fedfm.run_folder import seed_dir

BASELINE_ORDER = ("federated_nodp", "centralized", "centralized_nodp", "local")
BASELINE_LABELS = {
    "federated": "federated (DP)",
    "federated_nodp": "federated, no DP",
    "centralized": "centralized (DP)",
    "centralized_nodp": "centralized, no DP",
    "local": "local only (DP)",
}


class ReportError(ConfigError):
    """A folder given to the report is not a run folder."""


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(f"{run_dir} is not a run folder: it has no results.json (pass a folder that fedfm simulate wrote)")
    results = json.loads(path.read_text())
    if results.get("status") != "complete":
        raise ReportError(f"{run_dir}: the run is {results.get('status')!r}, not complete "
                          f"(finish it with fedfm simulate --resume {run_dir})")
    return results


def collect(run_dirs: list[Path]) -> dict[str, Any]:
    """The report's content for one or several run folders."""
    runs = [collect_run(Path(d)) for d in run_dirs]
    return {"runs": runs, "tradeoff": [tradeoff_point(r) for r in runs]}


def collect_run(run_dir: Path) -> dict[str, Any]:
    results = read_results(run_dir)
    config = ExperimentConfig.model_validate(results["config"])
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "summary": run_summary(config, results),
        "sites": site_rows(config, results),
        "pooled": _metrics_with_ci(results.get("pooled", {})),
        "pooled_seen": _metrics_with_ci(results.get("pooled_seen", {})),
        "pooled_personal": _metrics_with_ci(results.get("pooled_personal", {})),
        "pooled_unseen": _metrics_with_ci(results.get("pooled_unseen", {})),
        "worst_site": results.get("worst_site"),
        "reliability": {"pooled": results.get("pooled", {}).get("reliability", {}),
                        **{s: v.get("reliability", {}) for s, v in results["sites"].items()}},
        "rounds": round_curves(config, results),
        "loso": loso_matrix(run_dir, results),
        "baselines": baselines(run_dir, results),
        "communication": _communication(config, results.get("communication", {})),
        "client_level": results.get("client_level"),
        "calibration": calibration_block(results),
        "recall_per_class": results.get("pooled", {}).get("recall_per_class"),
        "tuning": tuning_block(run_dir),
        "seeds": seeds_block(run_dir, config, results),
        "screening": screening_rows(results),
    }


def screening_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every update the server did not take as sent: refused or rejected (who, why), or bounded (its norm)."""
    rows = []
    for r in results.get("rounds", []):
        rows += [{"round": r["round"], "who": who, "what": why} for who, why in r.get("refused", {}).items()]
        rows += [{"round": r["round"], "who": site, "what": f"update norm {norm:.4g} bounded to federation.update_clip_norm"}
                 for site, norm in r.get("clipped", {}).items()]
    return rows


SEED_METRICS = ("auroc", "ece", "balanced_accuracy")
CALIBRATED_SEED_METRICS = ("ece", "balanced_accuracy")  # after the temperature and threshold fitted on validation


def seeds_block(run_dir: Path, config: ExperimentConfig, results: dict[str, Any]) -> dict[str, Any] | None:
    """The run and its repeats with other seeds (eval.seeds): each seed's pooled test metrics with
    their bootstrap intervals, the worst site, and the mean and standard deviation across seeds."""
    others = [s for s in config.eval.seeds if s != config.train.seed]
    if not others:
        return None
    rows = [_seed_row(config.train.seed, results)]
    rows += [_seed_row(s, read_results(seed_dir(run_dir, s))) for s in others if (seed_dir(run_dir, s) / "results.json").is_file()]
    spread = {}
    for key in (*SEED_METRICS, "worst_site_auroc", *(f"{k}_calibrated" for k in CALIBRATED_SEED_METRICS),
                "lowest_site_balanced_accuracy"):
        values = [r[key] for r in rows if _num(r.get(key))]
        if values:
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            spread[key] = {"mean": mean, "std": std, "n": len(values)}
    return {"rows": rows, "spread": spread}


def _seed_row(seed: int, results: dict[str, Any]) -> dict[str, Any]:
    pooled = results.get("pooled", {})
    calibrated = results.get("pooled_calibrated") or {}
    worst = results.get("worst_site") or {}
    return {"seed": seed, **{k: pooled.get(k) for k in SEED_METRICS},
            **{f"{k}_calibrated": calibrated.get(k) for k in CALIBRATED_SEED_METRICS},
            **lowest_site_balanced_accuracy(results),
            "auroc_ci95": pooled.get("ci95", {}).get("auroc"), "worst_site_auroc": worst.get("auroc")}


def lowest_site_balanced_accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """The site with the lowest balanced accuracy on its test split after calibration (the threshold
    chosen on validation), as {"lowest_site_balanced_accuracy": value, "lowest_site": name}; empty
    where nothing was calibrated."""
    values = {name: site["test_calibrated"]["balanced_accuracy"] for name, site in results.get("sites", {}).items()
              if _num((site.get("test_calibrated") or {}).get("balanced_accuracy"))}
    if not values:
        return {}
    name = min(values, key=lambda n: (values[n], n))
    return {"lowest_site_balanced_accuracy": values[name], "lowest_site": name}


CALIBRATION_METRICS = ("ece", "loss", "balanced_accuracy", "sensitivity", "specificity", "accuracy")


def calibration_block(results: dict[str, Any]) -> dict[str, Any] | None:
    """Pooled test metrics before and after the temperature / threshold fitted on validation."""
    fitted = results.get("calibration")
    if not fitted:
        return None
    before, after = results.get("pooled", {}), results.get("pooled_calibrated", {})
    sites = {name: {"before": site.get("test", {}), "after": site.get("test_calibrated", {})}
             for name, site in results.get("sites", {}).items() if site.get("test_calibrated")}
    return {
        "temperature": fitted.get("temperature"),
        "threshold": fitted.get("threshold"),
        "pooled": {k: {"before": before.get(k), "after": after.get(k)} for k in CALIBRATION_METRICS if k in before},
        "sites": sites,
    }


def tuning_block(run_dir: Path) -> dict[str, Any] | None:
    """The search that chose this run's values (``fedfm tune``), from RUN/tuning.json and the ledgers."""
    tuning = read_tuning(run_dir)
    if tuning is None:
        return None
    return {**tuning, "privacy": tuning_privacy(run_dir)}


def _communication(config: ExperimentConfig, comm: dict[str, Any]) -> dict[str, Any]:
    """results.json's byte counts; runs written before uploads were counted apart get them from the
    adapter size, which every message shares unless the sites have their own ranks."""
    if comm.get("mean_upload_bytes") is None and comm.get("update_bytes") and not update_size_varies(config.lora):
        return {**comm, "mean_upload_bytes": comm["update_bytes"]}
    return comm


def run_summary(config: ExperimentConfig, results: dict[str, Any]) -> dict[str, Any]:
    p, d = config.privacy, config.data
    rounds_done = max((r["round"] for r in results.get("rounds", [])), default=0)
    return {
        "data": data_name(d),
        "source": d.source,
        "sites": d.num_sites,
        "partition": d.partition + (f" (alpha {d.alpha})" if d.partition == "dirichlet" else ""),
        "image_size": d.image_size if d.spatial_dims != 3 else f"{d.image_size}^3 (volumes)",
        "site_shift": d.site_shift,
        "backbone": config.model.backbone,
        "adapter": adapter_line(config),
        "privacy": privacy_line(config),
        "delta": p.delta if p.sample_level else None,
        "budget_epsilon": enforced_budget(config, results),
        "rounds": f"{rounds_done} of {config.federation.rounds}",
        "local_epochs": config.train.local_epochs,
        "batch_size": config.train.batch_size,
        "held_out_sites": [protocol.site_name(s) for s in config.eval.holdout_sites],
        "stopped_early": results.get("stopped_early"),
        "wall_time_s": results.get("wall_time_s"),
    }


def data_name(d: DataConfig) -> str:
    """What the data is called: as read from the data when the run started (data.dataset); for runs
    recorded before that, from data.path (the .npz file's stem, the folder's name), never data.name
    when a path was given (data.name only downloads a file that is not there)."""
    if d.dataset:
        return d.dataset
    if d.source == "synthetic":
        return "synthetic"
    if d.path:
        path = Path(d.path)
        return path.stem if d.source == "medmnist" else path.name
    return d.name or d.source


def site_budget(config: ExperimentConfig, name: str, site: dict[str, Any]) -> float | None:
    """The budget the site enforced, as it reported it; runs from before sites reported it: the config's."""
    if not config.privacy.sample_level:
        return None
    enforced = site.get("budget_epsilon")
    return float(enforced) if enforced is not None else config.privacy.budget.for_site(name)


def enforced_budget(config: ExperimentConfig, results: dict[str, Any]) -> float | str | None:
    """One budget when every site enforced the same, else "per site" (the site table has each)."""
    budgets = {site_budget(config, name, site) for name, site in results.get("sites", {}).items()}
    budgets.discard(None)
    if not budgets:
        return config.privacy.budget.epsilon if config.privacy.sample_level else None
    return budgets.pop() if len(budgets) == 1 else "per site"


def adapter_line(config: ExperimentConfig) -> str:
    lora = config.lora
    text = f"{lora.variant} r={lora.r} alpha={lora.alpha}"
    if lora.target_modules:
        text += f", targets {lora.target_modules}"
    if lora.site_ranks:
        ranks = ", ".join(f"{site} {rank}" for site, rank in sorted(lora.site_ranks.items()))
        cap = f", global rank <= {lora.stack_max_rank}" if lora.stack_max_rank else ""
        text += f", per-site ranks ({ranks}; stacked{cap})"
    if lora.personal != "none":
        text += f", personal {lora.personal}"
    return text


def privacy_line(config: ExperimentConfig) -> str:
    p = config.privacy
    if not p.enabled:
        return "off"
    parts = []
    if p.sample_level:
        sigma = "calibrated per site" if p.noise_multiplier is None else f"sigma {p.noise_multiplier}"
        parts.append(f"sample-level DP-SGD ({sigma}, C={p.max_grad_norm}, delta={p.delta}, {p.accountant} accountant)")
    if p.client_level:
        parts.append(f"client-level DP (z={p.client.noise_multiplier}, C={p.client.clipping_norm}, delta={p.client.delta})")
    return "; ".join(parts)


def site_rows(config: ExperimentConfig, results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, site in results["sites"].items():
        site_id = protocol.site_id(name)
        rows.append({
            "site": name,
            "held_out": site.get("held_out", False),
            "n_train": site.get("n_train"),
            "n_val": site.get("n_val"),
            "n_test": site.get("n_test"),
            "label_counts": site.get("label_counts", {}),
            "shift": site_shift_params(site_id, config.data.site_shift, config.data.seed),
            "metrics": _metrics_with_ci({**site.get("test", {}), "ci95": site.get("test_ci95", {})}),
            "personal": _metrics_with_ci({**site.get("test_personal", {}), "ci95": site.get("test_personal_ci95", {})}),
            "epsilon": site.get("epsilon"),
            "budget": site_budget(config, name, site),
            "rounds_trained": site.get("rounds_trained"),
        })
    return rows


def _metrics_with_ci(block: dict[str, Any]) -> dict[str, Any]:
    ci = block.get("ci95", {})
    keys = ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece", "loss")
    return {k: {"value": block[k], "ci95": ci.get(k)} for k in keys if k in block and block[k] is not None}


def round_curves(config: ExperimentConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Per round: train loss, validation AUROC per site, epsilon per site (carried forward when a site sat out)."""
    rounds = results.get("rounds", [])
    names = list(results["sites"])
    curves: dict[str, Any] = {"round": [r["round"] for r in rounds],
                              "train_loss": [r.get("train_loss") for r in rounds],
                              "val_auroc": {s: [] for s in names}, "epsilon": {s: [] for s in names}}
    spent = {s: 0.0 for s in names}
    for r in rounds:
        for s in names:
            curves["val_auroc"][s].append(r.get("val", {}).get(s, {}).get("auroc"))
            if s in r.get("train", {}):
                spent[s] = r["train"][s].get("epsilon", spent[s])
            curves["epsilon"][s].append(spent[s])
    curves["budget"] = {s: site_budget(config, s, results["sites"][s]) for s in names} if config.privacy.sample_level else {}
    return curves


def loso_matrix(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """Rows: the federation trained on all sites, then without each site; columns: test AUROC at each site."""
    folders = sorted((run_dir / "loso").glob(f"{protocol.LOSO_PREFIX}*"), key=lambda p: protocol.site_order(protocol.left_out_site(p.name)))
    if not folders:
        return None
    sites = list(results["sites"])
    held = results["config"]["eval"]["holdout_sites"]
    label = "all sites" if not held else "main run (without " + ", ".join(protocol.site_name(k) for k in held) + ")"
    rows = [{"trained_without": None, "label": label, "auroc": _aurocs(results, sites)}]
    unseen = {}
    for folder in folders:
        left_out = protocol.left_out_site(folder.name)
        part = read_results(folder)
        rows.append({"trained_without": left_out, "label": f"without {left_out}", "auroc": _aurocs(part, sites)})
        unseen[left_out] = rows[-1]["auroc"].get(left_out)
    seen = {s: rows[0]["auroc"].get(s) for s in unseen}
    return {
        "sites": sites,
        "rows": rows,
        "unseen_auroc": unseen,
        "seen_auroc": seen,
        "gap": {s: (seen[s] - unseen[s]) if _num(seen[s]) and _num(unseen[s]) else None for s in unseen},
        "mean_unseen_auroc": _mean(unseen.values()),
        "worst_unseen": min(((s, v) for s, v in unseen.items() if _num(v)), key=lambda kv: kv[1], default=(None, None)),
    }


def _aurocs(results: dict[str, Any], sites: list[str]) -> dict[str, float | None]:
    return {s: results["sites"].get(s, {}).get("test", {}).get("auroc") for s in sites}


def baselines(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The federated run and each baseline found under ``baselines/``, per site and pooled."""
    found = {"federated": results}
    for name in BASELINE_ORDER:
        folder = run_dir / "baselines" / name
        if (folder / "results.json").is_file():
            found[name] = read_results(folder)
    if len(found) == 1:
        return {}
    chosen = {m: v.get("chosen_values") for m, v in ((read_tuning(run_dir) or {}).get("methods") or {}).items()}
    out = {}
    for name, res in found.items():
        out[name] = {
            "label": BASELINE_LABELS[name],
            "chosen": chosen.get(name),  # the values its own search chose on validation (fedfm tune)
            "pooled": _metrics_with_ci(res.get("pooled", {})),
            "auroc": {s: v.get("test", {}).get("auroc") for s, v in res["sites"].items()},
            "max_epsilon": max((v.get("epsilon") or 0.0 for v in res["sites"].values()), default=0.0),
            **search_epsilon(run_dir, name, chosen.get(name)),
            "worst_site": res.get("worst_site"),
            "wall_time_s": res.get("wall_time_s"),
            "calibration": before_after(res, ("auroc", "ece", "balanced_accuracy")),
            # models whose calibrated predictions are pooled (local only: one per site)
            "calibrated_models": len((res.get("calibration_per_model") or {}).get("models") or {}),
        }
    return out


def before_after(results: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Pooled test metrics before and after the calibration fitted on validation ("after" is None
    where nothing was fitted)."""
    before, after = results.get("pooled") or {}, results.get("pooled_calibrated") or {}
    return {k: {"before": before.get(k), "after": after.get(k)} for k in keys if k in before}


def search_epsilon(run_dir: Path, name: str, chosen: dict[str, Any] | None) -> dict[str, Any]:
    """A DP baseline chosen by its own search (fedfm tune): its largest site epsilon is that of
    every run of its search composed (each trial trained on the same data), as for the federated
    model, whose sites keep one ledger for all of them."""
    if chosen is None or name not in DP_BASELINES:
        return {}
    spent = baseline_search_privacy(run_dir, name)
    if not spent:
        return {}
    return {"max_epsilon": max(p["epsilon_total"] for p in spent.values()),
            "search_runs": max(p["runs"] for p in spent.values())}


def tradeoff_point(run: dict[str, Any]) -> dict[str, Any]:
    """One run on the utility-privacy plane: the largest site epsilon against the pooled AUROC."""
    eps = [r["epsilon"] for r in run["sites"] if r["epsilon"] and not r["held_out"]]
    comm = run["communication"]
    rounds = len(run["rounds"]["round"]) or None
    wall = run["summary"].get("wall_time_s")
    return {"run": run["name"], "adapter": run["summary"]["adapter"], "max_epsilon": max(eps) if eps else 0.0,
            "pooled_auroc": run["pooled"].get("auroc", {}).get("value"),
            "pooled_ece": run["pooled"].get("ece", {}).get("value"),
            "seconds_per_round": wall / rounds if rounds and isinstance(wall, (int, float)) else None,
            "trainable_params": comm.get("trainable_params"),
            "worst_site_auroc": (run["worst_site"] or {}).get("auroc"),
            "update_bytes": comm.get("update_bytes"),
            "mean_upload_bytes": comm.get("mean_upload_bytes"),
            "bytes_per_round": comm["total_bytes_moved"] / rounds if rounds and comm.get("total_bytes_moved") else None}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def _mean(values) -> float | None:
    vals = [v for v in values if _num(v)]
    return sum(vals) / len(vals) if vals else None
