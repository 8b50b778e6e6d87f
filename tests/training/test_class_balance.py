"""Class weights for skewed sites: the formula, the DP release of the label counts it needs, its
place in the ledger, the noise calibration and the audit, and the weighting after clipping."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedfm.config import PrivacyConfig, load_config
from fedfm.data.types import Split
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict
from fedfm.privacy.accountant import SiteAccountant, StepBatch, calibrate_noise
from fedfm.audit.ledgers import audit_run, write_audit
from fedfm.privacy.ledger import SiteLedger
from fedfm.site import BudgetExhausted, Site, round_seed
from fedfm.privacy.entries import LABEL_COUNTS
from fedfm.training.class_balance import (
    PostClipWeights,
    balanced_weights,
    imbalance_ratio,
    label_count_release,
    wants_weights,
)
from fedfm.training.local import plan_steps, private_training, train_round

FAST = [
    "data.num_sites=2", "data.samples_per_site=120", "data.image_size=16", "federation.rounds=3",
    "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
]
OLD_ENTRY_KEYS = {"round", "steps", "noise_multiplier", "sample_rate", "sampling", "max_grad_norm", "delta", "accountant",
                  "accountant_library", "epsilon", "budget_epsilon", "n_train", "time", "site", "prev_hash", "hash"}


def _config(*extra, base=FAST):
    return load_config(None, [*base, *extra])


def _global(config):
    return adapter_state_dict(build_global_model(config))


def _skewed(site: Site, minority: int = 6):
    """The site's data with all of class 0 but only ``minority`` train images of class 1."""
    train = site.data.train
    keep = np.concatenate([np.flatnonzero(train.labels == 0), np.flatnonzero(train.labels == 1)[:minority]])
    return dataclasses.replace(site.data, train=Split(train.images[keep], train.labels[keep]))


# --- the formula and the decision -------------------------------------------------------------

def test_balanced_weights_are_inverse_counts_with_the_largest_one():
    assert balanced_weights([10, 40, 20]) == [1.0, 0.25, 0.5]
    assert balanced_weights([30, 30]) == [1.0, 1.0]
    # noisy counts can be zero or negative: floored at 1, so the weights stay finite and in (0, 1]
    assert balanced_weights([-3.2, 0.4, 5.0]) == [1.0, 1.0, 0.2]
    weights = balanced_weights([7.5, 123.0, 41.0])
    assert max(weights) == 1.0 and min(weights) > 0
    assert np.allclose(np.array(weights) * [7.5, 123.0, 41.0], 7.5)  # w_c * n_c constant


def test_auto_weights_skewed_counts_only_and_the_modes_override():
    assert imbalance_ratio([90, 30]) == 3.0 and imbalance_ratio([0, 12]) == 12.0
    assert wants_weights("auto", [90, 30], 1.5)
    assert wants_weights("auto", [45, 30], 1.5)  # exactly the ratio: weighted
    assert not wants_weights("auto", [44, 30], 1.5)
    assert not wants_weights("auto", [50, 50, 49], 1.5)
    assert wants_weights("weighted", [50, 50], 1.5)
    assert not wants_weights("none", [500, 1], 1.5)
    # noisy counts: the skew must survive two noise standard deviations against it
    assert not wants_weights("auto", [67.9, 29.5], 1.5, noise=20)  # a balanced 41 / 43 site after noise 20
    assert wants_weights("auto", [400, 140], 1.5, noise=20)  # (400 - 40) / (140 + 40) = 2.0


def test_auto_decides_from_the_noisy_release_on_a_site(tmp_path):
    config = _config("train.class_balance=auto", "train.label_count_noise=4", "privacy.budget.epsilon=50")
    balanced = Site(config, 0, tmp_path / "a")
    skewed = Site(config, 0, tmp_path / "b", data=_skewed(balanced))
    for site, expect in ((balanced, False), (skewed, True)):
        accountant = site.ledger.accountant("rdp")
        weights = site.class_weights(1, accountant)
        (entry,) = site.ledger.verify()
        noisy = entry["noisy_label_counts"]
        assert (weights is not None) == expect == wants_weights("auto", noisy, 1.5, noise=4)
        if expect:
            assert weights == balanced_weights(noisy)  # from the release, not from the exact counts
            assert weights != balanced_weights(site.label_counts()["train"])


# --- the release in the ledger, composition, calibration and budget ---------------------------

