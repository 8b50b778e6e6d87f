"""One hospital's round: DP training, what it sends, its ledger and its budget."""

import re

import pytest
import torch
from opacus.accountants import create_accountant

from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import ModelSpec, adapter_state_dict, build_model, state_bytes
from fedfm.models.registry import build_backbone
from fedfm.site import BudgetExhausted, Site
from fedfm.training.local import plan_steps, train_round

FAST = [
    "data.num_sites=2", "data.samples_per_site=120", "data.image_size=16", "federation.rounds=3",
    "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
    "train.class_balance=none",  # no label-count release: the ledger holds the DP-SGD rounds only
]


def _config(*extra):
    return load_config(None, [*FAST, *extra])


def _global(config):
    return adapter_state_dict(build_global_model(config))


def test_dp_training_leaves_base_bit_identical_and_moves_adapter():
    config = _config()
    site = Site(config, 0, "/nonexistent-unused")
    model = site.fresh_model(_global(config))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    adapter_before = adapter_state_dict(model)
    accountant = site.ledger.accountant("rdp")
    train_round(model, site.data.train, config.train, config.privacy, accountant, 1.0, seed=1)
    after = model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    adapter_after = adapter_state_dict(model)
    moved = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    lora_b = [k for k in adapter_before if "lora_B" in k]
    assert set(lora_b) <= set(moved), "every LoRA B matrix must move in one round"


def test_site_sends_only_adapter_and_head_with_the_bytes_the_config_implies(tmp_path):
    config = _config("lora.r=4")
    reply = Site(config, 0, tmp_path).train(_global(config), server_round=1)
    # Expected size, computed from the un-adapted backbone's own layers.
    backbone = build_backbone(config.model, 2, 1, config.data.image_size)
    pattern = re.compile(backbone.lora_targets)
    expected_keys, expected_numel = 0, 0
    for name, module in backbone.model.named_modules():
        if pattern.fullmatch(name):
            expected_keys += 2  # lora_A, lora_B
            expected_numel += config.lora.r * (module.in_features + module.out_features)
    for head in backbone.head:
        for _, param in backbone.model.get_submodule(head).named_parameters():
            expected_keys += 1
            expected_numel += param.numel()
    assert len(reply.adapter) == expected_keys
    assert state_bytes(reply.adapter) == 4 * expected_numel
    assert all("lora_" in k or "classification_head" in k for k in reply.adapter)


def test_epsilon_after_rounds_equals_one_continuous_accountant(tmp_path):
    config = _config()
    site = Site(config, 1, tmp_path)
    adapter = _global(config)
    for server_round in (1, 2, 3):
        adapter = site.train(adapter, server_round).adapter
    entries = site.ledger.verify()
    assert [e["round"] for e in entries] == [1, 2, 3]
    plan = plan_steps(len(site.data.train), config.train.batch_size, config.train.local_epochs)
    continuous = create_accountant("rdp")
    for _ in range(3 * plan.steps):
        continuous.step(noise_multiplier=1.0, sample_rate=plan.sample_rate)
    assert entries[-1]["epsilon"] == continuous.get_epsilon(config.privacy.delta)
    # a new Site object (a restarted process) continues from the ledger exactly
    restarted = Site(config, 1, tmp_path)
    assert restarted.ledger.accountant("rdp").epsilon(config.privacy.delta) == entries[-1]["epsilon"]


def test_site_refuses_a_round_beyond_its_budget_and_writes_nothing(tmp_path):
    config = _config("privacy.budget.epsilon=0.5")
    site = Site(config, 0, tmp_path)
    with pytest.raises(BudgetExhausted, match=r"site-0 refuses the round: epsilon would reach .* > budget 0.5"):
        site.train(_global(config), 1)
    assert site.ledger.entries() == []


def test_calibrated_noise_keeps_every_planned_round_within_budget(tmp_path):
    config = load_config(None, [f for f in FAST if "noise_multiplier" not in f] + ["privacy.budget.epsilon=4"])
    site = Site(config, 0, tmp_path)
    adapter = _global(config)
    for server_round in (1, 2, 3):
        adapter = site.train(adapter, server_round).adapter
    epsilons = [e["epsilon"] for e in site.ledger.verify()]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 4.0
    assert epsilons[-1] > 3.5  # calibration spends the budget, not a fraction of it
    with pytest.raises(BudgetExhausted):
        site.train(adapter, 4)  # a round beyond the plan would exceed the budget


def test_without_privacy_the_same_code_trains_and_keeps_no_ledger(tmp_path):
    config = _config("privacy.enabled=false")
    reply = Site(config, 0, tmp_path).train(_global(config), 1)
    assert reply.metrics["epsilon"] == 0.0 and reply.metrics["steps"] > 0
    # no ledger; the site's folder holds only its activation cache
    assert [p.name for p in tmp_path.iterdir()] == ["activation-cache"]
    plain = tmp_path / "plain"
    Site(load_config(None, [*FAST, "privacy.enabled=false", "train.activation_cache=false"]), 0, plain).train(
        _global(config), 1)
    assert not plain.exists()


def test_model_cache_returns_independent_copies():
    config = _config()
    a, _ = build_model(ModelSpec(config.model, config.lora, 2, 1, 16))
    b, _ = build_model(ModelSpec(config.model, config.lora, 2, 1, 16))
    key = next(k for k, _ in a.named_parameters() if "lora_A" in k)
    with torch.no_grad():
        dict(a.named_parameters())[key].add_(1.0)
    assert not torch.equal(dict(a.named_parameters())[key], dict(b.named_parameters())[key])


def test_a_site_budget_overrides_the_shared_one_and_drives_calibration(tmp_path):
    config = load_config(None, [f for f in FAST if "noise_multiplier" not in f] + ["privacy.budget.sites={site-1: 2.0}"])
    site = Site(config, 1, tmp_path)
    assert site.budget == 2.0 and Site(config, 0, tmp_path).budget == 8.0
    adapter = _global(config)
    for server_round in (1, 2, 3):
        last = site.train(adapter, server_round)
        adapter = last.adapter
    entries = site.ledger.verify()
    assert entries[-1]["epsilon"] <= 2.0 and entries[-1]["budget_epsilon"] == 2.0
    # what the site enforced travels with its reply: the report shows it, not the coordinator's config
    assert last.metrics["budget-epsilon"] == 2.0
