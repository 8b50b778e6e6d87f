"""An in-process baseline interrupted after it spent privacy restarts on its sites' ledgers: what
the interrupted attempt spent is never deleted, the audit verifies and composes both attempts, the
restart's budget counts it, and a site it leaves too little for stops early, saying so."""

import json

from fedfm.audit.ledgers import audit_run
from fedfm.config import load_config
from fedfm.models import adapter_state_dict
from fedfm.privacy.accountant import SiteAccountant, StepBatch
from fedfm.privacy.ledger import SiteLedger
from fedfm.site import Site
from fedfm.study import baseline_config, run_in_process_baselines
from fedfm.training.local import plan_steps

ROUNDS = 3
SETTINGS = ["data.num_sites=2", "data.samples_per_site=60", "data.image_size=16", f"federation.rounds={ROUNDS}",
            "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "train.class_balance=none",
            "eval.baselines=[local]"]


def _budget_for_rounds(config, rounds: int, probe) -> float:
    """An epsilon budget that holds ``rounds`` rounds of a site and not one more."""
    data = Site(config, 0, probe).data
    plan = plan_steps(len(data.train), config.train.batch_size, config.train.local_epochs)
    after = lambda k: SiteAccountant("rdp", [StepBatch(1.0, plan.sample_rate, plan.steps)] * k).epsilon(config.privacy.delta)
    return (after(rounds) + after(rounds + 1)) / 2


def test_a_restarted_baseline_keeps_and_counts_what_its_interrupted_attempt_spent(tmp_path, capsys):
    config = load_config(None, SETTINGS)
    config = load_config(None, [*SETTINGS, f"privacy.budget.epsilon={_budget_for_rounds(config, ROUNDS, tmp_path / 'probe')}"])
    root = tmp_path / "baselines"
    ledgers = root / "local" / "ledger"
    interrupted = Site(baseline_config(config, "local"), 0, ledgers, run_id="interrupted")
    for server_round in (1, 2):  # the attempt the kill stopped: two of its three rounds trained and recorded
        interrupted.train(adapter_state_dict(interrupted.method.global_model()), server_round)
    before = SiteLedger(ledgers, "site-0").verify()

    run_in_process_baselines(config, ["local"], root)
    said = capsys.readouterr().out
    entries = SiteLedger(ledgers, "site-0").verify()
    assert len(before) == 2 and entries[:2] == before  # kept, never deleted
    assert [e["round"] for e in entries] == [1, 2, 1]  # the restart's round 2 would take it above the budget
    assert f"baseline local was interrupted after spending epsilon site-0 {before[-1]['epsilon']:.3f}" in said
    assert "baseline local: site-0 stopped early: site-0 refuses the round" in said
    audit = {a.site: a for a in audit_run(root / "local")}["site-0"]  # fedfm audit RUN/baselines/local
    assert audit.passed and [run["rounds"] for run in audit.runs] == [2, 1]  # both attempts, composed
    assert audit.reported_epsilon == entries[-1]["epsilon"] <= config.privacy.budget.epsilon
    site = json.loads((root / "local" / "results.json").read_text())["sites"]["site-0"]
    assert site["epsilon"] == entries[-1]["epsilon"]  # what the ledger holds: both attempts
    assert [e["round"] for e in SiteLedger(ledgers, "site-1").verify()] == [1, 2, 3]  # site-1 was not interrupted
