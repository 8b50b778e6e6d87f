"""Baselines are calibrated like the federated model: each model on the validation data it trained with.

The local-only baseline pools the predictions of several separately trained models, so a temperature
per site changes its pooled ranking; the search then selects on those calibrated predictions."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedfm.baselines import write_baseline_results
from fedfm.config import load_config
from fedfm.eval.calibration import TEMPERATURES, THRESHOLDS
from fedfm.eval.metrics import classification_metrics
from fedfm.results import SiteEvaluation

REPO = Path(__file__).resolve().parents[2]
SHARPNESS = {"site-0": 0.3, "site-1": 3.0, "site-2": 12.0}  # each site's model: logits this many times too sharp


def _evaluation(rng, n: int, sharpness: float, shift: float) -> SiteEvaluation:
    labels = rng.integers(0, 2, n)
    margin = rng.normal(0, 1, n) + 1.2 * (2 * labels - 1) + shift
    logits = np.stack([-margin, margin], 1) * sharpness / 2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return SiteEvaluation(classification_metrics(probs, labels), probs, labels)


def _parts(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    parts = []
    for i, (site, sharp) in enumerate(SHARPNESS.items()):
        parts.append({"site": site, "n_train": 100, "epsilon": 1.0, "history": [], "stopped": None, "seconds": 1.0,
                      "evaluation": _evaluation(rng, 120, sharp, shift=0.8 * i - 0.8),
                      "validation": {site: _evaluation(rng, 90, sharp, shift=0.8 * i - 0.8)}})
    return parts


def _slow_fit(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every grid temperature's mean NLL and every grid threshold's balanced accuracy, scored directly."""
    z = np.log(np.clip(probs, 1e-12, 1))
    def p1(t):
        return 1 / (1 + np.exp(-(z[:, 1] - z[:, 0]) / t))
    nll = [-np.mean(np.log(np.clip(np.where(labels == 1, p1(t), 1 - p1(t)), 1e-12, 1))) for t in TEMPERATURES]
    temperature = float(TEMPERATURES[int(np.argmin(nll))])
    scores = [0.5 * (np.mean(probs[labels == 1, 1] >= h) + np.mean(probs[labels == 0, 1] < h)) for h in THRESHOLDS]
    return temperature, float(THRESHOLDS[int(np.argmax(scores))])


def _calibrated_p1(ev: SiteEvaluation, temperature: float) -> np.ndarray:
    z = np.log(np.clip(ev.probs, 1e-12, 1))
    return 1 / (1 + np.exp(-(z[:, 1] - z[:, 0]) / temperature))


@pytest.fixture()
def config():
    return load_config(REPO / "configs" / "quickstart.yaml")


def test_each_local_site_is_calibrated_on_its_own_validation_split_and_selected_on_the_pooled_result(config, tmp_path):
    parts = _parts()
    results = write_baseline_results(config, "local", tmp_path, parts)
    models = results["calibration_per_model"]["models"]
    val_p1, val_y = [], []
    for part in parts:
        site = part["site"]
        ev_val, ev_test = part["validation"][site], part["evaluation"]
        temperature, raw_threshold = _slow_fit(ev_val.probs, ev_val.labels)
        assert models[site]["temperature"] == pytest.approx(temperature)
        # the test split's decisions are those of the threshold found on this site's validation split alone
        decisions = (ev_test.probs[:, 1] >= raw_threshold).astype(int)
        y = ev_test.labels
        balanced = 0.5 * (np.mean(decisions[y == 1] == 1) + np.mean(decisions[y == 0] == 0))
        assert results["sites"][site]["test_calibrated"]["balanced_accuracy"] == pytest.approx(balanced)
        val_p1.append(_calibrated_p1(ev_val, temperature))
        val_y.append(ev_val.labels)
    assert len({m["temperature"] for m in models.values()}) == 3  # three models, three temperatures
    raw = roc_auc_score(np.concatenate(val_y), np.concatenate([p["validation"][p["site"]].probs[:, 1] for p in parts]))
    calibrated = roc_auc_score(np.concatenate(val_y), np.concatenate(val_p1))
    assert abs(calibrated - raw) > 1e-3  # the fixture's models disagree in scale, so pooling moves
    assert results["validation"]["auroc"] == pytest.approx(calibrated)
    assert results["validation"]["auroc_uncalibrated"] == pytest.approx(raw)
    test_p1 = np.concatenate([_calibrated_p1(p["evaluation"], models[p["site"]]["temperature"]) for p in parts])
    test_y = np.concatenate([p["evaluation"].labels for p in parts])
    assert results["pooled_calibrated"]["auroc"] == pytest.approx(roc_auc_score(test_y, test_p1))
    assert results["pooled"]["auroc"] == pytest.approx(
        roc_auc_score(test_y, np.concatenate([p["evaluation"].probs[:, 1] for p in parts])))


def test_one_model_is_calibrated_on_every_training_site_and_keeps_its_ranking(config, tmp_path):
    local = _parts()
    validation = {p["site"]: p["validation"][p["site"]] for p in local}
    part = {"site": "centralized", "n_train": 300, "epsilon": 1.0, "history": [], "stopped": None, "seconds": 1.0,
            "evaluations": {p["site"]: p["evaluation"] for p in local}, "validation": validation}
    results = write_baseline_results(config, "centralized", tmp_path, [part])
    probs = np.concatenate([ev.probs for ev in validation.values()])
    labels = np.concatenate([ev.labels for ev in validation.values()])
    temperature, _ = _slow_fit(probs, labels)
    assert results["calibration_per_model"]["models"]["centralized"]["temperature"] == pytest.approx(temperature)
    assert results["validation"]["auroc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert "auroc_uncalibrated" not in results["validation"]
    assert results["pooled_calibrated"]["auroc"] == pytest.approx(results["pooled"]["auroc"])


def test_without_eval_calibrate_nothing_is_fitted(config, tmp_path):
    config.eval.calibrate = False
    results = write_baseline_results(config, "local", tmp_path, _parts())
    assert results["calibration_per_model"] is None and results["pooled_calibrated"] == {}
    assert "pooled_calibrated" not in results["validation"]
    assert all("test_calibrated" not in s for s in results["sites"].values())


def test_the_baselines_table_moves_pooled_auroc_only_for_pooled_separate_models():
    from fedfm.report.tables import baselines_table

    def entry(label, models, before, after):
        return {"label": label, "chosen": None, "auroc": {"site-0": 0.9}, "pooled": {"auroc": {"value": before, "ci95": [0.8, 0.95]}},
                "worst_site": {"site": "site-0", "auroc": 0.9}, "max_epsilon": 7.9, "calibrated_models": models,
                "calibration": {"auroc": {"before": before, "after": after}, "ece": {"before": 0.1, "after": 0.03},
                                "balanced_accuracy": {"before": 0.8, "after": None}}}

    table = baselines_table({"baselines": {"local": entry("local only (DP)", 3, 0.9226, 0.9337),
                                           "centralized": entry("centralized (DP)", 1, 0.9576, 0.95770001)}})
    local, central = table.rows
    assert local[2] == "0.9226 (0.8000-0.9500) -> 0.9337" and central[2] == "0.9576 (0.8000-0.9500)"
    assert local[-2] == "0.1000 -> 0.0300" and local[-1] == "0.8000"  # nothing fitted: the value before alone
