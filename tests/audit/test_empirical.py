"""The canary audit passes an honest site and catches one that adds far less noise than it claims."""

import json

import opacus.optimizers.optimizer as dp_optimizer
import pytest
import yaml

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict
from fedfm.audit.canaries import GradientCanaries
from fedfm.audit.empirical import replay_with_canaries
from fedfm.site import Site

SETTINGS = [
    "data.num_sites=2", "data.samples_per_site=120", "data.image_size=16", "federation.rounds=3",
    "train.batch_size=16", "train.optimizer=sgd", "train.lr=0.05", "privacy.budget.epsilon=1.0",
]


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    """A site that trained 3 rounds at noise calibrated for epsilon 1."""
    config = load_config(None, SETTINGS)
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump()))
    site = Site(config, 0, run_dir / "ledger")
    adapter = adapter_state_dict(build_global_model(config))
    for server_round in (1, 2, 3):
        adapter = site.train(adapter, server_round).adapter
    return config, site.ledger.verify(), run_dir


def test_canaries_are_planted_reproducibly():
    config = load_config(None, SETTINGS)
    model = build_global_model(config)
    a = GradientCanaries.plant(model, 500, 1.0, seed=3)
    b = GradientCanaries.plant(model, 500, 1.0, seed=3)
    assert (a.flat_index == b.flat_index).all() and (a.included == b.included).all()
    assert 200 < a.included.sum() < 300
    assert len({(p, j) for p, j in zip(a.param_index, a.flat_index)}) == 500  # distinct coordinates


def test_honest_site_is_not_falsified(honest_run):
    config, entries, _ = honest_run
    assert entries[-1]["epsilon"] <= 1.0
    audit = replay_with_canaries(config, 0, entries, canaries=1000, seed=1)
    assert not audit.falsified, audit
    assert audit.result.guesses == 200 and audit.result.epsilon_lower_bound <= 1.0


def test_broken_noise_is_caught(honest_run, monkeypatch):
    """Noise 20x below what the ledger accounts for: the lower bound exceeds the claimed epsilon."""
    config, entries, _ = honest_run
    real = dp_optimizer._generate_noise

    def too_little_noise(std, reference, *args, **kwargs):
        return real(std / 20, reference, *args, **kwargs)

    monkeypatch.setattr(dp_optimizer, "_generate_noise", too_little_noise)
    audit = replay_with_canaries(config, 0, entries, canaries=1000, seed=1)
    assert audit.falsified, audit
    assert audit.result.epsilon_lower_bound > entries[-1]["epsilon"]


def test_fedfm_audit_with_canaries_reports_the_bound(honest_run):
    _, entries, run_dir = honest_run
    assert main(["audit", str(run_dir), "--canaries", "500"]) == 0
    report = json.loads((run_dir / "audit.json").read_text())
    empirical = report["sites"][0]["empirical"]
    assert empirical["result"]["canaries"] == 500 and not empirical["falsified"]
    assert empirical["claimed_epsilon"] == entries[-1]["epsilon"]
    assert "Empirical audit (one run" in (run_dir / "audit.md").read_text()
