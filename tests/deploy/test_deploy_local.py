"""The deployment runtime on loopback with TLS and node authentication, and the faults it survives.

Every ClientApp call in a deployment is a fresh process (torch import, model build), so these
runs take minutes: the module is marked ``slow`` and runs in CI with ``pytest -m slow``.
"""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.deploy.init import init_deployment
from fedfm.deploy.local import LocalDeployment, site_node_config
from fedfm.audit.ledgers import audit_run
from fedfm.privacy.ledger import SiteLedger
from fedfm.simulate import prepare_run_dir, write_run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.samples_per_site=120", "data.image_size=16", "train.batch_size=16"]

# Loaded by every Python process of the SuperNode it is given to (PYTHONPATH), so that site's
# ClientApp sends back non-finite adapter weights: a broken or malicious site, without a switch
# for it in fedfm itself.
NON_FINITE_SITE = '''
import fedfm.site as site_module

_train = site_module.Site.train

def _poisoned(self, global_adapter, server_round):
    reply = _train(self, global_adapter, server_round)
    key = sorted(reply.adapter)[0]
    reply.adapter[key].fill_(float("nan"))
    return reply

site_module.Site.train = _poisoned
'''


# Loaded by the site worker of the SuperNode it is given to: in round 2 the worker announces its
# pid in a file, then trains slowly, so the test can SIGKILL it in the middle of that round.
SLOW_ROUND_TWO = '''
import os
import sys
if "fedfm.deploy.site_worker" in sys.orig_argv:
    import time
    import fedfm.site as site_module

    _train = site_module.Site.train

    def _slow(self, global_adapter, server_round):
        if server_round == 2 and not os.path.exists(os.environ["WORKER_MARKER"]):
            with open(os.environ["WORKER_MARKER"], "w") as marker:
                marker.write(str(os.getpid()))
            time.sleep(120)
        return _train(self, global_adapter, server_round)

    site_module.Site.train = _slow
'''


def _config(*overrides):
    return load_config(REPO / "configs" / "quickstart.yaml", [*TINY, *overrides])


