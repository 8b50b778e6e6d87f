"""The data is opened and checked before Flower starts: one line, exit 2, nothing in the run folder.

Every run command is called through ``fedfm.cli.main``; the functions that would start Flower
(``run_study``, ``deploy_local``) are replaced by ones that fail the test, except where a test
needs to see the config a run would get.
"""

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

import fedfm.deploy.local
import fedfm.study
from fedfm.appconfig import experiment_from_run_config
from fedfm.cli import main
from fedfm.config import DataConfig, load_config
from fedfm.data import load_sites
from fedfm.data.png import write_png
from fedfm.data.resolve import resolve_data
from fedfm.report.collect import run_summary
from fedfm.simulate import write_run_config

COUNTS = {"train": 40, "val": 10, "test": 20}
# a small MedMNIST-like run on any .npz: vit-tiny needs no weights
BASE = ["--set", "data.source=medmnist", "--set", "data.num_classes=null", "--set", "data.num_sites=2",
        "--set", "data.image_size=16", "--set", "model.backbone=vit-tiny"]


def write_npz(path: Path, classes: int = 2, sites: int | None = None, names=None, rgb: bool = False) -> Path:
    """Images 8x8 uint8, labels (N, 1) cycling 0..classes-1; optional natural site ids and names."""
    arrays = {}
    for split, n in COUNTS.items():
        images = np.random.default_rng(n).integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_images"] = np.stack([images] * 3, axis=-1) if rgb else images
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
        if sites:
            arrays[f"{split}_sites"] = np.arange(n) % sites
    if names is not None:
        arrays["site_names"] = np.array(names)
    np.savez(path, **arrays)
    return path


