"""A whole study on Flower's simulation engine: federated run, leave-one-site-out, baselines, report."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from fedfm.cli import main
from fedfm.privacy.ledger import SiteLedger

REPO = Path(__file__).resolve().parents[1]
STUDY = [
    "data.num_sites=2", "federation.rounds=2", "data.samples_per_site=120", "data.image_size=16",
    "eval.leave_one_site_out=true", "eval.baselines=[local, centralized, centralized_nodp, federated_nodp]",
    "federation.transport=fp16", "eval.baseline_overrides={centralized_nodp: [train.lr=0.001]}",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    args = ["simulate", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out)]
    for item in STUDY:
        args += ["--set", item]
    assert main(args) == 0
    return out


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_leave_one_site_out_never_trains_on_the_held_out_site(study):
    main_run = _results(study)
    n_train = {name: site["n_train"] for name, site in main_run["sites"].items()}
    for held in ("site-0", "site-1"):
        part = study / "loso" / f"without-{held}"
        results = _results(part)
        assert results["config"]["eval"]["holdout_sites"] == [int(held[-1])]
        for entry in results["rounds"]:
            assert held not in entry["participants"] and held not in entry["train"]
            # the images trained on in the round are exactly the other sites' training images
            assert sum(m["num-examples"] for m in entry["train"].values()) == sum(
                n for name, n in n_train.items() if name != held)
        assert results["sites"][held]["rounds_trained"] == 0 and results["sites"][held]["epsilon"] == 0.0
        assert results["sites"][held]["held_out"] is True
        assert not (part / "ledger" / f"{held}.jsonl").exists()  # it never spent privacy budget
        assert results["sites"][held]["test"]["auroc"] is not None  # but it was evaluated, as unseen
        other = "site-1" if held == "site-0" else "site-0"
        assert [e["round"] for e in SiteLedger(part / "ledger", other).verify() if e.get("kind") != "label-counts"] == [1, 2]


def test_fp16_transport_sends_half_the_bytes_and_keeps_an_fp32_adapter(study):
    from safetensors.torch import load_file

    adapter = load_file(str(study / "checkpoint" / "adapter.safetensors"))
    fp32_bytes = sum(t.numel() * 4 for t in adapter.values())
    assert all(t.dtype == torch.float32 for t in adapter.values())
    update = _results(study)["communication"]["update_bytes"]
    assert fp32_bytes / 2 <= update < 0.55 * fp32_bytes  # tensors in fp16 plus a small per-tensor header


def test_baselines_train_on_what_they_claim(study):
    main_run = _results(study)
    n_total = sum(s["n_train"] for s in main_run["sites"].values())
    local = _results(study / "baselines" / "local")
    for name, site in local["sites"].items():
        assert site["n_train"] == main_run["sites"][name]["n_train"]
        assert site["n_test"] == main_run["sites"][name]["n_test"]
        ledger = [e for e in SiteLedger(study / "baselines" / "local" / "ledger", name).verify()
                  if e.get("kind") != "label-counts"]
        assert [e["n_train"] for e in ledger] == [site["n_train"]] * 2  # its own images only, two rounds
        assert 0 < site["epsilon"] <= 8.0
    central = _results(study / "baselines" / "centralized")
    assert {s["n_train"] for s in central["sites"].values()} == {n_total}
    assert SiteLedger(study / "baselines" / "centralized" / "ledger", "centralized").verify()[-1]["n_train"] == n_total
    assert 0 < central["sites"]["site-0"]["epsilon"] <= 8.0
    nodp = _results(study / "baselines" / "centralized_nodp")
    assert nodp["config"]["train"]["lr"] == 0.001 and central["config"]["train"]["lr"] != 0.001  # its own override
    assert all(s["epsilon"] == 0.0 for s in nodp["sites"].values())
    assert not list((study / "baselines" / "centralized_nodp" / "ledger").glob("*.jsonl"))  # no ledger without DP
    fed_nodp = _results(study / "baselines" / "federated_nodp")
    assert fed_nodp["config"]["privacy"]["enabled"] is False
    assert all(s["epsilon"] == 0.0 for s in fed_nodp["sites"].values())
    for results in (local, central, nodp, fed_nodp):
        assert results["pooled"]["n"] == main_run["pooled"]["n"]
    # each local model calibrated on its own validation split, the centralized one on every site's
    assert set(local["calibration_per_model"]["models"]) == set(local["sites"])
    assert list(central["calibration_per_model"]["models"]) == ["centralized"]
    for results in (local, central, nodp):
        assert results["pooled_calibrated"]["n"] == main_run["pooled"]["n"]
        assert all("balanced_accuracy" in s["test_calibrated"] for s in results["sites"].values())


class _Checker(HTMLParser):
    """Collects images and table cells, and checks that every opened element is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.errors = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_html_is_valid_self_contained_and_matches_report_json(study):
    html = (study / "report.html").read_text()
    report = json.loads((study / "report.json").read_text())
    assert html.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(html)
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    # every figure is embedded: a decodable PNG, nothing fetched from elsewhere
    assert len(checker.images) >= 5  # reliability, LOSO heatmap, baselines, curves, epsilon
    for image in checker.images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', html)
    # the tables hold report.json's numbers
    run = report["runs"][0]
    cells = set(checker.cells)
    for row in run["sites"]:
        auroc = row["metrics"]["auroc"]
        lo, hi = auroc["ci95"]
        assert f"{auroc['value']:.4f} ({lo:.4f}-{hi:.4f})" in cells
        assert f"{row['epsilon']:.3f} / {row['budget']:.1f}" in cells
    for row in run["loso"]["rows"]:
        for value in row["auroc"].values():
            assert f"{value:.4f}" in cells
    assert set(run["loso"]["unseen_auroc"]) == {"site-0", "site-1"}
    assert set(run["baselines"]) == {"federated", "local", "centralized", "centralized_nodp", "federated_nodp"}
    for baseline in run["baselines"].values():
        assert f"{baseline['pooled']['auroc']['value']:.4f}" in html
    # and they are the run's own numbers
    results = _results(study)
    assert run["pooled"]["auroc"]["value"] == results["pooled"]["auroc"]
    assert run["sites"][0]["label_counts"]["train"] and sum(run["sites"][0]["label_counts"]["train"]) == run["sites"][0]["n_train"]
    assert (study / "report.md").read_text().count("|") > 20


def test_report_of_several_runs_adds_the_tradeoff(study, tmp_path):
    out = tmp_path / "both"
    assert main(["report", str(study), str(study / "baselines" / "federated_nodp"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["run"] for p in report["tradeoff"]] == ["run", "federated_nodp"]
    assert report["tradeoff"][1]["max_epsilon"] == 0.0 and report["tradeoff"][0]["max_epsilon"] > 0
    assert "Utility and privacy across runs" in (out / "report.html").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no results.json" in capsys.readouterr().err
