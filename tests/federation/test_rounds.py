"""The federation core end to end over an in-memory link: refusals, held-out sites, client-level
DP releases and their ledger, bytes and checkpoints. No Flower."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from fedfm.config import load_config
from fedfm.eval.calibration import site_statistics
from fedfm.federation import ClientLevelDP, Outgoing, Reply, build_coordinator
from fedfm.federation.aggregate import clip_update, update_norm
from fedfm.federation.workflow import run_rounds
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.protocol import (BUDGET_REFUSED, CALIBRATION_STATS, HELD_OUT, RETURN_PREDICTIONS, SPLIT, VALIDATE,
                            server_round, with_validation)
from fedfm.results import RunRecorder


def _bytes(adapter):
    return sum(t.numel() * t.element_size() + len(k) for k, t in adapter.items())


class MemoryLink:
    """Sites as functions: ``behaviour[node](outgoing) -> Reply``; records every message."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.sent: list[Outgoing] = []

    def nodes(self):
        return list(self.behaviour)

    def exchange(self, messages, timeout):
        self.sent.extend(messages)
        return [self.behaviour[m.node](m) for m in messages]

    def wire_bytes(self, adapter):
        return _bytes(adapter)


def trains(site_id, n, shift=1.0):
    def validation(adapter):  # depends on the adapter evaluated, like a real site's metrics
        first = next(iter(adapter.values())).float().mean().item()
        return {"site-id": site_id, "num-examples": n, "auroc": 0.5 + 0.1 * site_id, "level": first}

    def reply(message):
        if message.kind == "evaluate":
            metrics = validation(message.adapter)
            if message.config.get(RETURN_PREDICTIONS):  # what a final validation also asks for
                metrics.update({"probs": [0.4, 0.6], "labels": [1]})
            if message.config.get(CALIBRATION_STATS):
                metrics.update(site_statistics(np.array([[0.4, 0.6]]), np.array([1])))
            return Reply(message.node, metrics=metrics)
        adapter = {k: v.float() + shift for k, v in message.adapter.items()}
        metrics = {"site-id": site_id, "num-examples": n, "client-weight": 1, "train-loss": 0.25,
                   "epsilon": float(server_round(message.config))}
        if message.config.get(VALIDATE):
            with_validation(metrics, validation(message.adapter))
        return Reply(message.node, adapter, metrics, nbytes=_bytes(adapter))
    return reply


def refuses(code, site_id):
    def reply(message):
        if message.kind == "evaluate":
            return Reply(message.node, metrics={"site-id": site_id, "num-examples": 5, "auroc": 0.6})
        return Reply(message.node, error_code=code, error_reason=f"site-{site_id} says no")
    return reply


def _run(tmp_path, *items):
    config = load_config(None, ["data.num_sites=3", "data.samples_per_site=60", "data.image_size=16",
                                "privacy.enabled=false", *items])
    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path, model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    return config, recorder, adapter, build_coordinator(config, recorder, list(adapter))


def test_rounds_average_record_and_count_bytes(tmp_path):
    config, recorder, adapter, coordinator = _run(tmp_path, "federation.rounds=2",
                                                  "federation.validate_with_next_train=false")
    link = MemoryLink({10: trains(0, 30, 1.0), 11: trains(1, 10, 3.0), 12: trains(2, 40, 0.0)})
    checkpoints = []
    final = run_rounds(link, coordinator, adapter, 2, 60, lambda r, a: checkpoints.append(r))
    for key, value in adapter.items():  # each round adds the weighted mean shift (30 + 30 + 0) / 80
        assert torch.allclose(final[key], value + 2 * 0.75, atol=1e-6)
    assert checkpoints == [0, 1, 2]
    assert [r["participants"] for r in recorder.rounds] == [["site-0", "site-1", "site-2"]] * 2
    assert [m.config[SPLIT] for m in link.sent if m.kind == "evaluate"] == ["val"] * 6
    assert list(recorder.rounds[0]["val"]) == ["site-0", "site-1", "site-2"]
    assert recorder.bytes_moved == 2 * (3 + 3 + 3) * _bytes(adapter)  # down for train and validation, up for train
    assert recorder.uploads == 6