def write_folder(root: Path, classes_at: dict[str, list[str]]) -> Path:
    for site, classes in classes_at.items():
        for cls in classes:
            (root / site / cls).mkdir(parents=True)
            for i in range(5):
                write_png(root / site / cls / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
    return root


@pytest.fixture
def no_flower(monkeypatch):
    """Starting a run (Flower, a deployment) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run was started although the data check should have failed")

    monkeypatch.setattr(fedfm.study, "run_study", refuse)
    monkeypatch.setattr(fedfm.deploy.local, "deploy_local", refuse)


def fails_in_one_line(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fedfm: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"{out} holds {sorted(os.listdir(out))}"


def run_commands(target: list[str], out: Path) -> list[list[str]]:
    """simulate, deploy local and config on the same data and settings."""
    return [["simulate", *target, "--out", str(out)], ["deploy", "local", *target, "--out", str(out)],
            ["config", *target]]


# --- num_classes read from the data ----------------------------------------------------------------

def test_a_five_class_npz_without_num_classes_resolves_to_five_and_the_run_config_carries_it(tmp_path, monkeypatch,
                                                                                             capsys):
    npz = write_npz(tmp_path / "five.npz", classes=5)
    seen = {}

    def fake_run_study(config, out, **kwargs):  # what Flower would be handed, written as simulate writes it
        run_dir = Path(out)
        run_dir.mkdir()
        seen["run_config"] = write_run_config(config, run_dir)
        (run_dir / "results.json").write_text(json.dumps({"status": "paused"}))
        return run_dir

    monkeypatch.setattr(fedfm.study, "run_study", fake_run_study)
    assert main(["simulate", *BASE, "--set", f"data.path={npz}", "--out", str(tmp_path / "run")]) == 0
    run_config = tomllib.loads(seen["run_config"].read_text())
    config = experiment_from_run_config(run_config)  # as the ServerApp and every ClientApp read it
    assert config.data.num_classes == 5 and config.data.dataset == "five"
    assert "data five: 5 classes" in capsys.readouterr().out
    assert main(["config", *BASE, "--set", f"data.path={npz}"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["num_classes"] == 5


def test_num_classes_left_out_is_read_by_the_loaders_too(tmp_path):
    npz = write_npz(tmp_path / "five.npz", classes=5)
    sites = load_sites(DataConfig(source="medmnist", path=str(npz), num_sites=2, image_size=8))
    assert {s.num_classes for s in sites} == {5}
    folder = write_folder(tmp_path / "tree", {"a": ["x", "y", "z"], "b": ["x", "y", "z"]})
    sites = load_sites(DataConfig(source="folder", path=str(folder), num_sites=2, image_size=8))
    assert {s.num_classes for s in sites} == {3}


def test_synthetic_data_keeps_num_classes_from_the_config_default_two():
    assert DataConfig().num_classes == 2
    assert DataConfig(num_classes=4).num_classes == 4
    assert DataConfig(source="medmnist", path="x.npz").num_classes is None
    config = load_config(None, ["data.num_classes=null"])
    facts = resolve_data(config.data)
    assert config.data.num_classes == facts.num_classes == 2 and config.data.dataset == "synthetic"


def test_the_facts_are_what_the_loaders_make(tmp_path):
    npz = write_npz(tmp_path / "rgb.npz", classes=3, rgb=True)
    cfg = DataConfig(source="medmnist", path=str(npz), num_sites=2, image_size=8, partition="dirichlet", alpha=1.0)
    facts = resolve_data(cfg)
    sites = load_sites(cfg)
    assert facts.split_sizes == {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for s in sites}
    assert (facts.num_classes, facts.channels, facts.stored_shape) == (3, 3, (8, 8))
    assert facts.site_names == tuple(s.name for s in sites) and facts.info.channels == sites[0].channels


# --- a wrong or broken dataset: one line, exit 2, before Flower, nothing written ---------------------

def test_a_wrong_num_classes_fails_in_one_line_before_flower(tmp_path, capsys, no_flower):
    npz = write_npz(tmp_path / "five.npz", classes=5)
    out = tmp_path / "run"
    for argv in run_commands([*BASE, "--set", f"data.path={npz}", "--set", "data.num_classes=2"], out):
        fails_in_one_line(capsys, argv, f"data.num_classes=2 but data.path '{npz}' has labels up to 4",
                          "set data.num_classes=5 or leave it out")
        assert_nothing_written(out)
    for argv in run_commands([*BASE, "--set", f"data.path={npz}", "--set", "data.num_classes=7"], out):
        fails_in_one_line(capsys, argv, "data.num_classes=7", "set data.num_classes=5 or leave it out")
        assert_nothing_written(out)


def test_a_corrupt_npz_fails_in_one_line(tmp_path, capsys, no_flower):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "run"
    for argv in run_commands([*BASE, "--set", f"data.path={bad}"], out):
        fails_in_one_line(capsys, argv, f"data.path '{bad}' is not a readable .npz", "give a MedMNIST .npz")
        assert_nothing_written(out)


def test_a_truncated_npz_fails_in_one_line(tmp_path, capsys, no_flower):
    good = write_npz(tmp_path / "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails_in_one_line(capsys, ["simulate", *BASE, "--set", f"data.path={cut}", "--out", str(tmp_path / "run")],
                      "is not a readable .npz")
    assert_nothing_written(tmp_path / "run")


def test_a_folder_dataset_with_a_class_missing_at_a_site_fails_in_one_line(tmp_path, capsys, no_flower):
    root = write_folder(tmp_path / "hospitals", {"north": ["benign", "malignant"], "south": ["benign"]})
    out = tmp_path / "run"
    target = ["--set", "data.source=folder", "--set", f"data.path={root}", "--set", "data.num_sites=2",
              "--set", "data.num_classes=null", "--set", "data.image_size=16", "--set", "model.backbone=vit-tiny"]
    for argv in run_commands(target, out):
        fails_in_one_line(capsys, argv, f"data.path '{root}': site folder 'south' has no images of class malignant",
                          "add its images there, or fix a misspelled class folder name")
        assert_nothing_written(out)


def test_labels_out_of_range_fail_in_one_line(tmp_path, capsys, no_flower):
    npz = write_npz(tmp_path / "labels.npz")
    with np.load(npz) as raw:
        arrays = dict(raw)
    arrays["val_labels"] = arrays["val_labels"].astype(np.int64)
    arrays["val_labels"][3] = -1
    np.savez(npz, **arrays)
    out = tmp_path / "run"
    for argv in run_commands([*BASE, "--set", f"data.path={npz}"], out):
        fails_in_one_line(capsys, argv, f"data.path '{npz}': val_labels holds label -1", "renumber them from 0")
        assert_nothing_written(out)
    arrays["val_labels"][3] = 255  # e.g. an "unknown" label in a binary task
    np.savez(npz, **arrays)
    for argv in run_commands([*BASE, "--set", f"data.path={npz}", "--set", "data.num_classes=2"], out):
        fails_in_one_line(capsys, argv, "data.num_classes=2 but", "has labels up to 255", "set data.num_classes=256")
        assert_nothing_written(out)
    arrays["val_labels"][3] = 1
    arrays["train_labels"] = np.where(arrays["train_labels"] == 1, 2, 0).astype(np.uint8)  # no class 1 to train on
    np.savez(npz, **arrays)
    fails_in_one_line(capsys, ["simulate", *BASE, "--set", f"data.path={npz}", "--out", str(out)],
                      "no train_labels of class 1")
    assert_nothing_written(out)


def test_mismatched_site_names_fail_in_one_line(tmp_path, capsys, no_flower):
    npz = write_npz(tmp_path / "natural.npz", sites=3, names=["north", "south"])
    out = tmp_path / "run"
    target = [*BASE, "--set", f"data.path={npz}", "--set", "data.partition=natural", "--set", "data.num_sites=3"]
    for argv in run_commands(target, out):
        fails_in_one_line(capsys, argv, f"data.path '{npz}' lists 2 site_names (north, south) for 3 sites",
                          "give site_names one name per site id")
        assert_nothing_written(out)
    write_npz(npz, sites=3, names=["north", "south", "north"])
    fails_in_one_line(capsys, ["simulate", *target, "--out", str(out)], "site_names repeats north")
    write_npz(npz, sites=3, names=["north", "south", "east"])
    fails_in_one_line(capsys, ["simulate", *target[:-1], "data.num_sites=2", "--out", str(out)],
                      "data.num_sites=2 but", "3 distinct site ids", "set data.num_sites=3")
    assert_nothing_written(out)


def test_too_few_examples_for_the_sites_fail_before_flower(tmp_path, capsys, no_flower):
    npz = write_npz(tmp_path / "small.npz")
    fails_in_one_line(capsys, ["simulate", *BASE, "--set", f"data.path={npz}", "--set", "data.num_sites=30",
                               "--out", str(tmp_path / "run")], "data.num_sites=30", "examples")
    assert_nothing_written(tmp_path / "run")


def test_nothing_is_written_to_the_default_run_folder_either(tmp_path, capsys, no_flower, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"\x00" * 100)
    fails_in_one_line(capsys, ["simulate", *BASE, "--set", f"data.path={bad}"], "is not a readable .npz")
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_whose_data_changed_fails_and_keeps_its_config(tmp_path, capsys, no_flower):
    npz = write_npz(tmp_path / "data.npz", classes=2)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.json").write_text("{}")
    config = load_config(None, ["data.source=medmnist", f"data.path={npz}", "data.num_classes=null", "data.num_sites=2"])
    resolve_data(config.data)
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    before = (run_dir / "config.yaml").read_text()
    write_npz(npz, classes=4)  # the data was replaced since the run started
    fails_in_one_line(capsys, ["simulate", "--resume", str(run_dir)], "data.num_classes=2 but", "labels up to 3")
    assert (run_dir / "config.yaml").read_text() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "config.yaml"]


# --- the name the report gives the data comes from the data -----------------------------------------

def test_the_dataset_name_comes_from_the_file_not_from_data_name(tmp_path, capsys):
    npz = write_npz(tmp_path / "my-hospital-ultrasound.npz")
    assert main(["config", "configs/breast.yaml", "--set", f"data.path={npz}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["name"] == "breastmnist" and printed["data"]["dataset"] == "my-hospital-ultrasound"
    config = load_config("configs/breast.yaml", [f"data.path={npz}"])
    resolve_data(config.data)
    assert run_summary(config, {})["data"] == "my-hospital-ultrasound"


def test_the_dataset_name_of_a_folder_is_the_folder_name_and_a_wrong_one_is_refused(tmp_path, capsys, no_flower):
    root = write_folder(tmp_path / "clinic-export", {"a": ["x", "y"], "b": ["x", "y"]})
    config = load_config(None, ["data.source=folder", f"data.path={root}", "data.num_sites=2", "data.num_classes=null"])
    facts = resolve_data(config.data)
    assert (config.data.dataset, config.data.num_classes, facts.channels) == ("clinic-export", 2, 1)
    assert run_summary(config, {})["data"] == "clinic-export"
    npz = write_npz(tmp_path / "other.npz")
    fails_in_one_line(capsys, ["simulate", *BASE, "--set", f"data.path={npz}", "--set", "data.dataset=breastmnist",
                               "--out", str(tmp_path / "run")], "data.dataset='breastmnist' but", "'other'",
                      "leave data.dataset out")
    assert_nothing_written(tmp_path / "run")


def test_a_run_recorded_before_data_dataset_existed_is_named_from_its_path():
    config = load_config("configs/breast.yaml", ["data.path=/somewhere/else/otherdata.npz"])
    assert config.data.dataset is None
    assert run_summary(config, {})["data"] == "otherdata"
