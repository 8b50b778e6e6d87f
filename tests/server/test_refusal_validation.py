"""A site that refuses a round for lack of budget has first validated the last round's adapter (the
train message asked it to): its refusal carries those metrics through the ClientApp's and the
ServerApp's glue, and they count for that round's validation as an accepted reply's do."""

from types import SimpleNamespace

from clients.app import reply_content
from fedfm import site_calls
from fedfm.config import load_config
from fedfm.federation import build_coordinator
from fedfm.federation.workflow import run_rounds
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.protocol import BUDGET_REFUSED, SERVER_ROUND, VALIDATE, VALIDATION
from fedfm.results import RunRecorder
from fedfm.training.local import plan_steps
from server.app import as_reply

SETTINGS = ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16", "federation.rounds=2",
            "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "train.class_balance=none",
            "federation.site_wait_s=0"]


def _config(tmp_path, *extra):
    return load_config(None, [*SETTINGS, f"output.dir={tmp_path}", *extra])


def _one_round_budget(config):
    """A budget between one round's epsilon and two rounds'."""
    site = site_calls.build_site({"config-json": config.to_json()}, {"partition-id": 1}, "")
    plan = plan_steps(len(site.data.train), config.train.batch_size, config.train.local_epochs)
    eps = [SiteAccountant("rdp", [StepBatch(1.0, plan.sample_rate, plan.steps * k)]).epsilon(config.privacy.delta)
           for k in (1, 2)]
    return (eps[0] + eps[1]) / 2


def _answer(site, message):
    """What the ServerApp makes of the ClientApp's answer to ``message`` (clients/app.py, then server/app.py)."""
    outcome = site_calls.CALLS[message.kind](site, site_calls.as_numpy(message.adapter), message.config)
    answer = {"metrics": outcome.metrics, "arrays": outcome.arrays, "head": outcome.head, "error": outcome.error,
              "seconds": 0.0}
    if outcome.error is not None and not outcome.metrics:  # a Flower error reply
        return as_reply(SimpleNamespace(metadata=SimpleNamespace(src_node_id=message.node), has_error=lambda: True,
                                        error=SimpleNamespace(code=outcome.error[0], reason=outcome.error[1])))
    return as_reply(SimpleNamespace(metadata=SimpleNamespace(src_node_id=message.node), has_error=lambda: False,
                                    content=reply_content(message.kind, answer, 0.0)))


class GlueLink:
    """Two real sites (nodes 10 and 11), each answer through the Flower glue's records."""

    def __init__(self, sites):
        self.sites, self.sent = sites, []

    def nodes(self):
        return sorted(self.sites)

    def wire_bytes(self, adapter):
        return sum(t.numel() * t.element_size() for t in adapter.values())

    def exchange(self, messages, timeout):
        self.sent += messages
        return [_answer(self.sites[m.node], m) for m in messages]


def test_a_budget_refusal_carries_the_validation_the_site_computed_first(tmp_path):
    config = _config(tmp_path)
    config = _config(tmp_path, f"privacy.budget.sites={{site-1: {_one_round_budget(config)}}}")
    run_config = {"config-json": config.to_json(), "out-dir": str(tmp_path)}
    site = site_calls.build_site(run_config, {"partition-id": 1}, "")
    arrays = site_calls.as_numpy(adapter_state_dict(build_global_model(config)))
    assert site_calls.train(site, arrays, {SERVER_ROUND: 1}).error is None
    refused = site_calls.train(site, arrays, {SERVER_ROUND: 2, VALIDATE: True})
    assert refused.error[0] == BUDGET_REFUSED and "site-1 refuses the round" in refused.error[1]
    validation = site_calls.evaluate(site, arrays, {"split": "val"}).metrics
    assert refused.metrics == {VALIDATION + k: v for k, v in validation.items()}

    model = build_global_model(config)
    recorder = RunRecorder(config, tmp_path / "run", model, full_model_bytes(model))
    adapter = adapter_state_dict(model)
    coordinator = build_coordinator(config, recorder, list(adapter))
    sites = {10 + k: site_calls.build_site(run_config, {"partition-id": k}, "") for k in (0, 1)}
    link = GlueLink(sites)
    run_rounds(link, coordinator, adapter, 2, 60, lambda r, a: None)
    first, second = recorder.rounds
    assert second["participants"] == ["site-0"] and "site-1 refuses the round" in second["refused"]["node 11"]
    asked = [(m.kind, m.config[SERVER_ROUND], bool(m.config.get(VALIDATE))) for m in link.sent if m.node == 11]
    assert asked[:2] == [("train", 1, False), ("train", 2, True)]  # round 1's validation rode with round 2's training
    # site-1's validation of round 1's adapter came with its refusal: it counts as site-0's, from its accepted reply
    assert sorted(first["val"]) == ["site-0", "site-1"]
    assert set(first["val"]["site-1"]) == set(first["val"]["site-0"]) and first["val_auroc"] is not None
