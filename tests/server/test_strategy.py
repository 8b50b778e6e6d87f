"""The adapter-only FedAvg accepts exactly the adapter it sent, finite, and averages by examples."""

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.results import RunRecorder
from server.strategy import AdapterFedAvg, StackedLoraFedAvg, build_strategy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16"])
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path_factory.mktemp("run"), model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    return AdapterFedAvg(recorder, adapter_keys=list(adapter)), adapter


def _content(adapter, site_id, n):
    metrics = MetricRecord({"num-examples": n, "site-id": site_id, "train-loss": 0.5, "epsilon": 1.0})
    return RecordDict({"arrays": ArrayRecord(adapter), "metrics": metrics})


class _Reply:
    """The part of a Flower reply Message the strategy reads (a real Message needs a live run)."""

    def __init__(self, content, node_id):
        self.content = content
        self.metadata = SimpleNamespace(src_node_id=node_id)

    def has_error(self):
        return False


def test_well_formed_reply_passes(setup):
    strategy, adapter = setup
    assert strategy.reply_problem(_content(adapter, 0, 10)) is None


def test_non_finite_weights_are_rejected_naming_the_tensor(setup):
    strategy, adapter = setup
    bad = {k: v.clone() for k, v in adapter.items()}
    key = next(iter(bad))
    bad[key].view(-1)[0] = float("nan")
    assert f"tensor '{key}' is not finite" in strategy.reply_problem(_content(bad, 0, 10))


def test_extra_or_missing_keys_are_rejected(setup):
    strategy, adapter = setup
    extra = dict(adapter, **{"base_model.model.something.weight": torch.zeros(2)})
    assert "unexpected ['base_model.model.something.weight']" in strategy.reply_problem(_content(extra, 0, 10))
    missing = dict(list(adapter.items())[1:])
    assert "missing" in strategy.reply_problem(_content(missing, 0, 10))


def test_aggregation_is_weighted_by_examples_and_drops_bad_replies(setup):
    strategy, adapter = setup
    ones = {k: torch.ones_like(v) for k, v in adapter.items()}
    threes = {k: 3 * torch.ones_like(v) for k, v in adapter.items()}
    poisoned = {k: torch.full_like(v, float("inf")) for k, v in adapter.items()}
    replies = [_Reply(_content(t, i, n), i) for i, (t, n) in enumerate([(ones, 30), (threes, 10), (poisoned, 1000)])]
    arrays, _ = strategy.aggregate_train(1, replies)
    averaged = arrays.to_torch_state_dict()
    for key in adapter:
        assert np.allclose(averaged[key].numpy(), 1.5)  # (30 * 1 + 10 * 3) / 40
    assert sorted(strategy._train) == ["site-0", "site-1"]
    assert any("not finite" in reason for reason in strategy._refused.values())


def _strategy(run_dir, *items):
    """(strategy as build_strategy makes it, its recorder, the initial adapter) for a 2-site config."""
    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16", *items])
    model = build_global_model(config)
    recorder = RunRecorder(config, run_dir, model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    return build_strategy(config, recorder, list(adapter)), recorder, adapter


def test_fp16_transport_halves_the_bytes_and_averages_in_fp32(tmp_path):
    strategy, recorder, adapter = _strategy(tmp_path, "federation.transport=fp16")
    assert isinstance(strategy, AdapterFedAvg)
    # a site's reply as the ClientApp sends it under fp16 transport
    a = {k: (torch.rand_like(v) / 3).half() for k, v in adapter.items()}
    b = {k: (torch.rand_like(v) / 3).half() for k, v in adapter.items()}
    arrays, _ = strategy.aggregate_train(1, [_Reply(_content(a, 0, 30), 0), _Reply(_content(b, 1, 10), 1)])
    averaged = arrays.to_torch_state_dict()
    fp32_bytes = ArrayRecord(adapter).count_bytes()
    assert abs(recorder.update_bytes - fp32_bytes / 2) < 0.05 * fp32_bytes  # the payload is the tensors
    for key in adapter:
        assert averaged[key].dtype == torch.float32
        expected = (30 * a[key].float() + 10 * b[key].float()) / 40  # fp32 average of what was sent
        assert torch.allclose(averaged[key], expected, atol=1e-6)


def test_stacked_strategy_rejects_a_wrong_rank_and_stacks_the_rest(tmp_path):
    strategy, _, initial = _strategy(tmp_path, "lora.site_ranks={site-0: 2, site-1: 4}")
    assert isinstance(strategy, StackedLoraFedAvg)
    strategy._global = initial  # what configure_train keeps of the round's global adapter

    def update(rank, value):
        out = {}
        for k, v in initial.items():
            shape = list(v.shape)
            if k.endswith("lora_A.weight"):
                shape[0] = rank
            elif k.endswith("lora_B.weight"):
                shape[1] = rank
            out[k] = torch.full(shape, value)
        return out

    wrong = update(3, 0.1)  # site-1 must train rank 4
    assert "lora.site_ranks gives site-1 rank 4" in strategy.reply_problem(_content(wrong, 1, 10))
    replies = [_Reply(_content(update(2, 0.1), 0, 30), 0), _Reply(_content(update(4, 0.2), 1, 10), 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    stacked = arrays.to_torch_state_dict()
    key = next(k for k in stacked if k.endswith("lora_A.weight"))
    a, b = stacked[key], stacked[key.replace("lora_A", "lora_B")]
    assert a.shape[0] == min(2 + 4, a[0].numel(), b.shape[0])  # ranks 2 + 4, unless the layer is narrower
    head = next(k for k in stacked if "lora_" not in k)
    assert torch.allclose(stacked[head], torch.full_like(stacked[head], (30 * 0.1 + 10 * 0.2) / 40))


def test_train_replies_are_anchored_and_a_missing_or_backward_head_is_rejected(tmp_path):
    from flwr.app import ConfigRecord

    from fedfm.privacy.anchors import AnchorLog
    from fedfm.privacy.heads import head_of
    from fedfm.protocol import LEDGER_HEAD as REPLY_KEY
    from fedfm.privacy.ledger import SiteLedger
    from fedfm.privacy.signing import simulation_signer

    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16"])
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path / "run", model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    anchors = AnchorLog(tmp_path / "anchors")
    strategy = build_strategy(config, recorder, list(adapter), anchors, run_id="9")
    ledger = SiteLedger(tmp_path / "ledger", "site-0", simulation_signer(tmp_path / "ledger", "site-0"))
    heads = []
    for number in (1, 2):
        ledger.append({"round": number, "epsilon": float(number)})
        heads.append(head_of("site-0", ledger.verify(), ledger.signer))

    def reply(head, node=1):
        content = _content(adapter, 0, 10)
        if head is not None:
            content[REPLY_KEY] = ConfigRecord(head.to_dict())
        return _Reply(content, node)

    kept = strategy.screen(2, [reply(heads[1])])
    assert len(kept) == 1 and REPLY_KEY not in kept[0].content  # anchored, then taken out before averaging
    assert anchors.last_for("site-0") == heads[1] and anchors.heads()[0][0]["run_id"] == "9"
    assert strategy.screen(3, [reply(None)]) == []
    assert "must carry its signed ledger head" in strategy._refused["node 1"]
    assert strategy.screen(3, [reply(heads[0])]) == []  # the ledger went back from 2 entries to 1
    assert "site-0 sent a ledger head at 1 entries (epsilon 1.000000) after the coordinator anchored 2" in strategy._refused["node 1"]
    assert len(anchors.heads()) == 1
