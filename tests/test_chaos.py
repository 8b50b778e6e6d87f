"""The fault soak (fedfm chaos): its plan is a function of the seed and reaches every fault; a
bounded soak of real local deployments (slow) loses no run."""

import json
import time

import pytest

from fedfm.chaos.hooks import SITECUSTOMIZE, write_sitecustomize
from fedfm.chaos.plan import CHECKPOINT_POINTS, KINDS, LEDGER_POINTS, SITE_SIDE, plan_fault


def test_a_seed_gives_the_same_plan_and_consecutive_seeds_reach_every_fault():
    assert [plan_fault(s, 3, 2, 90) for s in range(40)] == [plan_fault(s, 3, 2, 90) for s in range(40)]
    plans = [plan_fault(s, 3, 2, 90) for s in range(200)]
    assert {p.kind for p in plans[: len(KINDS)]} == set(KINDS)
    assert {p.round for p in plans} == {1, 2, 3} and {p.site for p in plans} == {0, 1}
    assert {p.point for p in plans if p.kind == "kill-in-ledger-write"} == set(LEDGER_POINTS)
    assert {p.point for p in plans if p.kind == "kill-in-checkpoint-write"} == set(CHECKPOINT_POINTS)
    for plan in plans:
        assert plan.site_side == (plan.kind in SITE_SIDE)
        assert 0 < plan.fraction < 1 or plan.kind not in ("kill-in-ledger-write", "kill-in-checkpoint-write")
        if plan.kind == "drop-reply":
            assert plan.sleep_s > 90  # past the round timeout: the server drops it
        if plan.kind == "delay-reply":
            assert 0 < plan.sleep_s < 90
        assert f"seed {plan.seed}: {plan.kind}" in plan.describe()


def test_a_plan_needs_a_round_and_a_site():
    with pytest.raises(ValueError, match="at least 1 round"):
        plan_fault(0, 0, 2, 90)


def test_the_hook_is_inert_without_its_environment_variable(tmp_path, monkeypatch):
    from fedfm.chaos import hooks

    assert (write_sitecustomize(tmp_path) / "sitecustomize.py").read_text() == SITECUSTOMIZE
    monkeypatch.delenv(hooks.ENV, raising=False)
    monkeypatch.setattr("sys.orig_argv", ["python", "-m", "fedfm.deploy.site_worker", "x.sock"])
    assert hooks.process_kind() == hooks.SITE
    hooks.install()  # nothing to do, nothing patched
    import fedfm.privacy.ledger as ledger

    assert ledger.atomic_write.__module__ == "fedfm.privacy.ledger"


def test_the_hooks_act_where_a_sites_code_runs(monkeypatch):
    from fedfm.chaos import hooks

    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python", "/venv/bin/flwr-clientapp", "--token", "t"])
    monkeypatch.setenv("FEDFM_SITE_WORKER", "1")
    assert hooks.process_kind() is None  # it forwards to the site's worker, which runs the site's code
    monkeypatch.setenv("FEDFM_SITE_WORKER", "0")
    assert hooks.process_kind() == hooks.SITE
    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python", "/venv/bin/flwr-serverapp"])
    assert hooks.process_kind() == hooks.COORDINATOR
    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python", "-m", "runtime.serverapp", "--token", "t"])
    assert hooks.process_kind() == hooks.COORDINATOR  # as runtime/superlink.py's SuperExec starts it
    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python", "-m", "runtime.superlink"])
    assert hooks.process_kind() is None
    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python", "/venv/bin/flower-supernode"])
    assert hooks.process_kind() is None


@pytest.mark.slow
def test_a_bounded_soak_loses_no_run(tmp_path):
    from fedfm.chaos.soak import soak, table

    started = time.time()
    # seeds 0 and 1: SIGKILL inside a site's ledger-head write after its round-2 entry, and inside the
    # coordinator's state.json write of round 1; no reference run (check d)
    report = soak(tmp_path / "soak", seed=0, runs=2, rounds=2, reference=False)
    print(table(report), f"\n{time.time() - started:.0f} s")
    summary = report["summary"]
    assert summary["runs"] == 2 and summary["lost"] == 0
    assert summary["injected"] == 2 and summary["recovered"] == 2, json.dumps(report["outcomes"], indent=1)
