"""The model card ``fedfm export`` writes: every fact read from the run folder, none typed in.

The fixture writes a completed run folder the way a run does, without Flower: ``config.yaml`` as
``fedfm simulate`` writes it, hash-chained site ledgers under ``ledger/`` (the entries a site
appends each round), and ``adapter/`` + ``results.json`` from ``RunRecorder.finalize`` with test
predictions at three sites, one of them held out.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.eval.metrics import classification_metrics
from fedfm.export import export_run
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.privacy.ledger import SiteLedger
from fedfm.report.model_card import CARD_FILE, CARD_JSON, _model_md, card_facts, card_markdown, write_model_card
from fedfm.results import RunRecorder, SiteEvaluation

SITES = ("site-0", "site-1", "site-2")
N_TRAIN, N_VAL, N_TEST = 120, 15, 40
EPSILONS = {  # per site, per round: what the site's accountant reported
    "site-0": [1.2345678901234567, 2.718281828459045],
    "site-1": [0.8, 1.6180339887498949],
    "site-2": [0.3333333333333333, 0.6931471805599453],
}
SETTINGS = ["model.backbone=vit-tiny", "data.image_size=16", "data.num_sites=3", "data.samples_per_site=200",
            "lora.r=2", "privacy.accountant=rdp", "privacy.noise_multiplier=1.1", "federation.rounds=2",
            "eval.holdout_sites=[2]"]


def _append_ledger(run_dir, site: str, rnd: int, epsilon: float, delta: float) -> None:
    SiteLedger(run_dir / "ledger", site).append({
        "round": rnd, "steps": 8, "noise_multiplier": 1.1, "sample_rate": 0.1, "sampling": "poisson",
        "max_grad_norm": 1.0, "delta": delta, "accountant": "rdp", "accountant_library": "opacus test",
        "epsilon": epsilon, "budget_epsilon": 8.0, "n_train": N_TRAIN, "time": 1_700_000_000.0 + rnd,
    })


def _evaluation(rng) -> SiteEvaluation:
    labels = rng.integers(0, 2, N_TEST)
    probs = rng.dirichlet(np.ones(2), N_TEST)
    probs[np.arange(N_TEST), labels] += 0.6  # informative scores
    probs /= probs.sum(1, keepdims=True)
    counts = lambda n: [n // 3, n - n // 3]  # noqa: E731
    metrics = {**classification_metrics(probs, labels), "n-train": N_TRAIN, "n-val": N_VAL, "n-test": N_TEST,
               "label-counts-train": counts(N_TRAIN), "label-counts-val": counts(N_VAL),
               "label-counts-test": np.bincount(labels, minlength=2).tolist()}
    return SiteEvaluation(metrics, probs, labels)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A completed run folder (federated, sample-level DP, site-2 held out)."""
    config = load_config(None, SETTINGS)
    run_dir = tmp_path_factory.mktemp("card") / "run"
    model = build_global_model(config)
    recorder = RunRecorder(config, run_dir, model, full_model_bytes(model))
    trained = [s for s in SITES if s != "site-2"]
    for rnd in (1, 2):
        train = {}
        for site in trained:
            eps = EPSILONS[site][rnd - 1]
            _append_ledger(run_dir, site, rnd, eps, config.privacy.delta)
            train[site] = {"num-examples": N_TRAIN, "train-loss": 0.7, "epsilon": eps, "delta": config.privacy.delta}
        recorder.record_round(rnd, train, {}, {s: {"auroc": 0.7, "num-examples": N_VAL} for s in trained})
    rng = np.random.default_rng(0)
    results = recorder.finalize(adapter_state_dict(model), {s: _evaluation(rng) for s in SITES})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    assert results["status"] == "complete" and results["pooled_unseen"]
    return run_dir


def _copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _edit_results(run_dir, **changes) -> dict:
    path = run_dir / "results.json"
    results = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(results))
    return results


def _last_epsilon(run_dir, site: str) -> float:
    return SiteLedger(run_dir / "ledger", site).verify()[-1]["epsilon"]