def _in_thread(fn, *args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_deploy_local_three_sites_with_tls_and_auth_matches_simulation_in_form(tmp_path):
    out = tmp_path / "run"
    args = ["deploy", "local", "--sites", "3", "--out", str(out), "--set", "federation.rounds=2"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["participants"] == ["site-0", "site-1", "site-2"] for r in results["rounds"])
    # the same sections and per-site fields as a simulation run's results.json
    assert set(results) >= {"rounds", "sites", "pooled", "worst_site", "communication", "config"}
    for name in ("site-0", "site-1", "site-2"):
        site = results["sites"][name]
        assert set(site) >= {"n_train", "n_test", "test", "test_ci95", "epsilon", "reliability", "label_counts"}
        entries = [e for e in SiteLedger(out / "ledger", name).verify() if e.get("kind") != "label-counts"]
        assert [e["round"] for e in entries] == [1, 2] and entries[-1]["epsilon"] == site["epsilon"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # TLS and authentication were on: the SuperLink got the certificate and the auth flag
    log = (out / "deployment" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log
    assert all(a.passed for a in audit_run(out))


def test_unregistered_site_refused_non_finite_update_rejected_killed_site_survived(tmp_path):
    config = _config("data.num_sites=3", "federation.rounds=2", "federation.round_timeout_s=240")
    run_dir = prepare_run_dir(config, str(tmp_path / "run"))
    dep = init_deployment(run_dir / "deployment", sites=4)  # site-3's key is never registered
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "sitecustomize.py").write_text(NON_FINITE_SITE)
    with LocalDeployment(dep, run_dir / "deployment") as local:
        local.start_superlink()
        for site in (0, 1, 2):
            local.register(site)
        local.start_supernode(0, site_node_config(config, 0, run_dir / "ledger"))
        local.start_supernode(1, site_node_config(config, 1, run_dir / "ledger"))
        local.start_supernode(2, site_node_config(config, 2, run_dir / "ledger"), env={"PYTHONPATH": str(poison)})
        intruder = local.start_supernode(3, {"site-id": 3, "ledger-dir": str(run_dir / "ledger")})
        local.wait_online([0, 1, 2])

        thread, box = _in_thread(local.run_app, write_run_config(config, run_dir), run_dir / "flwr.log")
        # site-1 dies during round 2 (after its round-1 ledger entry, once round 2 was sent)
        _wait_for(lambda: (run_dir / "checkpoint" / "state.json").exists(), 900, "round 1 to finish")
        local.kill("site-1")
        thread.join(timeout=1200)
        assert not thread.is_alive() and box["value"] == 0

        # the unregistered site never got in
        assert intruder.poll() is not None and intruder.returncode != 0
        assert "Failed to activate SuperNode" in (run_dir / "deployment" / "site-3.log").read_text()
        assert local.node_ids.keys() == {0, 1, 2}

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and [r["round"] for r in results["rounds"]] == [1, 2]
    first, second = results["rounds"]
    assert first["participants"] == ["site-0", "site-1"]  # site-2's update was rejected
    assert second["participants"] == ["site-0"]  # site-1 was killed, site-2 rejected again
    rejected = [reason for r in results["rounds"] for reason in r["refused"].values() if "not finite" in reason]
    assert len(rejected) == 2
    assert "site-3" not in results["sites"]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(math.isfinite(float(t.abs().sum())) for t in adapter.values())
    assert [e["round"] for e in SiteLedger(run_dir / "ledger", "site-0").verify() if e.get("kind") != "label-counts"] == [1, 2]


def test_a_site_worker_killed_mid_round_costs_that_round_only_and_loses_nothing(tmp_path):
    config = _config("data.num_sites=2", "federation.rounds=3")
    run_dir = prepare_run_dir(config, str(tmp_path / "run"))
    dep = init_deployment(run_dir / "deployment", sites=2)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_ROUND_TWO)
    marker = tmp_path / "worker-pid"
    with LocalDeployment(dep, run_dir / "deployment") as local:
        local.start_superlink()
        for site in (0, 1):
            local.register(site)
        local.start_supernode(0, site_node_config(config, 0, run_dir / "ledger"))
        local.start_supernode(1, site_node_config(config, 1, run_dir / "ledger"),
                              env={"PYTHONPATH": str(hooks), "WORKER_MARKER": str(marker)})
        local.wait_online([0, 1])
        thread, box = _in_thread(local.run_app, write_run_config(config, run_dir), run_dir / "flwr.log")
        _wait_for(marker.exists, 900, "site-1's worker to start round 2")
        time.sleep(0.5)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the worker, mid-round; its SuperNode lives on
        thread.join(timeout=900)
        assert not thread.is_alive() and box["value"] == 0
        site_log = (run_dir / "deployment" / "site-1.log").read_text()
        assert site_log.count("starting this site's worker") == 2  # the next message started a new one

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    assert [r["participants"] for r in results["rounds"]] == [["site-0", "site-1"], ["site-0"], ["site-0", "site-1"]]
    assert any("worker died" in reason for reason in results["rounds"][1]["refused"].values())
    for name in ("site-0", "site-1"):
        trained = [e["round"] for e in SiteLedger(run_dir / "ledger", name).verify() if e.get("kind") != "label-counts"]
        assert trained == ([1, 2, 3] if name == "site-0" else [1, 3])  # killed before its round-2 steps
        assert results["sites"][name]["epsilon"] == SiteLedger(run_dir / "ledger", name).verify()[-1]["epsilon"]
    assert all(a.passed for a in audit_run(run_dir))


def test_coordinator_restart_resumes_from_its_checkpoint_with_ledgers_intact(tmp_path):
    # fixed noise and a roomy budget: a round the coordinator loses still spends privacy, and must not
    # push a site over its budget in this test
    config = _config("data.num_sites=2", "federation.rounds=3", "privacy.noise_multiplier=1.0",
                     "privacy.budget.epsilon=100", "privacy.accountant=rdp")
    run_dir = prepare_run_dir(config, str(tmp_path / "run"))
    dep = init_deployment(run_dir / "deployment", sites=2)
    with LocalDeployment(dep, run_dir / "deployment") as local:
        local.start_superlink()
        for site in (0, 1):
            local.register(site)
            local.start_supernode(site, site_node_config(config, site, run_dir / "ledger"))
        local.wait_online([0, 1])
        thread, box = _in_thread(local.run_app, write_run_config(config, run_dir), run_dir / "flwr.log")
        _wait_for(lambda: (run_dir / "checkpoint" / "state.json").exists(), 900, "round 1 to finish")
        local.kill("superlink")  # the coordinator crashes (SuperLink and ServerApp)
        thread.join(timeout=120)
        assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] >= 1
        done_before = json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]

        local.start_superlink()  # same database, same port: registered sites reconnect by themselves
        local.wait_online([0, 1], timeout=300)
        code = local.run_app(write_run_config(config, run_dir, resume=True), run_dir / "flwr-resumed.log")
        assert code == 0

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert done_before < 3
    for name in ("site-0", "site-1"):
        entries = SiteLedger(run_dir / "ledger", name).verify()  # hash chain intact across the crash
        rounds = [e["round"] for e in entries if e.get("kind") != "label-counts"]
        # a round the crashed coordinator had sent may have been trained (and spent) before it died
        assert rounds in ([1, 2, 3], [1, 2, 2, 3]) or rounds[: done_before] == list(range(1, done_before + 1))
        assert rounds[-1] == 3
        assert results["sites"][name]["epsilon"] == entries[-1]["epsilon"]
    # epsilon continues exactly: an independent recomputation over the whole ledger agrees
    assert all(a.passed for a in audit_run(run_dir))


