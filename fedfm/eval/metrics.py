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


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics fedfm reports for every site and for the pooled test set."""
    preds = np.argmax(probs, axis=1)
    return {
        "auroc": auroc(probs, labels),
        "accuracy": accuracy(preds, labels),
        "balanced_accuracy": balanced_accuracy(preds, labels),
        "loss": cross_entropy(probs, labels),
        "n": int(len(labels)),
    }