def test_card_states_each_sites_ledger_epsilon_the_pooled_auroc_and_the_config_hash(run):
    card = card_markdown(run)
    results = json.loads((run / "results.json").read_text())
    for site in ("site-0", "site-1"):
        epsilon = _last_epsilon(run, site)
        assert epsilon == EPSILONS[site][-1]
        assert f"| {site} | {epsilon!r} | 1e-05 | rdp | 8.0 | 2 | ledger/{site}.jsonl (hash chain verified) |" in card
    pooled = results["pooled"]
    lo, hi = pooled["ci95"]["auroc"]
    assert f"| AUROC | {pooled['auroc']:.3f} | [{lo:.3f}, {hi:.3f}] |" in card
    config_hash = hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert f"Config SHA-256 (config.yaml): `{config_hash}`" in card

    facts = card_facts(run)
    assert facts["performance"]["pooled"]["auroc"] == {"value": pooled["auroc"], "ci95": pooled["ci95"]["auroc"]}
    assert {s["site"]: s["epsilon"] for s in facts["privacy"]["sites"]} == {
        "site-0": EPSILONS["site-0"][-1], "site-1": EPSILONS["site-1"][-1], "site-2": 0.0}
    assert facts["privacy"]["sites"][2]["source"] == "results.json (no ledger entry; held out, never trained)"
    assert "Rounds: 2 of 2" in card
    assert facts["provenance"]["config_sha256"] == config_hash
    unseen = results["pooled_unseen"]
    assert facts["performance"]["unseen"]["metrics"]["auroc"]["value"] == unseen["auroc"]
    assert f"Unseen (held-out) sites site-2, pooled ({unseen['n']} images):" in card


def test_card_sections_from_the_run_folder(run):
    card = card_markdown(run)
    for heading in ("## Model", "## Intended use", "## Data per site", "## Privacy", "## Performance",
                    "## Calibration", "## Known limitations", "## Provenance"):
        assert heading in card
    results = json.loads((run / "results.json").read_text())
    assert f"Trainable parameters: {results['communication']['trainable_params']:,}" in card
    assert "not a medical device" in card
    assert "Unit of privacy: one training example (image or volume) at a site" in card
    assert "| site-2 | held out | 120 | 15 | 40 | 40 / 80 | 5 / 10 |" in card
    assert "Backbone weights: random initialisation" in card  # vit-tiny has no published weights
    facts = card_facts(run)
    assert facts["model"]["feature_norm"] == "none" and "Head input:" not in card
    facts["model"]["feature_norm"] = "layer"  # an astra-ct run with model.feature_norm=layer says so
    assert "- Head input: each image's pooled features standardised across channels (model.feature_norm=layer)" in _model_md(facts)
    facts["model"].update(feature_stage=3, flip_average="horizontal")  # every option that shapes the head input is named
    assert ("- Head input: the encoder's stage 3 pooled, later stages not run (model.feature_stage=3); the mean of "
            "each image's and its left-right mirror's pooled features (model.flip_average=horizontal); each image's pooled "
            "features standardised across channels (model.feature_norm=layer)") in _model_md(facts)
    worst = results["worst_site"]
    assert f"Worst site: {worst['site']} (AUROC {worst['auroc']:.3f})" in card
    # limitations are derived from the facts
    assert f"Sites with fewer than 100 test images: site-0 ({N_TEST}), site-1 ({N_TEST}), site-2 ({N_TEST})" in card
    assert "Epsilon above 1 at site-0 (2.718), site-1 (1.618): a weak formal guarantee per image" in card
    assert "External evaluation is limited to the held-out site(s) site-2" in card
    assert "Trained and evaluated on synthetic images" in card
    assert "the widest is " in card


def test_missing_calibration_and_tuning_are_stated(run):
    card = card_markdown(run)
    facts = card_facts(run)
    assert facts["calibration"] is None and facts["privacy"]["tuning"] is None
    assert "No calibration fitted" in card
    assert "Tuning: no tuning trials recorded." in card
    assert "validation-based selection" not in card and "without DP noise" not in card