def _without_times(rounds):
    return [{k: v for k, v in entry.items() if k != "elapsed_s"} for entry in rounds]


def test_validation_with_the_next_train_message_records_the_same_rounds_with_fewer_messages(tmp_path):
    behaviour = {10: trains(0, 30, 1.0), 11: trains(1, 10, 3.0), 12: trains(2, 40, 0.0)}
    runs = {}
    for mode in ("false", "true"):
        config, recorder, adapter, coordinator = _run(tmp_path / mode, "federation.rounds=3",
                                                      f"federation.validate_with_next_train={mode}")
        link = MemoryLink(behaviour)
        run_rounds(link, coordinator, adapter, 3, 60, lambda r, a: None)
        runs[mode] = (recorder, link)
    (two, two_link), (one, one_link) = runs["false"], runs["true"]
    assert _without_times(one.rounds) == _without_times(two.rounds)  # every round's validation, same values
    assert all(entry["val"] and not any(k.startswith("validation-") for m in entry["train"].values() for k in m)
               for entry in one.rounds)
    kinds = lambda link: [(server_round(m.config), m.kind, bool(m.config.get(VALIDATE))) for m in link.sent]
    assert kinds(two_link).count((1, "evaluate", False)) == 3 and len(two_link.sent) == 18
    # rounds 2 and 3 carry the validation of rounds 1 and 2; only the last round sends evaluate messages
    assert kinds(one_link) == [(1, "train", False)] * 3 + [(2, "train", True)] * 3 + [(3, "train", True)] * 3 \
        + [(3, "evaluate", False)] * 3
    assert one.bytes_moved < two.bytes_moved


def test_a_site_that_does_not_train_next_round_still_validates_this_rounds_adapter(tmp_path):
    config, recorder, adapter, coordinator = _run(tmp_path, "federation.rounds=2", "federation.fraction_train=0.5",
                                                  "federation.min_train_sites=1")
    link = MemoryLink({10: trains(0, 30, 1.0), 11: trains(1, 10, 3.0), 12: trains(2, 40, 0.0)})
    run_rounds(link, coordinator, adapter, 2, 60, lambda r, a: None)
    assert [sorted(entry["val"]) for entry in recorder.rounds] == [["site-0", "site-1", "site-2"]] * 2
    round_two = [m for m in link.sent if server_round(m.config) == 1 and m.kind == "evaluate"] + \
        [m for m in link.sent if server_round(m.config) == 2 and m.kind == "train"]
    assert sorted(m.node for m in round_two) == [10, 11, 12]  # one message each: train (+ validate) or evaluate


def test_a_site_out_of_budget_is_not_asked_again_and_training_stops_when_all_are(tmp_path):
    config, recorder, adapter, coordinator = _run(tmp_path, "federation.rounds=3")
    link = MemoryLink({1: trains(0, 30), 2: refuses(BUDGET_REFUSED, 1)})
    run_rounds(link, coordinator, adapter, 1, 60, lambda r, a: None)
    assert recorder.rounds[0]["participants"] == ["site-0"] and "node 2" in recorder.rounds[0]["refused"]
    assert coordinator.out_of_budget == {2}
    link = MemoryLink({2: refuses(BUDGET_REFUSED, 1)})
    coordinator.out_of_budget = {2}
    assert coordinator.train_nodes(2, link.nodes()) == []
    assert recorder.stopped == "round 2: every site has spent its privacy budget"
    assert coordinator.evaluate_nodes(2, link.nodes()) == []


