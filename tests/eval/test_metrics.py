import numpy as np
import pytest

from fedfm.eval.metrics import accuracy, auroc, balanced_accuracy, binary_auroc, classification_metrics


def test_binary_auroc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert binary_auroc(np.array([0.8, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0])) == 0.75
    # a tie counts one half
    assert binary_auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert np.isnan(binary_auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_multiclass_auroc_is_macro_one_vs_rest():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    assert auroc(probs, labels) == 1.0  # every class's positives outscore its negatives
    # class 2: positive 0.7 against negatives 0.1, 0.1, 0.8 -> 2/3
    probs[3] = [0.1, 0.1, 0.8]
    assert binary_auroc(probs[:, 2], labels == 2) == pytest.approx(2 / 3)
    assert binary_auroc(probs[:, 1], labels == 1) == pytest.approx(1 / 2)  # positive 0.1 loses to both 0.2
    assert auroc(probs, labels) == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)


def test_accuracy_and_balanced_accuracy():
    preds, labels = np.array([1, 1, 1, 0]), np.array([1, 1, 1, 1 - 1])
    assert accuracy(preds, labels) == 1.0
    preds, labels = np.array([1, 1, 1, 1]), np.array([1, 1, 1, 0])
    assert accuracy(preds, labels) == 0.75
    assert balanced_accuracy(preds, labels) == 0.5


def test_classification_metrics_keys_and_loss():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = classification_metrics(probs, np.array([0, 1]))
    assert m["auroc"] == 1.0 and m["accuracy"] == 1.0 and m["n"] == 2
    assert m["loss"] == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)


def test_sensitivity_and_specificity_by_hand():
    from fedfm.eval.metrics import sensitivity_specificity

    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])
    assert sensitivity_specificity(preds, labels) == (1.0, 2 / 3)


def test_ece_by_hand():
    from fedfm.eval.metrics import expected_calibration_error, reliability_curve

    # confidences 0.9, 0.9 (one right, one wrong) and 0.6 (right); 15 bins: 0.9 in bin 13, 0.6 in bin 8
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    labels = np.array([0, 0, 0])
    curve = reliability_curve(probs, labels)
    assert curve["count"] == [1, 2] and curve["accuracy"] == [1.0, 0.5]
    assert expected_calibration_error(probs, labels) == pytest.approx(1 / 3 * 0.4 + 2 / 3 * 0.4)
    perfectly_calibrated = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(perfectly_calibrated, np.zeros(4, int)) == 0.0


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    from fedfm.eval.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)
    covered, trials = 0, 200
    for trial in range(trials):
        labels = np.zeros(100, int)
        correct = rng.random(100) < 0.7  # a classifier whose true accuracy is 0.7
        probs = np.where(correct[:, None], [[0.8, 0.2]], [[0.2, 0.8]])
        lo, hi = bootstrap_intervals(probs, labels, resamples=200, seed=trial)["accuracy"]
        covered += lo <= 0.7 <= hi
    assert 0.89 <= covered / trials <= 0.99


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_auroc_matches_scikit_learn(classes):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 300)
    logits = rng.normal(size=(300, classes)) + 1.5 * np.eye(classes)[labels] * rng.random((300, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = (sklearn_metrics.roc_auc_score(labels, probs[:, 1]) if classes == 2
                else sklearn_metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert auroc(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert balanced_accuracy(probs.argmax(1), labels) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(labels, probs.argmax(1)), abs=1e-12)