def test_a_fitted_calibration_shows_before_and_after(run, tmp_path):
    copy = _copy(run, tmp_path)
    results = json.loads((copy / "results.json").read_text())
    after = {**results["pooled"], "ece": 0.0421, "balanced_accuracy": 0.8125, "sensitivity": 0.75, "specificity": 0.875,
             "ci95": {**results["pooled"]["ci95"], "ece": [0.02, 0.09]}}
    _edit_results(copy, calibration={"temperature": 1.7, "threshold": 0.42, "n_val": 45}, pooled_calibrated=after)
    card = card_markdown(copy)
    before = results["pooled"]
    b_lo, b_hi = before["ci95"]["ece"]
    assert "Temperature 1.700" in card and "decision threshold 0.420" in card
    assert f"| ECE | {before['ece']:.3f} [{b_lo:.3f}, {b_hi:.3f}] | 0.042 [0.020, 0.090] |" in card
    for key, label, value in (("balanced_accuracy", "balanced accuracy", 0.8125), ("sensitivity", "sensitivity", 0.75),
                              ("specificity", "specificity", 0.875)):
        lo, hi = before["ci95"][key]
        a_lo, a_hi = after["ci95"][key]
        assert f"| {label} | {before[key]:.3f} [{lo:.3f}, {hi:.3f}] | {value:.3f} [{a_lo:.3f}, {a_hi:.3f}] |" in card
    assert "No calibration fitted" not in card
    assert "released without DP noise" in card
    cal = card_facts(copy)["calibration"]
    assert cal["temperature"] == 1.7 and cal["details"] == {"n_val": 45} and "- n val: 45" in card
    assert cal["after"]["ece"] == {"value": 0.0421, "ci95": [0.02, 0.09]}


def test_tuning_trials_and_their_epsilon_are_stated(run, tmp_path):
    copy = _copy(run, tmp_path)
    _edit_results(copy, tuning={"trials": [{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.001}], "chosen": 1, "privacy": {
        "site-0": {"trials": 3, "epsilon_total": 5.123456789, "ps_epsilon": 0.25},
        "site-1": {"trials": 3, "epsilon_total": 4.5, "ps_epsilon": None}}})
    card = card_markdown(copy)
    assert "Tuning: 3 trials, trial 2 chosen (from results.json)." in card
    assert "| site-0 | 3 | 5.123456789 | 0.25 |" in card and "| site-1 | 3 | 4.5 | - |" in card
    assert "Hyper-parameters were selected among 3 tuning trials by validation performance" in card


def test_a_tampered_ledger_is_flagged(run, tmp_path):
    copy = _copy(run, tmp_path)
    path = copy / "ledger" / "site-0.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[-1])
    entry["epsilon"] = 0.5
    path.write_text("\n".join([*lines[:-1], json.dumps(entry, sort_keys=True)]) + "\n")
    card = card_markdown(copy)
    assert "| site-0 | 0.5 | 1e-05 | rdp | 8.0 | 2 | ledger/site-0.jsonl (FAILS verification) |" in card
    assert "The ledger of site-0 fails verification" in card


@pytest.mark.parametrize("merge", [False, True])
def test_export_writes_the_card_with_the_exported_weights_hash(run, tmp_path, merge):
    out = tmp_path / "out"
    args = ["export", str(run), "--out", str(out)] + (["--merge"] if merge else [])
    assert main(args) == 0
    weights = out / ("model.safetensors" if merge else "adapter_model.safetensors")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = (out / CARD_FILE).read_text()
    assert f"`{weights.name}`, SHA-256 `{digest}`" in card
    assert ("merged model" if merge else "PEFT adapter") in card
    facts = json.loads((out / CARD_JSON).read_text())
    assert facts == card_facts(run, out)  # the JSON holds the facts the Markdown shows
    assert card == card_markdown(run, out)
    assert facts["model"]["weights_files"][0] == {
        "role": "exported merged model" if merge else "exported adapter", "file": weights.name,
        "sha256": digest, "bytes": weights.stat().st_size}


