"""The coordinator accepts exactly the adapter it sent, finite, and averages by examples (no Flower)."""

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.federation import CombineByMethod, Coordinator, Reply, build_coordinator
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.models.method import SharedAdapter, StackedRanks
from fedfm.results import RunRecorder


def _wire_bytes(adapter):
    return sum(t.numel() * t.element_size() + len(k) for k, t in adapter.items())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16"])
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path_factory.mktemp("run"), model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    method = recorder.adapter_method
    coordinator = Coordinator(config, recorder, list(adapter), method, CombineByMethod(method))
    coordinator.outgoing(adapter)
    return coordinator, adapter


def _reply(adapter, site_id, n, node=None, head=None):
    metrics = {"num-examples": n, "site-id": site_id, "client-weight": 1, "train-loss": 0.5, "epsilon": 1.0}
    return Reply(site_id if node is None else node, dict(adapter), metrics, head, nbytes=_wire_bytes(adapter))


def test_well_formed_reply_passes(setup):
    coordinator, adapter = setup
    assert coordinator.reply_problem(_reply(adapter, 0, 10)) is None


def test_a_reply_without_an_adapter_is_rejected(setup):
    coordinator, adapter = setup
    assert "one ArrayRecord and one MetricRecord" in coordinator.reply_problem(Reply(3, None, {"site-id": 0}))


def test_non_finite_weights_are_rejected_naming_the_tensor(setup):
    coordinator, adapter = setup
    bad = {k: v.clone() for k, v in adapter.items()}
    key = next(iter(bad))
    bad[key].view(-1)[0] = float("nan")
    assert f"tensor '{key}' is not finite" in coordinator.reply_problem(_reply(bad, 0, 10))


def test_extra_or_missing_keys_are_rejected(setup):
    coordinator, adapter = setup
    extra = dict(adapter, **{"base_model.model.something.weight": torch.zeros(2)})
    assert "unexpected ['base_model.model.something.weight']" in coordinator.reply_problem(_reply(extra, 0, 10))
    missing = dict(list(adapter.items())[1:])
    assert "missing" in coordinator.reply_problem(_reply(missing, 0, 10))


def test_aggregation_is_weighted_by_examples_and_drops_bad_replies(setup):
    coordinator, adapter = setup
    ones = {k: torch.ones_like(v) for k, v in adapter.items()}
    threes = {k: 3 * torch.ones_like(v) for k, v in adapter.items()}
    poisoned = {k: torch.full_like(v, float("inf")) for k, v in adapter.items()}
    replies = [_reply(t, i, n) for i, (t, n) in enumerate([(ones, 30), (threes, 10), (poisoned, 1000)])]
    averaged = coordinator.receive_train(1, replies)
    for key in adapter:
        assert np.allclose(averaged[key].numpy(), 1.5)  # (30 * 1 + 10 * 3) / 40
    assert sorted(coordinator.round.trained) == ["site-0", "site-1"]
    assert any("not finite" in reason for reason in coordinator.round.refused.values())


def test_the_average_does_not_depend_on_arrival_order(setup):
    coordinator, adapter = setup
    sites = [{k: torch.rand_like(v) for k, v in adapter.items()} for _ in range(3)]
    forward = coordinator.receive_train(1, [_reply(a, i, 10 + i) for i, a in enumerate(sites)])
    backward = coordinator.receive_train(1, [_reply(a, i, 10 + i) for i, a in reversed(list(enumerate(sites)))])
    for key in adapter:
        assert torch.equal(forward[key], backward[key])


