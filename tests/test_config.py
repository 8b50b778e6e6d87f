from pathlib import Path

import pytest

from fedfm.config import ConfigError, ExperimentConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)


def test_shipped_configs_comment_every_field():
    for path in CONFIGS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith(":"):
                continue  # blank, comment, or section header
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_there_are_the_three_required_configs():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "pneumonia.yaml", "breast.yaml"} <= names


def test_override_is_typed_and_applied():
    config = load_config(CONFIGS[0], ["train.lr=0.01", "privacy.enabled=false", "privacy.budget.epsilon=3"])
    assert config.train.lr == 0.01 and config.privacy.enabled is False
    assert config.privacy.budget.epsilon == 3.0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "unknown config key 'train.lrr': valid keys in 'train' are"),
        ("trian.lr=1", "unknown config key 'trian': valid keys at the top level are data"),
        ("train.lr=abc", "config key 'train.lr' = 'abc'"),
        ("federation.rounds=0", "config key 'federation.rounds' = 0: Input should be greater than or equal to 1"),
        ("data.partition=random", "config key 'data.partition' = 'random'"),
        ("train.lr", "is not of the form section.key=value"),
        ("train.lr.x=1", "'train.lr' is a value, not a section"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS[0], [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="privacy.noise_multiplier or privacy.target_epsilon"):
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=3"])
    with pytest.raises(ConfigError, match="data.source=folder needs data.path"):
        load_config(None, ["data.source=folder"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line 2, column 1: .*: fix the YAML$") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_min_train_sites_must_fit_the_sites_that_train():
    load_config(None, ["data.num_sites=3", "federation.min_train_sites=3"])
    with pytest.raises(ConfigError, match=r"federation.min_train_sites=4 but only 3 sites train \(data.num_sites=3\)"):
        load_config(None, ["data.num_sites=3", "federation.min_train_sites=4"])
    with pytest.raises(ConfigError, match=r"minus eval.holdout_sites=\[0\]\): set federation.min_train_sites to at most 2"):
        load_config(None, ["data.num_sites=3", "eval.holdout_sites=[0]", "federation.min_train_sites=3"])
    with pytest.raises(ConfigError, match="eval.leave_one_site_out trains each of its runs on 2 sites"):
        load_config(None, ["data.num_sites=3", "eval.leave_one_site_out=true", "federation.min_train_sites=3"])


def test_list_items_and_mapping_keys_suggest_setting_the_whole_value():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["eval.holdout_sites=[x]"])
    assert "config key 'eval.holdout_sites' item 0 = 'x'" in str(info.value)
    assert "--set 'eval.holdout_sites=[...]', the whole list" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.site_ranks={3: 4}"])
    assert "config key 'lora.site_ranks' has the key 3" in str(info.value)
    assert "--set 'lora.site_ranks={...}', the whole mapping" in str(info.value)
    with pytest.raises(ConfigError, match=r"--set lora.site_ranks.site-0=\.\.\."):  # a value in a mapping: that form works
        load_config(None, ["lora.site_ranks={site-0: x}"])


def test_float_keys_refuse_inf_and_nan_but_null_stays_allowed():
    for override in ("train.lr=.inf", "privacy.noise_multiplier=.nan", "federation.round_timeout_s=.inf"):
        with pytest.raises(ConfigError, match="Input should be a finite number"):
            load_config(None, [override])
    assert load_config(None, ["privacy.noise_multiplier=null"]).privacy.noise_multiplier is None


def test_relative_data_path_resolves_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "exp.yaml"
    cfg.write_text("data:\n  source: medmnist\n  path: ../data.npz\n")
    config = load_config(cfg)
    assert config.data.path == str((tmp_path / "data.npz").resolve())


def test_holdout_sites_are_checked():
    assert load_config(None, ["data.num_sites=3", "eval.holdout_sites=[2]"]).eval.holdout_sites == [2]
    with pytest.raises(ConfigError, match=r"eval.holdout_sites=\[5\]: site ids must be in 0..2"):
        load_config(None, ["data.num_sites=3", "eval.holdout_sites=[5]"])
    with pytest.raises(ConfigError, match="holds out every site"):
        load_config(None, ["data.num_sites=2", "eval.holdout_sites=[0, 1]"])