def test_a_run_without_ledgers_or_test_predictions_still_gets_a_card(tmp_path):
    config = load_config(None, ["model.backbone=vit-tiny", "data.image_size=16", "privacy.enabled=false"])
    model = build_global_model(config)
    run_dir = tmp_path / "bare"
    RunRecorder(config, run_dir, model, full_model_bytes(model)).finalize(adapter_state_dict(model), {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    folder = export_run(run_dir)
    card = (folder / CARD_FILE).read_text()
    assert "No pooled test metrics were recorded" in card
    assert "Unit of privacy: none" in card and "Trained without differential privacy" in card
    assert "No calibration fitted" in card and "no tuning trials recorded" in card
    again = write_model_card(run_dir, tmp_path / "again")  # a folder without weights: the run's adapter is hashed
    assert again == tmp_path / "again" / CARD_FILE and (tmp_path / "again" / CARD_JSON).is_file()
    assert "Weights (run adapter): `adapter/adapter_model.safetensors`" in again.read_text()


def test_bootstrap_intervals_the_card_reads_are_those_results_json_holds(run):
    """The card recomputes nothing: its site intervals are results.json's."""
    results = json.loads((run / "results.json").read_text())
    facts = card_facts(run)
    for row in facts["performance"]["sites"]:
        assert row["metrics"]["auroc"]["ci95"] == results["sites"][row["site"]]["test_ci95"]["auroc"]


def test_client_level_dp_states_both_units_and_the_servers_ledger_epsilon(run, tmp_path):
    copy = _copy(run, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["privacy"]["level"] = "both"
    config["eval"]["holdout_sites"] = []  # client-level DP: every sampled site trains
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for rnd, eps in ((1, 1.5), (2, 2.0794415416798357)):
        SiteLedger(copy / "ledger-federation", "client-level").append({
            "round": rnd, "steps": 1, "noise_multiplier": 1.0, "sample_rate": 1.0, "sampling": "no-amplification",
            "sampled_sites": 2, "population": 3, "max_grad_norm": 1.0, "delta": 1e-3, "accountant": "rdp",
            "epsilon": eps})
    card = card_markdown(copy)
    assert "one training example (image or volume) at a site: sample-level DP-SGD; one site (all of its training data)" in card
    assert ("Client-level DP (protects each site): epsilon 2.0794415416798357 at delta 0.001 after 2 releases "
            "(noise multiplier 1, clipping 1; from ledger-federation/client-level.jsonl).") in card
    assert "Client-level epsilon 2.079 > 1: a weak formal guarantee per site." in card


def test_a_search_s_tuning_file_is_read_when_results_json_has_no_tuning(run, tmp_path):
    copy = _copy(run, tmp_path)
    (copy / "tuning.json").write_text(json.dumps({
        "selection": "highest validation AUROC", "trials": [{"number": 0}, {"number": 1}], "chosen": 0}))
    card = card_markdown(copy)
    assert "Tuning: 2 trials, trial 1 chosen (from tuning.json); selection: highest validation AUROC." in card
    assert "Hyper-parameters were selected among 2 tuning trials by validation performance" in card


def test_the_variation_across_training_seeds_is_stated(run, tmp_path):
    copy = _copy(run, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["eval"]["seeds"] = [0, 1, 2]
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    results = json.loads((copy / "results.json").read_text())
    site = {"test_calibrated": {"balanced_accuracy": 0.55}}
    _edit_results(copy, pooled_calibrated={"balanced_accuracy": 0.61}, sites={**results["sites"], "site-1": site})
    aurocs = {1: 0.61, 2: 0.83}
    for seed, auroc in aurocs.items():
        folder = copy / "seeds" / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "status": "complete", "pooled": {"auroc": auroc}, "pooled_calibrated": {"balanced_accuracy": 0.7},
            "worst_site": {"auroc": auroc - 0.1},
            "sites": {"site-0": {"test_calibrated": {"balanced_accuracy": 0.6 + seed / 100}}}}))
    facts = card_facts(copy)["performance"]["seeds"]
    assert facts["exported_seed"] == 0 and [r["seed"] for r in facts["rows"]] == [0, 1, 2]
    values = [results["pooled"]["auroc"], *aurocs.values()]
    mean = sum(values) / 3
    std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
    card = card_markdown(copy)
    assert "this model is train.seed = 0" in card
    assert f"| 1 | 0.610 | 0.510 | 0.700 | 0.610 (site-0) |" in card
    assert f"| mean +/- std | {mean:.3f} +/- {std:.3f} |" in card
    assert (f"Across 3 training seeds the pooled test AUROC is {mean:.3f} +/- {std:.3f} (from {min(values):.3f} to "
            f"{max(values):.3f}): this model's value is one draw of it; the lowest site's balanced accuracy after "
            "calibration ranges from 0.550 to 0.620.") in card

    (copy / "seeds" / "seed-2" / "results.json").write_text(json.dumps({"status": "running"}))
    card = card_markdown(copy)  # an unfinished repeat is said, not a crash
    assert "Not available:" in card and "the variation across seeds is unknown" in card
    assert card_facts(run)["performance"]["seeds"] is None and "Across training seeds" not in card_markdown(run)