@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """A site that trained 2 rounds with class weights (PRV, as by default), and the same site without."""
    root = tmp_path_factory.mktemp("run")
    config = _config("train.class_balance=weighted", "privacy.accountant=prv")
    site = Site(config, 0, root / "ledger")
    adapter = _global(config)
    replies = [site.train(adapter, server_round) for server_round in (1, 2)]
    plain = Site(_config("train.class_balance=none", "privacy.accountant=prv"), 0, root / "plain")
    plain_reply = plain.train(adapter, 1)
    return config, site, replies, plain, plain_reply, root


def test_the_release_is_recorded_once_and_composed(weighted_run):
    config, site, replies, plain, plain_reply, _ = weighted_run
    entries = site.ledger.verify()
    assert [(e.get("kind"), e["round"]) for e in entries] == [(LABEL_COUNTS, 1), (None, 1), (None, 2)]
    release = entries[0]
    assert release["noise_multiplier"] == config.train.label_count_noise
    assert release["sample_rate"] == 1.0 and release["steps"] == 1 and release["sensitivity"] == 1.0
    assert len(release["noisy_label_counts"]) == 2 and release["noisy_label_counts"] != site.label_counts()["train"]
    assert release["epsilon"] == SiteAccountant("prv", [StepBatch(20.0, 1.0, 1)]).epsilon(config.privacy.delta)
    # round 1 with the release costs more than round 1 without, and exactly the composition
    assert entries[1]["epsilon"] > plain.ledger.verify()[-1]["epsilon"] == plain_reply.metrics["epsilon"]
    composed = SiteAccountant("prv", [StepBatch(20.0, 1.0, 1), StepBatch(1.0, entries[1]["sample_rate"], entries[1]["steps"])])
    assert entries[1]["epsilon"] == composed.epsilon(config.privacy.delta) == replies[0].metrics["epsilon"]
    # the reply says it: the same weights every round, from the one release
    weights = balanced_weights(release["noisy_label_counts"])
    for reply in replies:
        assert reply.metrics["class-weighted"] == 1 and reply.metrics["class-weights"] == weights
    assert entries[1]["class_weights"] == entries[2]["class_weights"] == weights
    # every reply has the same keys (the server aggregates only such replies): unweighted is all ones
    assert plain_reply.metrics["class-weighted"] == 0 and plain_reply.metrics["class-weights"] == [1.0, 1.0]
    assert set(plain_reply.metrics) == set(replies[0].metrics)
    # a restarted process reuses the stored counts: nothing new is released or charged
    restarted = Site(config, 0, site.ledger.path.parent)
    accountant = restarted.ledger.accountant("prv")
    before = accountant.epsilon(config.privacy.delta)
    assert restarted.class_weights(3, accountant) == weights
    assert len(restarted.ledger.verify()) == 3 and accountant.epsilon(config.privacy.delta) == before


def test_the_audit_recomputes_the_release(weighted_run):
    *_, root = weighted_run
    (audit,) = [a for a in audit_run(root) if a.site == "site-0"]
    assert audit.passed, audit.problems
    assert audit.rounds == [1, 2] and audit.label_counts["noise_multiplier"] == 20.0
    assert audit.reported_epsilon == pytest.approx(audit.epsilons["opacus_prv"], abs=1e-6)
    assert audit.reported_epsilon >= audit.epsilons["dp_accounting_pld"]
    write_audit([audit], root)
    text = (root / "audit.md").read_text()
    assert "noisy label counts" in text and "Composed with one release of the train label counts" in text
    report = json.loads((root / "audit.json").read_text())
    assert report["passed"] and report["sites"][0]["label_counts"]["round"] == 1


def test_the_audit_rejects_a_release_accounted_with_sampling(tmp_path):
    ledger = SiteLedger(tmp_path, "site-0")
    batch = StepBatch(20.0, 0.5, 1)  # claims amplification the release never had
    ledger.append({"kind": LABEL_COUNTS, "round": 1, "steps": 1, "noise_multiplier": 20.0, "sample_rate": 0.5,
                   "sampling": "poisson", "sensitivity": 1.0, "noisy_label_counts": [40.0, 3.0], "delta": 1e-5,
                   "accountant": "rdp", "epsilon": SiteAccountant("rdp", [batch]).epsilon(1e-5), "budget_epsilon": 8.0})
    (audit,) = audit_run(tmp_path)
    assert any("label-count release is accounted as a Gaussian mechanism" in p for p in audit.problems)


