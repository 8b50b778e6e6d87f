"""A site that sends a valid but 100x-scaled update: with the server's norm bound (or a robust
aggregate) the global model's validation AUROC stays within 0.02 of the run without the attacker;
without them it does not. A real federation of sites, in process, over the core (no Flower)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.federation import Reply, build_coordinator
from fedfm.federation.robust import bound_updates, coordinate_median, trimmed_mean, update_length
from fedfm.federation.workflow import run_rounds
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.protocol import server_round
from fedfm.results import RunRecorder
from fedfm.site import Site

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pneumonia.yaml"
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
QUICK = ["data.num_sites=3", "federation.rounds=2", "eval.every_round=false"]
BOUND = 10.0  # the honest sites' updates here have norm 5.4 - 9.6 (DP noise included): the bound only bites on the attacker


def _bytes(adapter):
    return sum(t.numel() * t.element_size() for t in adapter.values())


class SitesLink:
    """The sites of one process as a Link; ``scale`` multiplies one site's update (an attacker)."""

    def __init__(self, sites, attacker=None, scale=100.0):
        self.sites = {node: site for node, site in enumerate(sites)}
        self.attacker, self.scale = attacker, scale

    def nodes(self):
        return list(self.sites)

    def wire_bytes(self, adapter):
        return _bytes(adapter)

    def exchange(self, messages, timeout):
        replies = []
        for m in messages:
            site = self.sites[m.node]
            if m.kind == "evaluate":
                replies.append(Reply(m.node, metrics={"site-id": site.site_id, **site.evaluate(m.adapter, "val").metrics}))
                continue
            trained = site.train(m.adapter, server_round(m.config))
            adapter = trained.adapter
            if m.node == self.attacker:  # valid (finite, right keys), 100x the honest step
                adapter = {k: m.adapter[k] + self.scale * (v - m.adapter[k]) for k, v in adapter.items()}
            replies.append(Reply(m.node, adapter, trained.metrics, nbytes=_bytes(adapter)))
        return replies


def _federate(tmp_path, *items, attacker=None):
    config = load_config(CONFIG, [*QUICK, *items])
    sites = [Site(config, i, tmp_path / "ledger") for i in range(3)]
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path / "run", model, full_model_bytes(model))
    initial = adapter_state_dict(model)
    coordinator = build_coordinator(config, recorder, list(initial))
    final = run_rounds(SitesLink(sites, attacker), coordinator, initial, config.federation.rounds, 60, lambda r, a: None)
    evaluations = [site.evaluate(final, "val") for site in sites]
    weights = [len(site.data.val) for site in sites]
    auroc = float(np.average([e.metrics["auroc"] for e in evaluations], weights=weights))
    return auroc, recorder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Validation AUROC of PneumoniaMNIST federations (3 sites, 2 DP rounds) with and without the attacker."""
    if not DATA.is_file():
        pytest.skip(f"{DATA} is not here (MedMNIST v2 PneumoniaMNIST)")
    out = {}
    for name, items, attacker in (("clean", [f"federation.update_clip_norm={BOUND}"], None),
                                  ("bounded", [f"federation.update_clip_norm={BOUND}"], 2),
                                  ("undefended", [], 2),
                                  ("median clean", ["federation.aggregator=median"], None),
                                  ("median", ["federation.aggregator=median"], 2)):
        out[name] = _federate(tmp_path_factory.mktemp(name.replace(" ", "-")), *items, attacker=attacker)
    return out


@pytest.mark.slow
def test_with_the_norm_bound_a_100x_update_moves_validation_auroc_by_at_most_0_02(runs):
    (clean, clean_recorder), (bounded, recorder) = runs["clean"], runs["bounded"]
    assert all(r["clipped"] == {} for r in clean_recorder.rounds)  # honest updates are under the bound
    assert abs(bounded - clean) <= 0.02, (clean, bounded)
    assert all(list(r["clipped"]) == ["site-2"] and r["clipped"]["site-2"] > 100 * 5 for r in recorder.rounds)


@pytest.mark.slow
def test_with_the_median_a_100x_update_moves_validation_auroc_by_at_most_0_02(runs):
    (clean, _), (attacked, _) = runs["median clean"], runs["median"]
    assert abs(attacked - clean) <= 0.02, (clean, attacked)


@pytest.mark.slow
def test_without_a_defence_the_attack_is_felt(runs):
    (clean, _), (attacked, _) = runs["clean"], runs["undefended"]
    assert clean - attacked > 0.2, (clean, attacked)


def _adapter(values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_norm_bound_clips_only_long_updates_and_keeps_their_direction():
    current = _adapter([0.0, 0.0])
    long, short = Reply(0, _adapter([3.0, 4.0]), {"site-id": 0}), Reply(1, _adapter([0.3, 0.4]), {"site-id": 1})
    clipped = bound_updates([long, short], current, 1.0)
    assert clipped == {"site-0": pytest.approx(5.0)}
    assert torch.allclose(long.arrays["w"], torch.tensor([0.6, 0.8])) and torch.equal(short.arrays["w"], torch.tensor([0.3, 0.4]))
    assert update_length(long.arrays, current) == pytest.approx(1.0)


def test_median_and_trimmed_mean_ignore_one_extreme_site():
    adapters = [_adapter([1.0, 2.0]), _adapter([1.2, 2.2]), _adapter([1e6, -1e6]), _adapter([0.8, 1.8]), _adapter([1.1, 2.1])]
    assert torch.allclose(coordinate_median(adapters)["w"], torch.tensor([1.1, 2.0]))
    assert torch.allclose(trimmed_mean(adapters, 0.2)["w"], torch.tensor([(1.0 + 1.1 + 1.2) / 3, (1.8 + 2.0 + 2.1) / 3]))
    with pytest.raises(ValueError, match="leaves no site"):
        trimmed_mean(adapters[:2], 0.5)
