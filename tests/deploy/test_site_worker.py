"""The site's long-lived worker: the same answers as the call made in process, one site built for
many calls, and a worker killed in the middle of a call loses nothing (the next call starts a new one)."""

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fedfm import site_calls
from fedfm.config import load_config
from fedfm.deploy import worker_client
from fedfm.models import adapter_state_dict
from fedfm.global_model import build_global_model
from fedfm.privacy.ledger import SiteLedger
from fedfm.protocol import SERVER_ROUND, SPLIT, VALIDATE, VALIDATION

REPO = Path(__file__).resolve().parents[2]
TIMES = ("train-seconds", "cache-build-seconds")


@pytest.fixture()
def private_worker_dir(monkeypatch):
    sockets = Path(tempfile.mkdtemp(prefix="fedfm-test-"))  # short: Unix socket paths are limited
    monkeypatch.setenv(worker_client.WORKER_DIR_ENV, str(sockets))
    yield sockets
    for pid in _worker_pids(sockets):  # stop every worker this test started
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(sockets, ignore_errors=True)


def _worker_pids(folder: Path) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "fedfm.deploy.site_worker" in cmd and str(folder) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            pids.append(proc.pid)
    return pids


def test_a_socket_folder_with_too_long_a_path_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(worker_client.WORKER_DIR_ENV, str(tmp_path / ("x" * 120)))
    with pytest.raises(worker_client.WorkerFailed, match="choose a shorter folder"):
        worker_client.socket_path({"site-id": 0})


def _request(tmp_path, call, arrays, server_round, **config):
    experiment = load_config(REPO / "configs" / "quickstart.yaml",
                             ["data.samples_per_site=60", "data.image_size=16", "train.batch_size=16"])
    return {"call": call, "run_config": {"config-json": experiment.to_json()},
            "node_config": {"site-id": 0, "ledger-dir": str(tmp_path / "ledger")}, "run_id": "7",
            "config": {SERVER_ROUND: server_round, **config}, "arrays": arrays}


def _global_arrays():
    experiment = load_config(REPO / "configs" / "quickstart.yaml", ["data.image_size=16"])
    return site_calls.as_numpy(adapter_state_dict(build_global_model(experiment)))


def _without_times(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMES and not k.endswith(TIMES)}


def test_the_worker_answers_as_the_call_in_process_and_keeps_its_site(tmp_path, private_worker_dir):
    arrays = _global_arrays()
    request = _request(tmp_path / "worker", "train", arrays, 1, **{VALIDATE: True})
    answer = worker_client.call(request, request["node_config"], os.getpid())
    assert "failed" not in answer and answer["error"] is None and answer["calls"] == 1

    local = _request(tmp_path / "local", "train", arrays, 1, **{VALIDATE: True})
    site = site_calls.build_site(local["run_config"], local["node_config"], local["run_id"])
    expected = site_calls.train(site, arrays, local["config"])
    assert sorted(answer["arrays"]) == sorted(expected.arrays)
    for name, value in expected.arrays.items():  # the same update, bit for bit
        assert np.array_equal(answer["arrays"][name], value)
    assert _without_times(answer["metrics"]) == _without_times(expected.metrics)
    assert any(k.startswith(VALIDATION) for k in answer["metrics"])

    evaluated = worker_client.call(_request(tmp_path / "worker", "evaluate", arrays, 1, **{SPLIT: "val"}),
                                   request["node_config"], os.getpid())
    assert evaluated["calls"] == 2  # the same worker, the site built once
    assert evaluated["metrics"]["auroc"] == answer["metrics"][VALIDATION + "auroc"]
    assert len(_worker_pids(private_worker_dir)) == 1


# Loaded by the worker's interpreter (PYTHONPATH): an evaluation of the test split announces itself
# in a file, then takes a minute, so the test can kill the worker in the middle of a call.
BUSY_ON_TEST = '''
import os
from fedfm import site_calls

_evaluate = site_calls.CALLS["evaluate"]

def _busy(site, arrays, config):
    if config.get("split") == "test":
        with open(os.environ["BUSY_MARKER"], "w") as marker:
            marker.write(str(os.getpid()))
        import time
        time.sleep(60)
    return _evaluate(site, arrays, config)

site_calls.CALLS["evaluate"] = _busy
'''


def test_a_worker_killed_during_a_call_loses_nothing_and_the_next_call_starts_another(tmp_path, private_worker_dir,
                                                                                      monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(BUSY_ON_TEST)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    monkeypatch.setenv("BUSY_MARKER", str(tmp_path / "busy"))
    arrays = _global_arrays()
    first = _request(tmp_path, "train", arrays, 1)
    assert worker_client.call(first, first["node_config"], os.getpid())["error"] is None

    import threading

    box = {}

    def busy_call():
        try:
            worker_client.call(_request(tmp_path, "evaluate", arrays, 1, **{SPLIT: "test"}), first["node_config"],
                               os.getpid())
        except worker_client.WorkerFailed as failed:
            box["failed"] = str(failed)

    caller = threading.Thread(target=busy_call)
    caller.start()
    deadline = time.time() + 60
    while not (tmp_path / "busy").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(int((tmp_path / "busy").read_text()), signal.SIGKILL)  # the worker, in the middle of the call
    caller.join(timeout=30)
    assert "died during the evaluate call" in box["failed"]

    again = worker_client.call(_request(tmp_path, "train", arrays, 2), first["node_config"], os.getpid())
    assert again["error"] is None and again["calls"] == 1  # a new worker, which trained round 2
    assert [e["round"] for e in SiteLedger(tmp_path / "ledger", "site-0").verify() if e.get("kind") != "label-counts"] \
        == [1, 2]


def test_a_worker_exits_when_the_process_it_watches_is_gone(tmp_path, private_worker_dir):
    import subprocess
    import sys

    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    request = _request(tmp_path, "evaluate", _global_arrays(), 1, **{SPLIT: "val"})
    assert "metrics" in worker_client.call(request, request["node_config"], watched.pid)
    assert len(_worker_pids(private_worker_dir)) == 1
    watched.kill()
    watched.wait()
    deadline = time.time() + 15
    while _worker_pids(private_worker_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert _worker_pids(private_worker_dir) == []
