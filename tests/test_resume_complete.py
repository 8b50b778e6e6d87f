"""A run killed after its results but before its report and model card: ``--resume`` writes what
is missing from the saved results, without training, and says so; a run with everything written
is still already complete (fedfm simulate, and fedfm tune's final run)."""

import json
import shutil
from pathlib import Path

import pytest

import fedfm.study
from fedfm.cli import main
from fedfm.config import load_config

REPO = Path(__file__).resolve().parents[1]
RUN = ["data.num_sites=2", "federation.rounds=1", "data.samples_per_site=60", "data.image_size=16"]
WRITTEN_LAST = ["report.md", "report.html", "MODEL_CARD.md", "model_card.json"]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    out = fedfm.study.run_study(load_config(REPO / "configs" / "quickstart.yaml", RUN),
                                str(tmp_path_factory.mktemp("complete") / "run"))
    assert all((out / name).is_file() for name in WRITTEN_LAST)
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for name in WRITTEN_LAST:  # what the kill kept the end of the run from writing
        (to / name).unlink()
    return to


def _no_training(monkeypatch):
    def trains(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(fedfm.study, "run_simulation", trains)


def test_resume_of_a_complete_run_writes_its_missing_report_and_model_card_without_training(
        complete_run, tmp_path, monkeypatch, capsys):
    run = _copy(complete_run, tmp_path / "run")
    results, ledger = (run / "results.json").read_bytes(), (run / "ledger" / "site-0.jsonl").read_bytes()
    _no_training(monkeypatch)
    assert main(["simulate", "--resume", str(run)]) == 0
    assert all((run / name).is_file() for name in WRITTEN_LAST)
    assert "# Model card" in (run / "MODEL_CARD.md").read_text()
    assert (run / "results.json").read_bytes() == results and (run / "ledger" / "site-0.jsonl").read_bytes() == ledger
    assert not (run / "flwr-resumed.log").exists()
    said = [line for line in capsys.readouterr().out.splitlines() if "already complete" in line]
    assert len(said) == 1 and "writing its missing report.md, report.html, MODEL_CARD.md, model_card.json" in said[0]
    assert "no training" in said[0]


def test_resume_of_a_complete_run_with_everything_written_is_already_complete(complete_run, monkeypatch, capsys):
    _no_training(monkeypatch)
    assert main(["simulate", "--resume", str(complete_run)]) == 2
    assert "the run is already complete" in capsys.readouterr().err


def test_tune_resume_of_a_finished_search_writes_the_final_runs_missing_report(complete_run, tmp_path, monkeypatch,
                                                                              capsys):
    import fedfm.tune as tune

    def finished_trial(config, method, folder, ledger, verbose, resume):
        if not (folder / "results.json").exists():
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps({
                "status": "complete", "wall_time_s": 1.0,
                "validation": {"auroc": 0.7, "auroc_kind": "pooled", "pooled": {"auroc": 0.7}}}))
        return folder

    monkeypatch.setattr(tune, "run_trial", finished_trial)
    _no_training(monkeypatch)
    out = _copy(complete_run, tmp_path / "search")  # the search's final run completed; the kill came before its report
    (out / "trials").mkdir()
    config = load_config(REPO / "configs" / "quickstart.yaml", RUN)
    tune.run_tuning(config, {"train.lr": [0.03]}, out, resume=True)
    assert all((out / name).is_file() for name in WRITTEN_LAST)
    assert "writing its missing" in capsys.readouterr().out
