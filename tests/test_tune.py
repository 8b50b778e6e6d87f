"""fedfm tune: candidates, validation-only trials, and a selector that never sees a test metric."""

import dataclasses
import json

import pytest

from fedfm.config import ConfigError, load_config
from fedfm.tune import Candidate, Trial, candidates, final_config, parse_grid, read_trial, select, trial_config


def test_grid_is_every_combination_typed_like_set():
    grid = parse_grid(["train.lr=0.01,0.03", "lora.variant=lora,head"])
    assert grid == {"train.lr": [0.01, 0.03], "lora.variant": ["lora", "head"]}
    found = candidates(grid)
    assert [c.values for c in found] == [
        {"train.lr": 0.01, "lora.variant": "lora"}, {"train.lr": 0.01, "lora.variant": "head"},
        {"train.lr": 0.03, "lora.variant": "lora"}, {"train.lr": 0.03, "lora.variant": "head"},
    ]


@pytest.mark.parametrize("items, message", [
    (["train.lr"], "section.key=v1,v2"),
    (["train.lr=0.1", "train.lr=0.2"], "twice"),
    (["train.lr="], "no values"),
    ([], "at least one --grid"),
])
def test_bad_grids_fail_in_one_line(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_trials_never_evaluate_test_and_budget_covers_every_run():
    config = load_config(None, ["eval.baselines=[centralized]", "eval.leave_one_site_out=true"])
    trial = trial_config(config, Candidate(0, {"train.lr": 0.05}), runs=5)
    assert trial.eval.test is False and trial.eval.baselines == [] and not trial.eval.leave_one_site_out
    assert trial.train.lr == 0.05 and trial.privacy.runs_in_budget == 5
    final = final_config(config, Candidate(0, {"train.lr": 0.05}), runs=5)
    assert final.eval.test is True and final.eval.baselines == ["centralized"] and final.privacy.runs_in_budget == 5


def test_a_bad_candidate_is_named_before_anything_runs():
    from fedfm.tune import check_candidates

    config = load_config(None)
    with pytest.raises(ConfigError, match="candidate .*train.lrr"):
        check_candidates(config, candidates(parse_grid(["train.lrr=0.1,0.2"])))


def _write_run(folder, val_auroc, test_auroc):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "status": "complete", "wall_time_s": 12.5,
        "validation": {"auroc": val_auroc, "auroc_kind": "pooled", "pooled": {"auroc": val_auroc, "ece": 0.1}},
        "pooled": {"auroc": test_auroc}, "sites": {"site-0": {"test": {"auroc": test_auroc}}},
    }))


def test_selector_sees_validation_only(tmp_path):
    # trial 0 is better on validation, trial 1 on test: validation must win, and test must not be visible
    _write_run(tmp_path / "a", val_auroc=0.90, test_auroc=0.60)
    _write_run(tmp_path / "b", val_auroc=0.80, test_auroc=0.99)
    trials = [read_trial(tmp_path / "a", Candidate(0, {"train.lr": 0.1})),
              read_trial(tmp_path / "b", Candidate(1, {"train.lr": 0.3}))]
    seen = json.dumps([dataclasses.asdict(t) for t in trials])
    assert "0.6" not in seen and "0.99" not in seen  # no test number reaches the selector
    assert {f.name for f in dataclasses.fields(Trial)} == {
        "number", "values", "val_auroc", "val_auroc_kind", "val_metrics", "wall_s", "status"}
    assert select(trials).number == 0


def test_selector_breaks_ties_by_order_and_skips_unfinished():
    def trial(number, auroc, status="complete"):
        return Trial(number, {}, auroc, "pooled", {}, 1.0, status)

    assert select([trial(0, 0.8), trial(1, 0.8), trial(2, 0.95, "running")]).number == 0
    with pytest.raises(RuntimeError, match="no trial"):
        select([trial(0, None)])


