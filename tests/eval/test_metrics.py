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
