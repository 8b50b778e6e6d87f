"""The report for a multi-class task: macro AUROC, no sensitivity/specificity columns, from results.json alone."""

import json

import numpy as np

from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.report import write_report
from fedfm.results import RunRecorder, SiteEvaluation


def test_report_of_a_three_class_run_built_without_flower(tmp_path):
    config = load_config(None, ["data.num_sites=2", "data.num_classes=3", "data.image_size=16",
                                "data.samples_per_site=60", "model.backbone=vit-tiny"])
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path / "run", model, full_model_bytes(model))
    rng = np.random.default_rng(0)
    evaluations = {}
    for site in (0, 1):
        labels = rng.integers(0, 3, 40)
        probs = rng.dirichlet(np.ones(3), 40)
        probs[np.arange(40), labels] += 1.0  # informative scores
        probs /= probs.sum(1, keepdims=True)
        from fedfm.eval.metrics import classification_metrics

        metrics = {**classification_metrics(probs, labels), "n-train": 50, "n-val": 5, "n-test": 40,
                   "label-counts-train": [20, 20, 10], "label-counts-val": [2, 2, 1], "label-counts-test": [14, 13, 13]}
        evaluations[f"site-{site}"] = SiteEvaluation(metrics, probs, labels)
    recorder.record_round(1, {f"site-{s}": {"num-examples": 50, "train-loss": 1.0, "epsilon": 2.0} for s in (0, 1)},
                          {}, {f"site-{s}": {"auroc": 0.7, "num-examples": 5} for s in (0, 1)})
    results = recorder.finalize(adapter_state_dict(model), evaluations)
    paths = write_report([tmp_path / "run"], tmp_path / "report")
    report = json.loads(paths["json"].read_text())
    run = report["runs"][0]
    assert run["pooled"]["auroc"]["value"] == results["pooled"]["auroc"]
    assert "sensitivity" not in run["pooled"] and "sensitivity" not in run["sites"][0]["metrics"]
    html = paths["html"].read_text()
    assert "sensitivity" not in html.split("Per-site test results")[1].split("</table>")[0]
    for row in run["sites"]:
        assert f"{row['metrics']['auroc']['value']:.4f}" in html
        assert row["label_counts"]["train"] == [20, 20, 10] and "20 : 20 : 10" in html
    # per-class sensitivity of the pooled test set, by hand, and in the report
    probs = np.concatenate([evaluations[s].probs for s in ("site-0", "site-1")])
    labels = np.concatenate([evaluations[s].labels for s in ("site-0", "site-1")])
    by_hand = [float(np.mean(probs[labels == c].argmax(1) == c)) for c in range(3)]
    assert results["pooled"]["recall_per_class"] == by_hand
    assert np.mean(by_hand) == results["pooled"]["balanced_accuracy"]
    assert "Per-class sensitivity (pooled test)" in html and f"{by_hand[2]:.4f}" in html