def test_random_search_draws_a_geometric_number_of_grid_points():
    from fedfm.tune import random_candidates

    grid = parse_grid(["train.lr=0.01,0.03,0.1"])
    counts = [len(random_candidates(grid, 4.0, seed)) for seed in range(400)]
    assert min(counts) >= 1 and abs(sum(counts) / len(counts) - 4.0) < 0.5  # E[K] = 4
    drawn = random_candidates(grid, 4.0, 7)
    assert drawn == random_candidates(grid, 4.0, 7)  # the seed replays the search
    assert all(c.values["train.lr"] in (0.01, 0.03, 0.1) for c in drawn)
    assert len({c.values["train.seed"] for c in drawn}) == len(drawn)  # independent trials
    for bad in (1.0, float("nan"), float("inf")):  # nan <= 1 is false: a plain comparison let it through
        with pytest.raises(ConfigError, match="must be a finite number > 1"):
            random_candidates(grid, bad, 0)


def test_random_search_bound_matches_the_theorem_for_identical_trials(tmp_path):
    from fedfm.privacy.ledger import SiteLedger
    from fedfm.privacy.tuning import ps_epsilon
    from fedfm.audit.search import tuning_privacy

    sigma, q, steps, rounds = 1.1, 0.05, 40, 3
    trials = []
    for number in range(3):
        folder = tmp_path / "trials" / f"trial-{number:03d}"
        folder.mkdir(parents=True)
        train = {"site-0": {"noise-multiplier": sigma, "sample-rate": q, "steps": steps}}
        (folder / "results.json").write_text(json.dumps({"rounds": [{"train": train}] * rounds}))
        trials.append({"number": number})
    (tmp_path / "tuning.json").write_text(json.dumps({"search": "random", "random_trials_mean": 5.0, "trials": trials}))
    ledger = SiteLedger(tmp_path / "ledger", "site-0")
    for _ in range(3 * rounds):
        ledger.append({"round": 1, "steps": steps, "noise_multiplier": sigma, "sample_rate": q, "delta": 1e-5,
                       "accountant": "rdp", "epsilon": 0.0})
    spent = tuning_privacy(tmp_path)["site-0"]
    expected = ps_epsilon(sigma, q, steps * rounds, 1e-5, "tnb", eta=1.0, gamma=0.2)
    assert spent["ps_epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
    assert spent["ps_epsilon"] < spent["epsilon_total"]  # the bound is sharper than composing 3 trials


def test_a_baseline_that_diverges_at_every_candidate_is_left_out_of_the_test_study(tmp_path, monkeypatch):
    import fedfm.study
    import fedfm.tune as tune

    aurocs = {"federated": [0.8, 0.9], "centralized_nodp": [None, None], "federated_nodp": [0.7, 0.6]}

    def fake_trial(config, method, folder, ledger, verbose, resume):
        number = int(folder.name.split("-")[-1])
        _write_run(folder, val_auroc=aurocs[method][number], test_auroc=0.5)
        return folder

    studied = {}
    monkeypatch.setattr(tune, "run_trial", fake_trial)
    monkeypatch.setattr(fedfm.study, "run_study", lambda config, out, verbose, resume: studied.setdefault("config", config))
    config = load_config(None, ["eval.baselines=[centralized_nodp, federated_nodp]"])
    tune.run_tuning(config, {"train.lr": [0.001, 0.005]}, tmp_path / "study")
    final = studied["config"]
    assert final.eval.baselines == ["federated_nodp"] and final.train.lr == 0.005
    assert final.eval.baseline_overrides == {"federated_nodp": ["train.lr=0.001"]}
    methods = json.loads((tmp_path / "study" / "tuning.json").read_text())["methods"]
    assert methods["centralized_nodp"]["diverged"] and methods["centralized_nodp"]["chosen"] is None
    assert not methods["federated_nodp"]["diverged"] and methods["federated_nodp"]["chosen"] == 0


@pytest.mark.parametrize("items, message", [
    (["centralized_nodp"], "METHOD:section.key=v1,v2"),
    (["centrallized:train.lr=0.1,0.2"], "not one of"),
    (["local:train.lr=0.1,0.2"], "the study has no local"),
    (["centralized_nodp:train.lr=0.1,0.2,0.3"], "3 candidates, the shared --grid has 2"),
])
def test_bad_method_grids_fail_in_one_line(items, message):
    from fedfm.tune import parse_method_grids

    with pytest.raises(ConfigError, match=message):
        parse_method_grids(items, {"train.lr": [0.03, 0.1]}, ["federated", "centralized_nodp"])


def test_a_method_grid_replaces_only_the_keys_it_names():
    from fedfm.tune import parse_method_grids

    grids = parse_method_grids(["centralized_nodp:train.lr=0.001,0.003", "centralized_nodp:train.optimizer=adam"],
                               {"train.lr": [0.03, 0.1], "train.local_epochs": [1]}, ["federated", "centralized_nodp"])
    assert grids == {"centralized_nodp": {"train.lr": [0.001, 0.003], "train.local_epochs": [1], "train.optimizer": ["adam"]}}


def test_each_method_trains_and_is_tested_with_its_own_grid(tmp_path, monkeypatch):
    import fedfm.study
    import fedfm.tune as tune
    from fedfm.study import baseline_config

    seen = {}

    def fake_trial(config, method, folder, ledger, verbose, resume):
        number = int(folder.name.split("-")[-1])
        part = config if method == "federated" else baseline_config(config, method)
        seen.setdefault(method, []).append((part.train.lr, part.train.local_epochs))
        _write_run(folder, val_auroc=[0.9, 0.8][number], test_auroc=0.5)
        return folder

    studied = {}
    monkeypatch.setattr(tune, "run_trial", fake_trial)
    monkeypatch.setattr(fedfm.study, "run_study", lambda config, out, verbose, resume: studied.setdefault("config", config))
    # a fixed override of the config stays, and the searched value wins over one of the same key
    config = load_config(None, ["eval.baselines=[centralized_nodp]",
                                "eval.baseline_overrides={centralized_nodp: [train.local_epochs=2, train.lr=0.5]}"])
    tune.run_tuning(config, {"train.lr": [0.03, 0.1]}, tmp_path / "study",
                    method_grids={"centralized_nodp": {"train.lr": [0.001, 0.003]}})
    assert [lr for lr, _ in seen["federated"]] == [0.03, 0.1]
    assert seen["centralized_nodp"] == [(0.001, 2.0), (0.003, 2.0)]
    final = studied["config"]
    assert final.train.lr == 0.03
    assert baseline_config(final, "centralized_nodp").train.lr == 0.001
    assert baseline_config(final, "centralized_nodp").train.local_epochs == 2.0
    methods = json.loads((tmp_path / "study" / "tuning.json").read_text())["methods"]
    assert methods["centralized_nodp"]["grid"] == {"train.lr": [0.001, 0.003]}
    assert methods["federated"]["grid"] == {"train.lr": [0.03, 0.1]}
    assert methods["centralized_nodp"]["chosen_values"] == {"train.lr": 0.001}


def test_resume_refuses_a_method_whose_trials_searched_other_values(tmp_path, monkeypatch):
    import shutil

    import fedfm.study
    import fedfm.tune as tune

    def fake_trial(config, method, folder, ledger, verbose, resume):
        if not (folder / "results.json").exists():
            _write_run(folder, val_auroc=0.8, test_auroc=0.5)
        return folder

    monkeypatch.setattr(tune, "run_trial", fake_trial)
    monkeypatch.setattr(fedfm.study, "run_study", lambda config, out, verbose, resume: out)
    config = load_config(None, ["eval.baselines=[centralized_nodp]"])
    out = tmp_path / "study"
    tune.run_tuning(config, {"train.lr": [0.03, 0.1]}, out)
    other = {"centralized_nodp": {"train.lr": [0.001, 0.003]}}
    with pytest.raises(ConfigError, match="centralized_nodp's trials .* remove"):
        tune.run_tuning(config, {"train.lr": [0.03, 0.1]}, out, resume=True, method_grids=other)
    shutil.rmtree(out / "trials" / "centralized_nodp")  # what the message says: the method is searched again
    tune.run_tuning(config, {"train.lr": [0.03, 0.1]}, out, resume=True, method_grids=other)
    methods = json.loads((out / "tuning.json").read_text())["methods"]
    assert methods["centralized_nodp"]["grid"] == {"train.lr": [0.001, 0.003]}