def test_a_held_out_site_is_evaluated_but_never_asked_to_train_again(tmp_path):
    config, recorder, adapter, coordinator = _run(tmp_path, "federation.rounds=2")
    link = MemoryLink({1: trains(0, 30), 2: trains(1, 30), 3: refuses(HELD_OUT, 2)})
    run_rounds(link, coordinator, adapter, 2, 60, lambda r, a: None)
    trained_by = [m.node for m in link.sent if m.kind == "train"]
    assert trained_by.count(3) == 1 and trained_by.count(1) == 2
    assert recorder.rounds[0]["refused"] == {} and "site-2" in recorder.rounds[1]["val"]


def test_fewer_connected_sites_than_a_round_needs_waits():
    config = load_config(None, ["data.num_sites=3", "federation.min_train_sites=2"])
    from fedfm.federation.coordinator import sample_nodes
    import random

    assert sample_nodes([1], 1.0, 2, 2, random.Random(0)) is None
    assert sorted(sample_nodes([1, 2, 3], 1.0, 2, 2, random.Random(0))) == [1, 2, 3]
    assert len(sample_nodes([1, 2, 3, 4], 0.5, 1, 1, random.Random(0))) == 2
    assert sample_nodes([1, 2], 0.0, 1, 1, random.Random(0)) == []
    assert config.federation.min_train_sites == 2


def _adapter(*shape_values):
    return {f"k{i}": torch.full(shape, value) for i, (shape, value) in enumerate(shape_values)}


def test_clipping_scales_the_update_to_the_norm_and_leaves_small_ones():
    current = _adapter(((3,), 1.0), ((2, 2), -1.0))
    big = {k: v + 10.0 for k, v in current.items()}  # update norm 10 * sqrt(7)
    clipped = clip_update(big, current, 2.0)
    update = [(clipped[k] - current[k]).numpy() for k in current]
    assert update_norm(update) == pytest.approx(2.0, rel=1e-6)
    assert all(np.allclose(u, 2.0 / math.sqrt(7)) for u in update)
    small = {k: v + 0.1 for k, v in current.items()}
    assert all(torch.allclose(clip_update(small, current, 2.0)[k], small[k]) for k in current)


def _client_replies(current, shifts):
    return [Reply(i, {k: v + s for k, v in current.items()}, {"site-id": i, "client-weight": 1, "num-examples": 10 * (i + 1)})
            for i, s in enumerate(shifts)]


def test_client_level_release_clips_averages_equally_adds_noise_and_ledgers(tmp_path):
    current = _adapter(((400,), 0.0), ((20, 20), 0.0))
    noiseless = ClientLevelDP(1e-9, 1.0, 2, 4, 1e-3, tmp_path / "a", rng=np.random.default_rng(0))
    released = noiseless.aggregate(1, current, _client_replies(current, [100.0, 0.001]))
    # site 0 clipped to norm 1 (each of its 800 entries 1/sqrt(800)); equal weights, not by examples
    assert np.allclose(released["k0"].numpy(), (1 / math.sqrt(800) + 0.001) / 2, atol=1e-6)

    z, clip, sampled = 1.1, 0.5, 2
    dp = ClientLevelDP(z, clip, sampled, 4, 1e-3, tmp_path / "b", rng=np.random.default_rng(1))
    noisy = dp.aggregate(1, current, _client_replies(current, [0.0, 0.0]))
    values = np.concatenate([t.numpy().ravel() for t in noisy.values()])
    assert values.std() == pytest.approx(z * clip / sampled, rel=0.1)
    dp.aggregate(2, current, _client_replies(current, [0.0, 0.0]))
    reference = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    reference.compose(dp_accounting.GaussianDpEvent(z), 2)
    entries = dp.ledger.verify()
    assert [e["round"] for e in entries] == [1, 2]
    assert entries[-1]["epsilon"] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-12)
    assert dp.guarantee["rounds"] == 2 and dp.guarantee["epsilon"] == entries[-1]["epsilon"]
    resumed = ClientLevelDP(z, clip, sampled, 4, 1e-3, tmp_path / "b")  # a resumed run continues the accountant
    assert resumed.accountant.releases == 2 and resumed.accountant.epsilon() == entries[-1]["epsilon"]