def _coordinator(run_dir, *items, anchors=None, run_id=""):
    """(coordinator as build_coordinator makes it, its recorder, the initial adapter) for a 2-site config."""
    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16", *items])
    model = build_global_model(config)
    recorder = RunRecorder(config, run_dir, model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    coordinator = build_coordinator(config, recorder, list(adapter), anchors, run_id)
    coordinator.outgoing(adapter)
    return coordinator, recorder, adapter


def test_fp16_transport_halves_the_bytes_and_averages_in_fp32(tmp_path):
    coordinator, recorder, adapter = _coordinator(tmp_path, "federation.transport=fp16")
    assert isinstance(coordinator.method, SharedAdapter)
    wire = coordinator.outgoing(adapter)
    assert all(t.dtype == torch.float16 for t in wire.values())
    # a site's reply as the ClientApp sends it under fp16 transport
    a = {k: (torch.rand_like(v) / 3).half() for k, v in adapter.items()}
    b = {k: (torch.rand_like(v) / 3).half() for k, v in adapter.items()}
    averaged = coordinator.receive_train(1, [_reply(a, 0, 30), _reply(b, 1, 10)])
    fp32_bytes = _wire_bytes(adapter)
    assert abs(recorder.update_bytes - fp32_bytes / 2) < 0.05 * fp32_bytes  # the payload is the tensors
    assert recorder.uploads == 2 and recorder.upload_bytes == _wire_bytes(a) + _wire_bytes(b)
    for key in adapter:
        assert averaged[key].dtype == torch.float32
        expected = (30 * a[key].float() + 10 * b[key].float()) / 40  # fp32 average of what was sent
        assert torch.allclose(averaged[key], expected, atol=1e-6)


def test_stacked_coordinator_rejects_a_wrong_rank_and_stacks_the_rest(tmp_path):
    coordinator, _, initial = _coordinator(tmp_path, "lora.site_ranks={site-0: 2, site-1: 4}")
    assert isinstance(coordinator.method, StackedRanks)

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
    assert "lora.site_ranks gives site-1 rank 4" in coordinator.reply_problem(_reply(wrong, 1, 10))
    stacked = coordinator.receive_train(1, [_reply(update(2, 0.1), 0, 30), _reply(update(4, 0.2), 1, 10)])
    key = next(k for k in stacked if k.endswith("lora_A.weight"))
    a, b = stacked[key], stacked[key.replace("lora_A", "lora_B")]
    assert a.shape[0] == min(2 + 4, a[0].numel(), b.shape[0])  # ranks 2 + 4, unless the layer is narrower
    head = next(k for k in stacked if "lora_" not in k)
    assert torch.allclose(stacked[head], torch.full_like(stacked[head], (30 * 0.1 + 10 * 0.2) / 40))


def test_train_replies_are_anchored_and_a_missing_or_backward_head_is_rejected(tmp_path):
    from fedfm.privacy.anchors import AnchorLog
    from fedfm.privacy.heads import head_of
    from fedfm.privacy.ledger import SiteLedger
    from fedfm.privacy.signing import simulation_signer

    anchors = AnchorLog(tmp_path / "anchors")
    coordinator, _, adapter = _coordinator(tmp_path / "run", anchors=anchors, run_id="9")
    ledger = SiteLedger(tmp_path / "ledger", "site-0", simulation_signer(tmp_path / "ledger", "site-0"))
    heads = []
    for number in (1, 2):
        ledger.append({"round": number, "epsilon": float(number)})
        heads.append(head_of("site-0", ledger.verify(), ledger.signer))

    def reply(head, node=1):
        return _reply(adapter, 0, 10, node=node, head=None if head is None else head.to_dict())

    first = reply(heads[1])
    kept = coordinator.screen(2, [first]).kept
    assert len(kept) == 1 and kept[0].ledger_head is None  # anchored, then taken out before averaging
    assert anchors.last_for("site-0") == heads[1] and anchors.heads()[0][0]["run_id"] == "9"
    screening = coordinator.screen(3, [reply(None)])
    assert screening.kept == []
    assert "must carry its signed ledger head" in screening.refused["node 1"]
    screening = coordinator.screen(3, [reply(heads[0])])
    assert screening.kept == []  # the ledger went back from 2 entries to 1
    assert "site-0 sent a ledger head at 1 entries (epsilon 1.000000) after the coordinator anchored 2" in screening.refused["node 1"]
    assert len(anchors.heads()) == 1


def test_an_update_above_max_update_bytes_is_refused_before_it_is_decoded(tmp_path):
    coordinator, recorder, adapter = _coordinator(tmp_path, "federation.max_update_bytes=1000")
    decoded = []

    def load():
        decoded.append(True)
        return dict(adapter)

    big = Reply(7, None, {"num-examples": 10, "site-id": 1, "client-weight": 1}, nbytes=_wire_bytes(adapter), load=load)
    small_adapter = {k: v for k, v in adapter.items()}
    small = _reply(small_adapter, 0, 10)
    small.nbytes = 900
    averaged = coordinator.receive_train(1, [big, small])
    assert decoded == []  # never turned into tensors
    assert "site-1's update is" in coordinator.round.refused["node 7"]
    assert "above federation.max_update_bytes=1000: refused before decoding" in coordinator.round.refused["node 7"]
    assert sorted(coordinator.round.trained) == ["site-0"] and averaged is not None
    entry = coordinator.receive_evaluate(1, [])
    assert "federation.max_update_bytes" in entry["refused"]["node 7"]