def test_consecutive_deployments_on_the_same_site_state_continue_each_sites_epsilon(tmp_path, capsys):
    state = tmp_path / "state"
    base = ["deploy", "local", "--sites", "2", "--state", str(state), "--set", "federation.rounds=1",
            "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.accountant=rdp", "--set", "train.class_balance=none"]
    for item in TINY:
        base += ["--set", item]
    assert main([*base, "--out", str(tmp_path / "first"), "--set", "privacy.budget.epsilon=100"]) == 0
    assert main([*base, "--out", str(tmp_path / "second"), "--set", "privacy.budget.epsilon=100"]) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())["sites"]
    second = json.loads((tmp_path / "second" / "results.json").read_text())["sites"]
    for name in ("site-0", "site-1"):
        entries = SiteLedger(state / "ledger", name).verify()
        assert len(entries) == 2 and len({e["run_id"] for e in entries}) == 2  # one ledger, two runs
        assert entries[0]["epsilon"] == first[name]["epsilon"] and entries[1]["epsilon"] == second[name]["epsilon"]
        assert second[name]["epsilon"] > first[name]["epsilon"]  # the second run continued the spend
    capsys.readouterr()
    audit = ["audit", str(state / "ledger"), "--keys", str(state / "deployment" / "keys"), "--anchors", str(state / "anchors")]
    assert main(audit) == 0
    assert "2 runs on this ledger" in capsys.readouterr().out
    # a lifetime budget the two runs have spent: every site refuses the third run's round
    spent = max(s["epsilon"] for s in second.values())
    assert main([*base, "--out", str(tmp_path / "third"), "--set", f"privacy.budget.epsilon={spent + 0.01}"]) == 0
    third = json.loads((tmp_path / "third" / "results.json").read_text())
    assert third["rounds"][0]["participants"] == [] and len(third["rounds"][0]["refused"]) == 2
    assert all("refuses the round" in reason for reason in third["rounds"][0]["refused"].values())
    assert all(len(SiteLedger(state / "ledger", n).verify()) == 2 for n in ("site-0", "site-1"))
    # cut site-0's ledger back to its first run: the audit names it against the anchors, and the site refuses
    path = state / "ledger" / "site-0.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    assert main(audit) == 1
    assert "site-0: the head anchored in round 1 is not in the ledger: the ledger has 1 entries" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "fourth"), "--set", "privacy.budget.epsilon=100"]) == 0
    fourth = json.loads((tmp_path / "fourth" / "results.json").read_text())
    assert fourth["rounds"][0]["participants"] == ["site-1"]
    assert "site-0 refuses to train: the ledger has 1 entries" in " ".join(fourth["rounds"][0]["refused"].values())