def test_calibration_leaves_room_for_the_release():
    q, steps, delta = 16 / 84, 18, 1e-5
    for mechanism in ("rdp", "prv"):
        plain = calibrate_noise(4.0, delta, q, steps, mechanism)
        for noise in (20.0, 3.0):  # the default (cheap) and a costly release
            release = label_count_release(noise)
            sigma = calibrate_noise(4.0, delta, q, steps, mechanism, fixed=(release,))
            eps = SiteAccountant(mechanism, [release, StepBatch(sigma, q, steps)]).epsilon(delta)
            assert 4.0 - 0.01 <= eps <= 4.0  # the budget is spent, release included, and not exceeded
            assert sigma >= plain if noise == 20.0 else sigma > plain
    with pytest.raises(ValueError, match="fixed releases alone"):
        calibrate_noise(0.1, delta, q, steps, "rdp", fixed=(label_count_release(1.0),))


def test_calibrated_run_with_the_release_ends_within_budget(tmp_path):
    base = [f for f in FAST if "noise_multiplier" not in f]
    config = _config("privacy.budget.epsilon=4", "train.class_balance=weighted", base=base)
    site = Site(config, 0, tmp_path)
    plan = plan_steps(len(site.data.train), config.train.batch_size, config.train.local_epochs)
    sigma = site.noise_multiplier(plan.sample_rate, plan.steps)
    plain = Site(_config("privacy.budget.epsilon=4", "train.class_balance=none", base=base), 0, tmp_path / "p")
    costly = Site(_config("privacy.budget.epsilon=4", "train.class_balance=weighted", "train.label_count_noise=3",
                          base=base), 0, tmp_path / "x")
    assert costly.noise_multiplier(plan.sample_rate, plan.steps) > sigma >= plain.noise_multiplier(plan.sample_rate, plan.steps)
    assert SiteAccountant("rdp", [label_count_release(20.0), StepBatch(sigma, plan.sample_rate, 3 * plan.steps)]
                          ).epsilon(1e-5) <= 4.0
    # privacy.runs_in_budget: the calibration covers that many runs (their steps and releases)
    twice = Site(_config("privacy.budget.epsilon=4", "train.class_balance=weighted", "privacy.runs_in_budget=2",
                         base=base), 0, tmp_path / "t")
    sigma2 = twice.noise_multiplier(plan.sample_rate, plan.steps)
    assert sigma2 > sigma
    assert SiteAccountant("rdp", [label_count_release(20.0, 2), StepBatch(sigma2, plan.sample_rate, 6 * plan.steps)]
                          ).epsilon(1e-5) <= 4.0
    adapter = _global(config)
    for server_round in (1, 2, 3):
        adapter = site.train(adapter, server_round).adapter
    epsilons = [e["epsilon"] for e in site.ledger.verify()]
    assert epsilons == sorted(epsilons) and 3.5 < epsilons[-1] <= 4.0
    with pytest.raises(BudgetExhausted):
        site.train(adapter, 4)


def test_the_budget_check_counts_a_release_still_to_come(tmp_path):
    probe = Site(_config(), 0, tmp_path / "probe")
    plan = plan_steps(len(probe.data.train), 16, 1.0)
    steps = StepBatch(1.0, plan.sample_rate, plan.steps)
    alone = SiteAccountant("rdp").epsilon_after(steps, 1e-5)
    with_release = SiteAccountant("rdp").epsilon_after([label_count_release(20.0), steps], 1e-5)
    budget = (alone + with_release) / 2
    site = Site(_config(f"privacy.budget.epsilon={budget}", "train.class_balance=weighted"), 0, tmp_path / "w")
    with pytest.raises(BudgetExhausted):
        site.train(_global(site.config), 1)
    assert site.ledger.entries() == []  # refused before releasing anything
    plain = Site(_config(f"privacy.budget.epsilon={budget}", "train.class_balance=none"), 0, tmp_path / "n")
    assert plain.train(_global(plain.config), 1).metrics["epsilon"] == pytest.approx(alone)


# --- weighting after clipping -----------------------------------------------------------------

