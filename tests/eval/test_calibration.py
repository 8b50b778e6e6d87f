"""Federated calibration: fitting on summed site statistics equals fitting on pooled predictions."""

import numpy as np
import pytest

from fedfm.eval.calibration import (
    TEMPERATURES,
    THRESHOLDS,
    Calibration,
    apply_calibration,
    calibration_config,
    calibration_from,
    fit_calibration,
    scale_probs,
    site_statistics,
    sum_statistics,
)
from fedfm.eval.metrics import balanced_accuracy, expected_calibration_error


def _overconfident_sites(classes: int, seed: int = 0):
    """Three sites whose predictions are informative but too sharp (logits x 4) and biased to class 0."""
    rng = np.random.default_rng(seed)
    sites = []
    for n in (40, 75, 130):
        labels = rng.integers(0, classes, n)
        logits = rng.normal(0, 1, (n, classes))
        logits[np.arange(n), labels] += 1.0
        logits[:, 0] += 1.5
        z = 4 * logits
        p = np.exp(z - z.max(1, keepdims=True))
        sites.append((p / p.sum(1, keepdims=True), labels))
    return sites


def _pooled_fit(probs, labels, binary):
    """The slow obvious fit on pooled predictions: every grid point scored directly."""
    nll = [-np.mean(np.log(np.clip(scale_probs(probs, t)[np.arange(len(labels)), labels], 1e-12, 1))) for t in TEMPERATURES]
    t = float(TEMPERATURES[int(np.argmin(nll))])
    if not binary:
        return t, None
    scores = [balanced_accuracy((probs[:, 1] >= h).astype(int), labels) for h in THRESHOLDS]
    return t, float(THRESHOLDS[int(np.argmax(scores))])


@pytest.mark.parametrize("classes", [2, 4])
def test_summed_statistics_fit_equals_pooled_fit(classes):
    sites = _overconfident_sites(classes)
    fitted = fit_calibration(sum_statistics([site_statistics(p, y) for p, y in sites]))
    probs = np.concatenate([p for p, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    temperature, raw_threshold = _pooled_fit(probs, labels, classes == 2)
    assert fitted.temperature == temperature
    if classes == 2:
        # the fitted threshold lives on the calibrated scale: the same decisions as raw_threshold on raw p1
        _, decisions = apply_calibration(probs, fitted)
        np.testing.assert_array_equal(decisions, (probs[:, 1] >= raw_threshold).astype(int))
    else:
        assert fitted.threshold is None


def test_calibration_lowers_ece_and_threshold_balances_classes():
    sites = _overconfident_sites(2, seed=1)
    fitted = fit_calibration(sum_statistics([site_statistics(p, y) for p, y in sites]))
    probs = np.concatenate([p for p, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    scaled, decisions = apply_calibration(probs, fitted)
    assert fitted.temperature > 1.5  # the logits were 4x too sharp
    assert expected_calibration_error(scaled, labels) < expected_calibration_error(probs, labels)
    assert balanced_accuracy(decisions, labels) > balanced_accuracy(probs.argmax(1), labels)


def test_temperature_scaling_is_logit_division():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)
    np.testing.assert_allclose(scale_probs(probs, 2.5), expected, atol=1e-12)


def test_calibration_travels_in_a_config():
    for cal in (Calibration(1.7, 0.31), Calibration(0.9, None)):
        assert calibration_from(calibration_config(cal)) == cal


def test_mixed_statistics_are_refused():
    two = site_statistics(*_overconfident_sites(2)[0])
    three = site_statistics(*_overconfident_sites(3)[0])
    with pytest.raises(ValueError, match="different kinds"):
        sum_statistics([two, three])