def test_client_level_round_with_a_missing_site_releases_nothing(tmp_path):
    current = _adapter(((4,), 0.0))
    dp = ClientLevelDP(1.0, 1.0, 3, 3, 1e-3, tmp_path)
    assert dp.aggregate(1, current, _client_replies(current, [0.1, 0.2])) is None
    assert dp.ledger.verify() == [] and dp.guarantee is None


def test_the_last_rounds_validation_is_the_final_validation_one_message_per_site(tmp_path):
    """The final adapter is the last round's: its validation replies fill that round's record too."""
    from fedfm.federation.workflow import RunRequest, serve

    behaviour = {10: trains(0, 30, 1.0), 11: trains(1, 10, 3.0), 12: trains(2, 40, 0.0)}
    runs = {}
    for mode in ("false", "true"):
        config, *_ = _run(tmp_path / mode, "federation.rounds=2", f"federation.validate_with_next_train={mode}",
                          "eval.test=false", "eval.share_predictions=true", "federation.site_wait_s=0")
        link = MemoryLink(behaviour)
        serve(link, config, RunRequest(run_dir=tmp_path / mode / "run"))
        runs[mode] = link, json.loads((tmp_path / mode / "run" / "results.json").read_text())
    (two_link, two), (one_link, one) = runs["false"], runs["true"]
    assert _without_times(one["rounds"]) == _without_times(two["rounds"]) and one["rounds"][-1]["val"]
    assert one["validation"] == two["validation"]
    kinds = lambda link: [(m.kind, m.config.get(SPLIT), m.config.get("server-round")) for m in link.sent]
    # round 2's validation and the final one were two messages per site; now they are one
    assert kinds(two_link).count(("evaluate", "val", 2)) == 3 and kinds(two_link).count(("evaluate", "val", None)) == 3
    assert kinds(one_link)[-3:] == [("evaluate", "val", 2)] * 3 and len(one_link.sent) == len(two_link.sent) - 6


def test_results_report_the_epsilon_a_sites_ledger_holds_where_the_coordinator_can_read_it(tmp_path):
    """Round 2's reply of site-1 is rejected (non-finite) after its ledger recorded the round: the
    last accepted reply says epsilon 1, the ledger 2. Simulation reads the ledger; deployment, whose
    ledgers stay at the sites, keeps the reply's value and says so."""
    from fedfm.federation.workflow import RunRequest, serve
    from fedfm.privacy.ledger import SiteLedger

    def ledgered(ledgers):
        honest = trains(1, 10)

        def reply(message):
            answer = honest(message)
            if message.kind == "train":
                SiteLedger(ledgers, "site-1").append({"round": server_round(message.config), "steps": 1,
                                                      "epsilon": float(server_round(message.config))})
                if server_round(message.config) == 2:
                    answer.arrays = {k: torch.full_like(v, math.nan) for k, v in answer.arrays.items()}
            return answer
        return reply

    spent = {}
    for where in ("simulation", "deployment"):
        ledgers = tmp_path / where / "ledger"
        config, *_ = _run(tmp_path / where, "federation.rounds=2", "eval.test=false", "federation.site_wait_s=0")
        request = RunRequest(run_dir=tmp_path / where / "run", ledger_dir=str(ledgers) if where == "simulation" else "")
        results = serve(MemoryLink({10: trains(0, 30), 11: ledgered(ledgers)}), config, request)
        assert "rejected" in results["rounds"][1]["refused"]["node 11"]
        spent[where] = {k: results["sites"]["site-1"][k] for k in ("epsilon", "epsilon_source")}
    assert spent == {"simulation": {"epsilon": 2.0, "epsilon_source": "ledger"},
                     "deployment": {"epsilon": 1.0, "epsilon_source": "train reply"}}
