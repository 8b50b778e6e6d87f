"""Flower's flat run/node config becomes the same validated experiment everywhere."""

import pytest

from fedfm.appconfig import apply_node_config, experiment_from_run_config, ledger_dir, site_id_from_node_config
from fedfm.config import ConfigError, load_config


def test_config_json_wins_and_round_trips():
    config = load_config(None, ["train.lr=0.01", "data.num_sites=4"])
    again = experiment_from_run_config({"config": "configs/breast.yaml", "config-json": config.to_json()})
    assert again == config


def test_yaml_path_relative_to_app_with_overrides():
    config = experiment_from_run_config({"config": "configs/quickstart.yaml", "overrides": "federation.rounds=7; train.lr=0.1"})
    assert config.federation.rounds == 7 and config.train.lr == 0.1


def test_bad_override_in_run_config_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown config key 'federation.roundz'"):
        experiment_from_run_config({"config": "configs/quickstart.yaml", "overrides": "federation.roundz=7"})


def test_node_config_sets_site_data_and_budget(tmp_path):
    config = load_config(None)
    node = {"site-id": 3, "data-path": "/data/site3", "budget-epsilon": 2.5, "ledger-dir": str(tmp_path)}
    local = apply_node_config(config, node)
    assert local.data.path == "/data/site3" and local.privacy.budget.epsilon == 2.5
    assert site_id_from_node_config(node) == 3
    assert ledger_dir({"out-dir": "/elsewhere"}, node) == tmp_path
    assert site_id_from_node_config({"partition-id": 1, "num-partitions": 2}) == 1
    assert str(ledger_dir({"out-dir": "/runs/x"}, {})) == "/runs/x/ledger"
    with pytest.raises(ConfigError, match="site-id"):
        site_id_from_node_config({})
