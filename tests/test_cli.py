import json

from fedfm.cli import main


def test_bad_override_is_one_line_and_exit_2(capsys):
    assert main(["simulate", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfm: error: unknown config key 'train.lrr'") and "\n" not in err


def test_config_command_prints_the_resolved_tree(capsys):
    # quickstart: its (synthetic) data is there on any machine; `fedfm config` opens the data it checks
    assert main(["config", "configs/quickstart.yaml", "--set", "federation.rounds=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["federation"]["rounds"] == 2 and printed["model"]["backbone"] == "efficientnet-lite0"


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["simulate", "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"
