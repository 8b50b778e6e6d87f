"""Federated calibration: a temperature and a decision threshold fitted without moving images.

Each site computes, on its validation split, the summed negative log-likelihood of its predictions
at every temperature of a fixed grid and (two classes) its confusion counts at every threshold of a
fixed grid (:func:`site_statistics`). The server adds the sites' statistics and picks the
temperature with the lowest NLL and the threshold with the highest balanced accuracy
(:func:`fit_calibration`): sums are exact, so this equals fitting on the pooled validation
predictions over the same grids. Predictions are calibrated as ``softmax(log p / T)`` (the same as
dividing the logits by T) and, with two classes, class 1 is predicted when its calibrated
probability reaches the threshold (:func:`apply_calibration`).

The statistics are released without DP noise: they are about validation images, which DP-SGD does
not cover, and the audit says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedfm.eval.metrics import classification_metrics
from fedfm.protocol import CALIBRATED, STATISTICS_PREFIX, TEMPERATURE, THRESHOLD

TEMPERATURES = np.round(np.geomspace(0.05, 20.0, 121), 6)
THRESHOLDS = np.round(np.linspace(0.005, 0.995, 199), 6)  # on the raw probability of class 1


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold: float | None  # on the calibrated probability of class 1; None for more than two classes

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities of logits divided by T."""
    z = _log_probs(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll_per_temperature(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Summed NLL of the labels at each temperature of :data:`TEMPERATURES`."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty(len(TEMPERATURES))
    for i, t in enumerate(TEMPERATURES):
        picked = scale_probs(probs, float(t))[np.arange(len(labels)), labels]
        out[i] = -np.log(np.clip(picked, 1e-12, 1.0)).sum()
    return out


def confusion_per_threshold(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """True/false positives and negatives when class 1 is predicted at p1 >= each of :data:`THRESHOLDS`."""
    p1 = np.asarray(probs, dtype=np.float64)[:, 1][:, None]
    labels = np.asarray(labels)[:, None]
    predicted = p1 >= THRESHOLDS[None, :]
    pos, neg = labels == 1, labels == 0
    return {
        "tp": (predicted & pos).sum(axis=0), "fp": (predicted & neg).sum(axis=0),
        "fn": (~predicted & pos).sum(axis=0), "tn": (~predicted & neg).sum(axis=0),
    }




def site_statistics(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """What one site sends the server about its validation split (no images, no predictions)."""
    stats: dict[str, list[float]] = {f"{STATISTICS_PREFIX}nll": nll_per_temperature(probs, labels).tolist(),
                                         f"{STATISTICS_PREFIX}n": [float(len(labels))]}
    if np.asarray(probs).shape[1] == 2:
        stats.update({f"{STATISTICS_PREFIX}{k}": v.astype(float).tolist() for k, v in confusion_per_threshold(probs, labels).items()})
    return stats


def sum_statistics(per_site: list[dict[str, list[float]]]) -> dict[str, np.ndarray]:
    keys = set(per_site[0])
    for stats in per_site[1:]:
        if set(stats) != keys:
            raise ValueError("sites sent calibration statistics of different kinds (mixed class counts?)")
    return {k: np.sum([np.asarray(s[k], dtype=np.float64) for s in per_site], axis=0) for k in keys}


def fit_calibration(summed: dict[str, np.ndarray]) -> Calibration:
    """The temperature of lowest summed NLL; with two classes, the threshold of highest balanced
    accuracy (equivalently Youden's J), expressed on the calibrated probability of class 1."""
    temperature = float(TEMPERATURES[int(np.argmin(summed[f"{STATISTICS_PREFIX}nll"]))])
    if f"{STATISTICS_PREFIX}tp" not in summed:
        return Calibration(temperature, None)
    tp, fp, fn, tn = (summed[f"{STATISTICS_PREFIX}{k}"] for k in ("tp", "fp", "fn", "tn"))
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = 0.5 * (np.where(tp + fn > 0, tp / (tp + fn), 0.0) + np.where(tn + fp > 0, tn / (tn + fp), 0.0))
    raw = float(THRESHOLDS[int(np.argmax(balanced))])  # first of ties: the lowest threshold
    return Calibration(temperature, calibrated_threshold(raw, temperature))


def calibrated_threshold(raw: float, temperature: float) -> float:
    """The raw threshold on p1 mapped onto the calibrated p1 (scaling is monotone for two classes)."""
    return float(scale_probs(np.array([[1.0 - raw, raw]]), temperature)[0, 1])


def apply_calibration(probs: np.ndarray, calibration: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and predicted classes."""
    scaled = scale_probs(probs, calibration.temperature)
    if calibration.threshold is None:
        return scaled, scaled.argmax(axis=1)
    # compare on the raw scale's monotone image with a small tolerance for round-trip error
    return scaled, (scaled[:, 1] >= calibration.threshold - 1e-12).astype(np.int64)




def calibration_from(config) -> Calibration:
    """The calibration a server sent in an evaluate message's config (keys temperature, threshold)."""
    threshold = float(config[THRESHOLD]) if float(config.get(THRESHOLD, -1.0)) >= 0 else None
    return Calibration(float(config[TEMPERATURE]), threshold)


def calibration_config(calibration: Calibration) -> dict[str, float]:
    """The evaluate-config keys that carry ``calibration`` to the sites (threshold -1 = none)."""
    threshold = -1.0 if calibration.threshold is None else calibration.threshold
    return {TEMPERATURE: calibration.temperature, THRESHOLD: threshold}


def calibrated_metrics(probs: np.ndarray, labels: np.ndarray, calibration: Calibration) -> dict[str, float]:
    """The site's metrics after calibration, keys prefixed with :data:`CALIBRATED`."""
    scaled, preds = apply_calibration(probs, calibration)
    return {f"{CALIBRATED}{k}": float(v) for k, v in classification_metrics(scaled, labels, preds).items() if k != "n"}