def _reference_sum(model, x, y, weights, clip):
    """sum_i w_{y_i} * g_i * min(1, C / (|g_i| + 1e-6)), one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6)) * weights[int(y[i])]
        total = [t + factor * g for t, g in zip(total, grads)]
    return total, norms


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("sampler", ["fused", "opacus"])
def test_post_clip_weighting_matches_a_per_example_reference(sampler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(9, 6) * 3, torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0])
    weights = [0.25, 1.0, 0.5]
    _, norms = _reference_sum(model, x, y, weights, 1e9)
    clip = float(np.median(norms))  # about half the examples are clipped
    reference, _ = _reference_sum(model, x, y, weights, clip)
    unweighted, _ = _reference_sum(model, x, y, [1.0, 1.0, 1.0], clip)
    privacy = PrivacyConfig(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", grad_sampler=sampler)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weighting = PostClipWeights(weights)
    with private_training(model, optimizer, loader, privacy, SiteAccountant("rdp"), 0.0) as (pm, popt, _):
        weighting.install(popt)
        nn.functional.cross_entropy(pm(x), y).backward()
        weighting.select(y)
        assert popt.pre_step()  # clip, weight, add (zero) noise, scale
        for p, ref, plain in zip(popt.params, reference, unweighted):
            torch.testing.assert_close(p.summed_grad, ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(p.grad * popt.expected_batch_size, ref, rtol=0, atol=1e-6)
            assert not torch.allclose(ref, plain, atol=1e-4)  # the weights mattered
        popt.zero_grad(set_to_none=True)
        with pytest.raises(RuntimeError, match="labels were not selected"):
            nn.functional.cross_entropy(pm(x), y).backward()
            popt.pre_step()


def test_weights_above_one_would_raise_the_sensitivity_and_are_refused():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PostClipWeights([1.0, 1.5])


def test_unit_weights_train_bit_identically_and_real_weights_change_the_round():
    config = _config("train.max_physical_batch_size=5")  # several physical batches per step
    probe = Site(config, 0, "/nonexistent-unused")
    split = probe.data.train

    def trained(weights):
        model = probe.fresh_model(_global(config))
        train_round(model, split, config.train, config.privacy, SiteAccountant("rdp"), 1.0, seed=3, class_weights=weights)
        return adapter_state_dict(model)

    plain, ones, skewed = trained(None), trained([1.0, 1.0]), trained([1.0, 0.2])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    assert any(not torch.equal(plain[k], skewed[k]) for k in plain)


# --- none and no DP ---------------------------------------------------------------------------

def test_none_releases_nothing_and_trains_as_before(tmp_path):
    config = _config("train.class_balance=none")
    site = Site(config, 0, tmp_path)
    adapter = _global(config)
    reply = site.train(adapter, 1)
    (entry,) = site.ledger.verify()
    assert set(entry) - {"signature", "key_id", "run_id", "config_hash"} == OLD_ENTRY_KEYS  # one DP-SGD entry, as before (now signed, with its run)
    assert reply.metrics["class-weighted"] == 0 and reply.metrics["class-weights"] == [1.0, 1.0]
    model = site.fresh_model(adapter)  # the round as train_round ran it before class balance existed
    trained, split = site.runnable(model, "train")
    train_round(trained, split, config.train, config.privacy, SiteAccountant("rdp"), 1.0,
                round_seed(config.train.seed, 0, 1))
    direct = adapter_state_dict(model)
    assert all(torch.equal(direct[k], reply.adapter[k]) for k in direct)
    # and the calibration is Opacus' own search
    base = [f for f in FAST if "noise_multiplier" not in f]
    calibrated = Site(_config("train.class_balance=none", base=base), 0, tmp_path / "c")
    plan = plan_steps(len(site.data.train), 16, 1.0)
    assert calibrated.noise_multiplier(plan.sample_rate, plan.steps) == calibrate_noise(
        8.0, 1e-5, plan.sample_rate, 3 * plan.steps, "rdp")


def test_without_dp_the_exact_counts_weight_the_loss_and_nothing_is_recorded(tmp_path):
    config = _config("privacy.enabled=false", "train.class_balance=auto", "train.activation_cache=false")
    site = Site(config, 0, tmp_path / "s", data=_skewed(Site(config, 0, tmp_path / "probe")))
    reply = site.train(_global(config), 1)
    assert reply.metrics["class-weighted"] == 1
    assert reply.metrics["class-weights"] == balanced_weights(site.label_counts()["train"])
    assert not (tmp_path / "s").exists()  # no ledger, no release
    plain = copy.deepcopy(config.model_dump())
    plain["train"]["class_balance"] = "none"
    unweighted = Site(type(config).model_validate(plain), 0, tmp_path / "u", data=site.data).train(_global(config), 1)
    assert any(not torch.equal(reply.adapter[k], unweighted.adapter[k]) for k in reply.adapter)
