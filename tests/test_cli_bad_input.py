"""Bad input on the command line fails before anything starts: one line ``fedfm: error: ...`` that
names the flag or key, the bad value and the fix, exit 2, no traceback, nothing created.

Every function that would start work (Flower, a deployment, a search's trials, a soak, a bench, an
export, a report) is replaced by one that fails the test, so a check that stops working shows up as
a failed test rather than as a run.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import fedfm.bench
import fedfm.chaos.soak
import fedfm.deploy.local
import fedfm.export
import fedfm.report
import fedfm.simulate
import fedfm.study
import fedfm.tune
from fedfm.cli import main
from fedfm.data.png import write_png

QUICK = ["--set", "data.samples_per_site=10", "--set", "data.image_size=16"]


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started although the input check should have failed")

    for module, name in [(fedfm.study, "run_study"), (fedfm.simulate, "run_simulation"), (fedfm.tune, "run_trial"),
                         (fedfm.deploy.local, "deploy_local"), (fedfm.chaos.soak, "soak"), (fedfm.bench, "run_bench"),
                         (fedfm.export, "export_run"), (fedfm.report, "write_report")]:
        monkeypatch.setattr(module, name, refuse)


def fails_in_one_line(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fedfm: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in err, err
    return err


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder\n")
    return path


# --- 1a, 1b: the config file itself -------------------------------------------------------------------

def test_a_binary_config_file_is_not_a_traceback(tmp_path, capsys):
    npz = tmp_path / "data.npz"
    np.savez(npz, a=np.arange(100))
    fails_in_one_line(capsys, ["config", str(npz)], f"'{npz}' is not a text file", "pass a YAML file")


def test_a_folder_as_the_config_says_it_is_a_folder(tmp_path, capsys):
    fails_in_one_line(capsys, ["config", str(tmp_path)], f"'{tmp_path}' is a folder", "pass a YAML file")


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: synthetic\nfederation: {rounds: [2}\n")
    fails_in_one_line(capsys, ["config", str(bad)], f"'{bad}' line 3, column", "fix the YAML")


# --- 1c: --random-trials ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "1", "-2"])
def test_random_trials_must_be_a_finite_number_above_one(value, tmp_path, capsys, nothing_starts):
    fails_in_one_line(capsys, ["tune", "--grid", "train.lr=0.1,0.2", "--random-trials", value,
                               "--out", str(tmp_path / "search")],
                      f"--random-trials {float(value)}", "finite number > 1")
    assert not (tmp_path / "search").exists()


# --- 1d, 1e: --out names a file -----------------------------------------------------------------------

OUT_COMMANDS = {
    "simulate": lambda out, tmp: ["simulate", *QUICK, "--out", out],
    "tune": lambda out, tmp: ["tune", "--grid", "train.lr=0.1,0.2", "--out", out],
    "export": lambda out, tmp: ["export", str(tmp), "--out", out],
    "report": lambda out, tmp: ["report", str(tmp), "--out", out],
    "deploy init": lambda out, tmp: ["deploy", "init", "--sites", "2", "--out", out],
    "deploy keygen": lambda out, tmp: ["deploy", "keygen", "--site", "0", "--out", out],
    "deploy local": lambda out, tmp: ["deploy", "local", *QUICK, "--out", out],
    "audit": lambda out, tmp: ["audit", str(tmp), "--out", out],
    "bench": lambda out, tmp: ["bench", "--quick", "--out", out],
    "chaos": lambda out, tmp: ["chaos", "--out", out],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_naming_a_file_fails_before_anything(command, tmp_path, capsys, nothing_starts):
    afile = a_file(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    err = fails_in_one_line(capsys, OUT_COMMANDS[command](str(afile), tmp_path),
                            f"--out {afile} is a file: give a folder (it is created if missing)")
    assert afile.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, err


def test_out_under_a_file_names_the_file(tmp_path, capsys, nothing_starts):
    afile = a_file(tmp_path)
    fails_in_one_line(capsys, ["simulate", *QUICK, "--out", str(afile / "run")],
                      f"--out {afile / 'run'}: {afile} is a file")


def test_simulate_prints_nothing_before_refusing_a_file_as_out(tmp_path, capsys, nothing_starts):
    afile = a_file(tmp_path)
    assert main(["simulate", *QUICK, "--out", str(afile)]) == 2
    assert capsys.readouterr().out == ""  # not even the data line


def test_output_dir_naming_a_file_fails_before_anything(tmp_path, capsys, nothing_starts):
    afile = a_file(tmp_path)
    fails_in_one_line(capsys, ["simulate", *QUICK, "--set", f"output.dir={afile}"], f"output.dir {afile} is a file")


def test_deploy_local_state_naming_a_file_fails(tmp_path, capsys, nothing_starts):
    afile = a_file(tmp_path)
    fails_in_one_line(capsys, ["deploy", "local", *QUICK, "--state", str(afile)], f"--state {afile} is a file")


def test_predict_out_naming_a_folder_fails(tmp_path, capsys):
    fails_in_one_line(capsys, ["predict", str(tmp_path), "x.png", "--out", str(tmp_path)],
                      f"--out {tmp_path} is a folder", "CSV file")


def _ledger(folder: Path) -> None:
    from fedfm.privacy.accountant import SiteAccountant, StepBatch
    from fedfm.privacy.ledger import SiteLedger

    ledger, accountant = SiteLedger(folder, "site-0"), SiteAccountant("prv")
    batch = StepBatch(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    accountant.add(batch)
    ledger.append({"round": 1, "steps": 10, "noise_multiplier": 1.0, "sample_rate": 0.01, "sampling": "poisson",
                   "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "prv", "epsilon": accountant.epsilon(1e-5),
                   "budget_epsilon": 8.0})


def test_audit_out_that_does_not_exist_yet_is_created(tmp_path, capsys):
    _ledger(tmp_path / "ledgers")
    out = tmp_path / "new" / "audit"
    assert main(["audit", str(tmp_path / "ledgers"), "--out", str(out)]) in (0, 1)  # the verdict is not the point
    assert (out / "audit.json").is_file() and (out / "audit.md").is_file()


# --- 2: messages that say what is wrong ---------------------------------------------------------------

def test_missing_data_path_says_so_before_the_medmnist_package(monkeypatch, capsys, nothing_starts):
    monkeypatch.setitem(sys.modules, "medmnist", None)
    monkeypatch.setitem(sys.modules, "medmnist.info", None)
    err = fails_in_one_line(capsys, ["config", "configs/breast.yaml", "--set", "data.path=/nonexistent/x.npz"],
                            "data.path '/nonexistent/x.npz' does not exist", "point data.path at the .npz",
                            "pip install --no-deps medmnist")
    assert err.index("does not exist") < err.index("medmnist package")


def test_data_path_that_is_a_folder_says_it_is_a_folder(tmp_path, capsys):
    fails_in_one_line(capsys, ["config", "configs/breast.yaml", "--set", f"data.path={tmp_path}"],
                      f"data.path '{tmp_path}' is a folder", ".npz file")


def test_an_empty_folder_source_says_it_has_no_site_folders(tmp_path, capsys):
    err = fails_in_one_line(capsys, ["config", "--set", "data.source=folder", "--set", f"data.path={tmp_path}"],
                            f"data.path '{tmp_path}' has no site folders", "<root>/<site>/<class>/")
    assert "num_sites=0" not in err


def test_audit_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    fails_in_one_line(capsys, ["audit", str(missing)], f"RUN_DIR {missing} does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("override, fix", [
    ("eval.baselines=[foo]", "--set 'eval.baselines=[...]', the whole list"),
    ("eval.baseline_overrides={foo: [train.lr=0.1]}", "--set 'eval.baseline_overrides={...}', the whole mapping"),
])
def test_a_bad_list_item_or_mapping_key_suggests_a_set_that_works(override, fix, capsys):
    err = fails_in_one_line(capsys, ["config", "--set", override], "'foo'", fix)
    assert ".0=" not in err and "[key]" not in err


def test_a_bad_method_grid_candidate_names_the_method_grid(tmp_path, capsys, nothing_starts):
    err = fails_in_one_line(capsys, ["tune", *QUICK, "--grid", "train.lr=0.1,0.2", "--set", "eval.baselines=[local]",
                                     "--method-grid", "local:train.lr=0,1", "--out", str(tmp_path / "s")],
                            "--method-grid local candidate", "train.lr")
    assert "--grid candidate" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["--rounds", "--sites"])
def test_chaos_checks_its_flags_before_creating_out(flag, tmp_path, capsys, nothing_starts):
    out = tmp_path / "chaos"
    err = fails_in_one_line(capsys, ["chaos", flag, "0", "--out", str(out)], f"{flag} 0", "at least one")
    assert "--set" not in err
    assert not out.exists()


# --- 3: accepted silently, or failing late --------------------------------------------------------------

def test_config_checks_the_backbone(capsys):
    fails_in_one_line(capsys, ["config", "--set", "model.backbone=nope"], "model.backbone='nope' is not a known backbone")


def test_deploy_local_checks_the_backbone_before_any_process(tmp_path, capsys, nothing_starts):
    fails_in_one_line(capsys, ["deploy", "local", *QUICK, "--set", "model.backbone=nope", "--out", str(tmp_path / "r")],
                      "model.backbone='nope' is not a known backbone")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("backbone", ["vit-tiny", "efficientnet-lite0"])
def test_a_missing_weights_path_fails_before_a_run(backbone, tmp_path, capsys, nothing_starts):
    missing = tmp_path / "nonexistent.pt"
    fails_in_one_line(capsys, ["simulate", *QUICK, "--set", f"model.backbone={backbone}",
                               "--set", f"model.weights_path={missing}", "--out", str(tmp_path / "r")],
                      f"model.weights_path='{missing}' does not exist", "null it")
    assert not (tmp_path / "r").exists()


def test_a_weights_path_that_is_a_folder_fails(tmp_path, capsys):
    fails_in_one_line(capsys, ["config", "--set", "model.backbone=vit-tiny", "--set", f"model.weights_path={tmp_path}"],
                      "is a folder", "state-dict file")


def test_an_hf_folder_that_does_not_exist_fails_before_a_run(tmp_path, capsys, nothing_starts):
    missing = tmp_path / "no-model"
    fails_in_one_line(capsys, ["simulate", *QUICK, "--set", f"model.backbone=hf:{missing}", "--out", str(tmp_path / "r")],
                      f"model.backbone='hf:{missing}'", "does not exist", "save_pretrained")


def test_an_hf_backbone_refuses_a_weights_path_before_a_run(tmp_path, capsys):
    fails_in_one_line(capsys, ["config", "--set", f"model.backbone=hf:{tmp_path}", "--set", "model.weights_path=x.pt"],
                      "model.weights_path is not used for hf: backbones")


def test_min_train_sites_above_the_training_sites_fails(capsys, nothing_starts):
    fails_in_one_line(capsys, ["simulate", *QUICK, "--set", "data.num_sites=3", "--set", "eval.holdout_sites=[2]",
                               "--set", "federation.min_train_sites=3"],
                      "federation.min_train_sites=3 but only 2 sites train", "at most 2")


@pytest.mark.parametrize("value, fragment", [("-1", "--until-round -1"), ("4", "--until-round 4: the run has federation.rounds=3")])
def test_until_round_outside_the_run_fails(value, fragment, tmp_path, capsys, nothing_starts):
    fails_in_one_line(capsys, ["simulate", *QUICK, "--set", "federation.rounds=3", "--until-round", value,
                               "--out", str(tmp_path / "r")], fragment)
    assert not (tmp_path / "r").exists()


def test_resume_of_a_folder_without_a_search_fails(tmp_path, capsys, nothing_starts):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_in_one_line(capsys, ["tune", *QUICK, "--grid", "train.lr=0.1,0.2", "--resume", "--out", str(empty)],
                      f"--resume: {empty} holds no search", "drop --resume")
    assert not any(empty.iterdir())


def test_deploy_local_refuses_zero_sites(capsys, nothing_starts):
    fails_in_one_line(capsys, ["deploy", "local", *QUICK, "--sites", "0"], "--sites 0", "at least one site")


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf"])
def test_deploy_init_refuses_a_budget_that_is_not_a_positive_number(budget, tmp_path, capsys):
    out = tmp_path / "dep"
    fails_in_one_line(capsys, ["deploy", "init", "--sites", "2", "--budget", budget, "--out", str(out)],
                      f"--budget {float(budget)}", "finite number > 0")
    assert not out.exists()


@pytest.mark.parametrize("only", ["", " , "])
def test_bench_only_with_no_part_fails(only, tmp_path, capsys, nothing_starts):
    fails_in_one_line(capsys, ["bench", "--only", only, "--out", str(tmp_path / "b")], "names no part", "steps")
    assert not (tmp_path / "b").exists()


def test_audit_refuses_negative_canaries(tmp_path, capsys):
    fails_in_one_line(capsys, ["audit", str(tmp_path), "--canaries", "-3"], "--canaries -3", ">= 0")


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=.inf", "config key 'train.lr' = inf: Input should be a finite number"),
    ("federation.round_timeout_s=.nan", "config key 'federation.round_timeout_s' = nan: Input should be a finite number"),
    ("data.site_shift=.inf", "config key 'data.site_shift' = inf: Input should be a finite number"),
    ("eval.seeds=[0, 0]", "eval.seeds=[0, 0] lists a seed twice"),
])
def test_config_refuses_inf_nan_and_duplicate_seeds(override, fragment, capsys):
    fails_in_one_line(capsys, ["config", "--set", override], fragment)


def test_a_folder_source_check_still_accepts_a_good_layout(tmp_path, capsys):
    """The no-site-folders message does not fire on a folder that has them."""
    for site in ("a", "b"):
        for cls in ("0", "1"):
            (tmp_path / site / cls).mkdir(parents=True)
            for i in range(4):
                write_png(tmp_path / site / cls / f"{i}.png", np.full((8, 8), 30 * i, np.uint8))
    assert main(["config", "--set", "data.source=folder", "--set", f"data.path={tmp_path}",
                 "--set", "data.num_sites=2", "--set", "model.backbone=vit-tiny"]) == 0
