"""fedfm tune end to end: trials read validation only, the chosen one is tested once, the
sites' ledgers compose every run of the search and stay within budget."""

import json
from pathlib import Path

import pytest

from fedfm.cli import main
from fedfm.audit.ledgers import audit_run
from fedfm.privacy.ledger import SiteLedger

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_grid_search_on_validation_then_one_test(tmp_path):
    out = tmp_path / "search"
    args = ["tune", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out), "--grid", "train.lr=0.002,0.02",
            "--set", "data.num_sites=2", "--set", "federation.rounds=1", "--set", "data.samples_per_site=120",
            "--set", "data.image_size=16"]
    assert main(args) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert [t["values"]["train.lr"] for t in tuning["trials"]] == [0.002, 0.02]
    best = max(tuning["trials"], key=lambda t: t["val_auroc"])
    assert tuning["chosen"] == best["number"] and tuning["runs_in_budget"] == 3
    for trial in tuning["trials"]:  # a trial never evaluated a test split
        results = json.loads((out / "trials" / f"trial-{trial['number']:03d}" / "results.json").read_text())
        assert results["pooled"] == {} and all(s["test"] == {} for s in results["sites"].values())
        assert results["config"]["eval"]["test"] is False
        assert results["validation"]["auroc"] == trial["val_auroc"]
    final = json.loads((out / "results.json").read_text())
    assert final["config"]["train"]["lr"] == best["values"]["train.lr"]
    assert final["pooled"]["auroc"] is not None
    # the chosen candidate retrained with the same seeds reproduces its trial's validation result
    assert final["validation"]["auroc"] == pytest.approx(best["val_auroc"], abs=1e-6)
    for site in ("site-0", "site-1"):
        entries = SiteLedger(out / "ledger", site).verify()
        assert [e["round"] for e in entries if e.get("kind", "round") == "round"].count(1) == 3  # 2 trials + final
        assert entries[-1]["epsilon"] <= 8.0 + 1e-9
    assert all(a.passed for a in audit_run(out))
    report = (out / "report.md").read_text()
    assert "Hyperparameter search (validation only)" in report
    assert f"| {best['number'] + 1} (chosen) |" in report
