"""What the server keeps of a run: per-round history, checkpoints, the final adapter and results.json.

Every write goes through a temp file and a rename, so a crash never leaves a torn file;
``results.json`` is rewritten after every round with ``status: running``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedfm.config import ExperimentConfig
from fedfm.eval.calibration import CALIBRATED, TEMPERATURES, Calibration, apply_calibration
from fedfm.eval.metrics import bootstrap_intervals, classification_metrics, reliability_curve
from fedfm.global_model import run_method
from fedfm.models import save_adapter
from fedfm.models.method import AdapterMethod
from fedfm.privacy.ledger import LedgerError, spent_epsilon
from fedfm.protocol import BUDGET_EPSILON, DELTA, EPSILON, LABEL_COUNTS, NUM_EXAMPLES, SIZES, TRAIN_LOSS, site_name, site_order
TEST_METRICS = ("auroc", "accuracy", "balanced_accuracy", "loss", "ece", "sensitivity", "specificity")


@dataclass
class SiteEvaluation:
    """A site's final test evaluation as the server received it."""

    metrics: dict[str, float]
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    personal: SiteEvaluation | None = None  # the site's personalized model (lora.personal), if any


@dataclass
class RunRecorder:
    config: ExperimentConfig
    run_dir: Path
    model: torch.nn.Module  # backbone + LoRA, used to write the adapter in PEFT format
    full_model_bytes: int
    update_bytes: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    site_train: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_moved: int = 0
    upload_bytes: int = 0  # what the sites sent (train replies), a part of bytes_moved
    uploads: int = 0
    stopped: str | None = None  # why training ended before the planned rounds, if it did
    client_level: dict[str, Any] | None = None  # client-level DP guarantee so far (level client/both)
    round_offset: int = 0  # rounds done before this process started (resumed runs)
    started: float = field(default_factory=time.time)
    earlier_wall_time_s: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)  # the final adapter on the validation splits
    calibration: Calibration | None = None  # fitted on the sites' summed validation statistics
    method: AdapterMethod | None = None  # the run's adaptation method (default: the config's)
    # simulation: the sites' ledger folder, where results.json reads each site's spent epsilon; None
    # (deployment: the ledgers stay at the sites) takes it from the site's last accepted train reply
    ledger_dir: Path | None = None

    @property
    def adapter_method(self) -> AdapterMethod:
        if self.method is None:
            self.method = run_method(self.config)
        return self.method

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def resume(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Continue a run from its checkpoint: (last completed round, global adapter).

        ``checkpoint/state.json`` is the checkpoint's commit record: it names the adapter file of
        its round and holds the byte counts and the client-level guarantee at that round, and the
        per-round history comes from results.json (which may be a round ahead of it after a crash
        between the two writes). A resumed run writes the same results an uninterrupted one would.
        """
        state_path = self.run_dir / "checkpoint" / "state.json"
        if not state_path.exists():
            raise FileNotFoundError(f"{self.run_dir} has no checkpoint to resume from (checkpoint/state.json)")
        state = json.loads(state_path.read_text())
        done = int(state["round"])
        previous = json.loads((self.run_dir / "results.json").read_text())
        self.rounds = [r for r in previous["rounds"] if r["round"] <= done]
        for entry in self.rounds:
            self.site_train.update(entry["train"])
        kept = state.get("recorder") or {**previous["communication"], "client_level": previous.get("client_level"),
                                         "wall_time_s": previous.get("wall_time_s", 0.0)}  # checkpoints of older versions
        self.update_bytes, self.bytes_moved = kept["update_bytes"], kept["total_bytes_moved"]
        self.upload_bytes, self.uploads = kept.get("upload_bytes", 0), kept.get("uploads", 0)
        self.client_level = kept.get("client_level")
        self.earlier_wall_time_s = float(kept.get("wall_time_s", 0.0))
        self.round_offset = done
        return done, load_file(str(self.run_dir / "checkpoint" / state.get("adapter", "adapter.safetensors")))

    def stop(self, reason: str) -> bool:
        """Record why training ends before the planned rounds; False when it had already stopped."""
        if self.stopped is not None:
            return False
        self.stopped = reason
        return True

    def record_client_level(self, guarantee: dict[str, Any] | None) -> None:
        """The client-level DP guarantee after the latest release (results.json ``client_level``)."""
        if guarantee is not None:
            self.client_level = dict(guarantee)

    def record_transfer(self, adapter_bytes: int, messages: int, upload: bool = False) -> None:
        """Count ``messages`` adapters of ``adapter_bytes`` each; ``upload``: sent by sites (train replies)."""
        self.update_bytes = adapter_bytes
        self.bytes_moved += adapter_bytes * messages
        if upload:
            self.upload_bytes += adapter_bytes * messages
            self.uploads += messages

    def record_round(
        self,
        server_round: int,
        train: dict[str, dict[str, float]],
        refused: dict[str, str],
        evaluation: dict[str, dict[str, float]],
        clipped: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        for site, metrics in train.items():
            self.site_train[site] = metrics
        entry = {
            "round": server_round + self.round_offset,
            "participants": sorted(train),
            "refused": refused,
            "clipped": dict(clipped or {}),  # site -> the norm of its update, when the server bounded it
            "train": train,
            "train_loss": _weighted(train, TRAIN_LOSS),
            "max_epsilon": max((m.get(EPSILON, 0.0) for m in train.values()), default=0.0),
            "client_epsilon": (self.client_level or {}).get("epsilon"),
            "val": evaluation,
            "val_auroc": _weighted(evaluation, "auroc"),
            "elapsed_s": round(time.time() - self.started + self.earlier_wall_time_s, 2),
        }
        self.rounds.append(entry)
        return entry

    def round_entry(self, server_round: int) -> dict[str, Any] | None:
        """The recorded entry of round ``server_round`` of this process (None: not recorded)."""
        number = server_round + self.round_offset
        return next((entry for entry in reversed(self.rounds) if entry["round"] == number), None)

    def record_round_validation(self, server_round: int, evaluation: dict[str, dict[str, float]],
                                timed: bool = True) -> dict[str, Any] | None:
        """The validation of round ``server_round``'s adapter, into its entry; ``timed``: the round
        lasts until now (false when it arrives with the next round's train replies)."""
        entry = self.round_entry(server_round)
        if entry is None:
            return None
        entry["val"] = evaluation
        entry["val_auroc"] = _weighted(evaluation, "auroc")
        if timed:
            entry["elapsed_s"] = round(time.time() - self.started + self.earlier_wall_time_s, 2)
        return entry

    def checkpoint(self, server_round: int, adapter: dict[str, torch.Tensor]) -> None:
        """Write round ``server_round``'s checkpoint so that a crash at any moment leaves one to resume.

        The adapter goes to a file of its own round, then results.json, and last ``state.json``,
        the commit record naming that adapter (and holding the counters a resume needs); only then
        is ``adapter.safetensors`` (what readers of a run folder load) pointed at it and the previous
        round's adapter removed. Until state.json is replaced, the previous
        checkpoint is whole: its adapter and state.json are untouched, and results.json's extra
        round is ignored by :meth:`resume`."""
        folder = self.run_dir / "checkpoint"
        folder.mkdir(exist_ok=True)
        done = server_round + self.round_offset
        name = f"adapter-round-{done}.safetensors"
        tmp = folder / f"{name}.tmp"
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp))
        os.replace(tmp, folder / name)
        results = self.write_results(status="running")
        recorder = {**results["communication"], "client_level": self.client_level, "wall_time_s": results["wall_time_s"]}
        write_json(folder / "state.json", {"round": done, "time": time.time(), "adapter": name, "recorder": recorder})
        latest = folder / "adapter.safetensors.tmp"  # adapter.safetensors: the committed adapter, for readers
        latest.unlink(missing_ok=True)
        try:
            os.link(folder / name, latest)
        except OSError:  # a file system without hard links
            shutil.copyfile(folder / name, latest)
        os.replace(latest, folder / "adapter.safetensors")
        for old in folder.glob("adapter-round-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def record_validation(self, evaluations: dict[str, SiteEvaluation], calibration: Calibration | None) -> None:
        """The final adapter's validation metrics: pooled (when the sites shared predictions) or
        size-weighted over sites, what a search selects by; and the fitted calibration."""
        pooled = pooled_summary(evaluations)
        per_site = {k: ev.metrics for k, ev in evaluations.items()}
        self.validation = {
            "pooled": {k: v for k, v in pooled.items() if k != "reliability"},
            "auroc": pooled.get("auroc", _weighted(per_site, "auroc")),
            "auroc_kind": "pooled" if pooled else "site-weighted",
            "sites": {k: {m: v for m, v in ev.metrics.items() if m in TEST_METRICS} for k, ev in evaluations.items()},
        }
        self.calibration = calibration
        if calibration is not None and pooled:
            self.validation["pooled_calibrated"] = {
                k: v for k, v in calibrated_pooled_summary(evaluations, calibration).items() if k != "reliability"}

    def finalize(self, adapter: dict[str, torch.Tensor], evaluations: dict[str, SiteEvaluation]) -> dict[str, Any]:
        self.model = self.adapter_method.global_model(adapter)  # stacked ranks grow from round to round
        save_adapter(self.model, self.run_dir / "adapter")
        return self.write_results(status="complete", evaluations=evaluations)

    def write_results(self, status: str, evaluations: dict[str, SiteEvaluation] | None = None) -> dict[str, Any]:
        results = {
            "status": status,
            "stopped_early": self.stopped,
            "config": self.config.model_dump(),
            "rounds": self.rounds,
            "sites": self._sites(evaluations or {}),
            "pooled": pooled_summary(evaluations or {}),
            "pooled_unseen": pooled_summary({k: v for k, v in (evaluations or {}).items() if self._held_out(k)}),
            "pooled_seen": pooled_summary({k: v for k, v in (evaluations or {}).items() if not self._held_out(k)})
            if self.config.eval.holdout_sites else {},
            "worst_site": worst_site(evaluations or {}),
            "pooled_personal": _pooled_personal(evaluations or {}),
            "validation": self.validation,
            "calibration": self._calibration(),
            "pooled_calibrated": calibrated_pooled_summary(evaluations or {}, self.calibration),
            "client_level": self.client_level,
            "communication": self._communication(),
            "wall_time_s": round(time.time() - self.started + self.earlier_wall_time_s, 2),
        }
        write_json(self.run_dir / "results.json", results)
        return results

    def _sites(self, evaluations: dict[str, SiteEvaluation]) -> dict[str, Any]:
        sites: dict[str, Any] = {}
        for site in sorted(set(evaluations) | set(self.site_train), key=site_order):
            ev = evaluations.get(site)
            metrics = dict(ev.metrics) if ev else {}
            train = self.site_train.get(site, {})
            sites[site] = {
                "n_train": int(metrics.pop(SIZES["n_train"], train.get(NUM_EXAMPLES, 0))),
                "n_val": int(metrics.pop(SIZES["n_val"], 0)),
                "n_test": int(metrics.pop(SIZES["n_test"], 0)),
                "label_counts": {k: [int(c) for c in metrics.pop(f"{LABEL_COUNTS}{k}", [])] for k in ("train", "val", "test")},
                **summarize_site_test(metrics, ev),
                **self._epsilon(site, train),
                "delta": float(train.get(DELTA, 0.0)),
                "budget_epsilon": float(train[BUDGET_EPSILON]) if train.get(BUDGET_EPSILON) else None,  # what it enforced
                "rounds_trained": sum(site in r["participants"] for r in self.rounds),
                "held_out": self._held_out(site),
            }
            calibrated = {k[len(CALIBRATED):]: v for k, v in metrics.items() if k.startswith(CALIBRATED)}
            if calibrated:
                sites[site]["test_calibrated"] = {k: calibrated[k] for k in TEST_METRICS if k in calibrated}
            if ev is not None and ev.personal is not None:
                own = summarize_site_test(dict(ev.personal.metrics), ev.personal)
                sites[site].update({"test_personal": own["test"], "test_personal_ci95": own["test_ci95"]})
        return sites

    def _epsilon(self, site: str, train: dict[str, Any]) -> dict[str, Any]:
        """The site's spent epsilon and where it was read: its ledger when the coordinator can read it
        (a reply the server rejected, or a round refused after it, can leave the last accepted reply
        below what the ledger holds), else the site's last accepted train reply."""
        reply = {"epsilon": float(train.get(EPSILON, 0.0)), "epsilon_source": "train reply"}
        if self.ledger_dir is None:
            return reply
        try:
            spent = spent_epsilon(self.ledger_dir, site)
        except LedgerError as err:
            return {**reply, "epsilon_source": f"train reply (the ledger fails verification: {err})"}
        return {"epsilon": spent or 0.0, "epsilon_source": "ledger"}

    def _calibration(self) -> dict[str, Any] | None:
        if self.calibration is None:
            return None
        return {**self.calibration.to_dict(), "fitted_on": "the sites' summed validation statistics (no DP noise)",
                "temperature_grid": [float(TEMPERATURES[0]), float(TEMPERATURES[-1]), len(TEMPERATURES)],
                "threshold_rule": "highest balanced accuracy (Youden's J)"}

    def _held_out(self, site: str) -> bool:
        return site in {site_name(s) for s in self.config.eval.holdout_sites}

    def _communication(self) -> dict[str, Any]:
        return {
            "update_bytes": self.update_bytes,
            "full_model_bytes": self.full_model_bytes,
            "update_to_full_ratio": self.update_bytes / self.full_model_bytes if self.full_model_bytes else None,
            "total_bytes_moved": self.bytes_moved,
            "upload_bytes": self.upload_bytes,
            "uploads": self.uploads,
            "mean_upload_bytes": self.upload_bytes / self.uploads if self.uploads else None,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }


def pooled_summary(evaluations: dict[str, SiteEvaluation],
                   calibration: Calibration | dict[str, Calibration] | None = None) -> dict[str, Any]:
    """Metrics of every site's shared predictions pooled; with ``calibration``, after it: one for
    every site (one model), or a site -> calibration map (each site's predictions came from a model
    calibrated on its own, as in the local-only baseline; it must name every site)."""
    # site order, not arrival order: the bootstrap resamples by position
    names = [k for k in sorted(evaluations, key=site_order)
             if evaluations[k].probs is not None and len(evaluations[k].probs)]
    if not names:
        return {}
    labels = np.concatenate([evaluations[k].labels for k in names])
    preds = None
    if calibration is None:
        probs = np.concatenate([evaluations[k].probs for k in names])
    else:
        per_site = [apply_calibration(evaluations[k].probs, calibration[k] if isinstance(calibration, dict) else calibration)
                    for k in names]
        probs = np.concatenate([p for p, _ in per_site])
        preds = np.concatenate([d for _, d in per_site])
    decided = probs.argmax(axis=1) if preds is None else preds
    return {
        **classification_metrics(probs, labels, preds),
        "ci95": bootstrap_intervals(probs, labels, preds=preds),
        "reliability": reliability_curve(probs, labels),
        **({"recall_per_class": per_class_recall(decided, labels, probs.shape[1])} if probs.shape[1] > 2 else {}),
    }


def calibrated_pooled_summary(evaluations: dict[str, SiteEvaluation],
                              calibration: Calibration | dict[str, Calibration] | None) -> dict[str, Any]:
    """:func:`pooled_summary` after ``calibration`` (empty without one)."""
    return pooled_summary(evaluations, calibration) if calibration is not None else {}


def per_class_recall(preds: np.ndarray, labels: np.ndarray, classes: int) -> list[float | None]:
    """Sensitivity of each class (None where the class is absent): what balanced accuracy averages."""
    return [float(np.mean(preds[labels == c] == c)) if np.any(labels == c) else None for c in range(classes)]


def _pooled_personal(evaluations: dict[str, SiteEvaluation]) -> dict[str, Any]:
    """Pooled test metrics of the sites' personalized models (lora.personal); empty without them."""
    own = {k: ev.personal for k, ev in evaluations.items() if ev.personal is not None}
    return {k: v for k, v in pooled_summary(own).items() if k != "reliability"} if own else {}


def summarize_site_test(metrics: dict[str, Any], ev: SiteEvaluation | None) -> dict[str, Any]:
    """A site's test metrics, with bootstrap 95 % intervals and a reliability curve when it shared predictions."""
    shared = ev is not None and ev.probs is not None and len(ev.probs) > 0
    return {
        "test": {k: metrics[k] for k in TEST_METRICS if k in metrics},
        "test_ci95": bootstrap_intervals(ev.probs, ev.labels) if shared else {},
        "reliability": reliability_curve(ev.probs, ev.labels) if shared else {},
    }


def worst_site(evaluations: dict[str, SiteEvaluation]) -> dict[str, Any] | None:
    """The site with the lowest test AUROC, and the gap to the best one."""
    scored = {name: ev.metrics["auroc"] for name, ev in evaluations.items()
              if isinstance(ev.metrics.get("auroc"), float) and not math.isnan(ev.metrics["auroc"])}
    if not scored:
        return None
    worst, best = min(scored, key=scored.get), max(scored, key=scored.get)
    return {"site": worst, "auroc": scored[worst], "best_site": best, "best_minus_worst_auroc": scored[best] - scored[worst]}


def _weighted(per_site: dict[str, dict[str, float]], key: str) -> float | None:
    pairs = [
        (m[key], m.get(NUM_EXAMPLES, m.get("n", 1)))
        for m in per_site.values()
        if key in m and not math.isnan(m[key])
    ]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    """NaN (e.g. AUROC of a one-class test set) becomes null, which JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
