"""Classification metrics computed with numpy only (no scikit-learn at run time)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Returns NaN when only one class is present, since the AUROC is undefined there.
    """
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of (N, C) class probabilities: binary for C = 2, macro one-vs-rest above.

    Classes absent from ``labels`` are left out of the macro average.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return binary_auroc(probs[:, 1], labels == 1)
    per_class = [binary_auroc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    valid = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(labels) else float("nan")


def balanced_accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    recalls = [np.mean(preds[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))) if len(labels) else float("nan")


def sensitivity_specificity(preds: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Recall of class 1 and of class 0 (binary tasks); NaN where a class is absent."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    pos, neg = labels == 1, labels == 0
    sens = float(np.mean(preds[pos] == 1)) if pos.any() else float("nan")
    spec = float(np.mean(preds[neg] == 0)) if neg.any() else float("nan")
    return sens, spec


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (empty bins left out)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bin i holds (i/B, (i+1)/B]
    curve: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        members = which == b
        if members.any():
            curve["confidence"].append(float(confidence[members].mean()))
            curve["accuracy"].append(float(correct[members].mean()))
            curve["count"].append(int(members.sum()))
    return curve


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """sum over bins of (bin share) * |accuracy - mean confidence|, top-label, equal-width bins."""
    curve = reliability_curve(probs, labels, bins)
    total = sum(curve["count"])
    if total == 0:
        return float("nan")
    return float(sum(n / total * abs(a - c) for a, c, n in zip(curve["accuracy"], curve["confidence"], curve["count"])))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, preds: np.ndarray | None = None) -> dict[str, float]:
    """The metrics fedfm reports for every site and for the pooled test set.

    ``preds`` are the decisions (default: the most probable class; a fitted threshold gives others).
    """
    probs = np.asarray(probs)
    preds = np.argmax(probs, axis=1) if preds is None else np.asarray(preds)
    metrics = {
        "auroc": auroc(probs, labels),
        "accuracy": accuracy(preds, labels),
        "balanced_accuracy": balanced_accuracy(preds, labels),
        "loss": cross_entropy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "n": int(len(labels)),
    }
    if probs.shape[1] == 2:
        metrics["sensitivity"], metrics["specificity"] = sensitivity_specificity(preds, labels)
    return metrics


def bootstrap_intervals(
    probs: np.ndarray, labels: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0,
    preds: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every metric in :func:`classification_metrics`.

    Test images are resampled with replacement; resamples where a metric is undefined
    (e.g. AUROC with one class) are left out of that metric's interval.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    preds = np.argmax(probs, axis=1) if preds is None else np.asarray(preds)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        pick = rng.integers(0, len(labels), len(labels))
        for key, value in classification_metrics(probs[pick], labels[pick], preds[pick]).items():
            if key != "n" and not np.isnan(value):
                draws.setdefault(key, []).append(value)
    tail = (1 - level) / 2 * 100
    return {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in draws.items()}
