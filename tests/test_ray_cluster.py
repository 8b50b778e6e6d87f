"""A simulation runs on an existing Ray cluster by configuration alone (federation.ray_address).

federation.ray_address reaches Flower's Ray backend as RAY_ADDRESS, without local resource
settings; the slow test starts a Ray head and checks that the ClientApps ran as its actors.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedfm.cli import main
from fedfm.config import load_config
from fedfm.deploy.local import free_port
from fedfm.simulate import (federation_config, local_superlink_pids, simulation_env, stop_local_superlink,
                            superlink_mismatch)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_ray_address_reaches_flower_and_drops_local_resources():
    config = load_config(None, ["federation.ray_address=10.1.2.3:6379"])
    assert simulation_env(config)["RAY_ADDRESS"] == "10.1.2.3:6379"
    assert "init-args-num-cpus" not in federation_config(config)  # a cluster brings its own resources
    local = load_config(None, [])
    assert simulation_env(local).get("RAY_ADDRESS") == os.environ.get("RAY_ADDRESS")  # untouched
    assert "init-args-num-cpus" in federation_config(local)


@pytest.fixture
def fake_superlink():
    """start(bin_dir, ray_address) -> pid of a sleeping process whose command line and environment look
    like a local SuperLink's (flwr run reuses whatever runs on its port)."""
    procs = []

    def start(bin_dir: str, ray_address: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        if ray_address:
            env["RAY_ADDRESS"] = ray_address
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"{bin_dir}/flower-superlink", "--simulation"], env=env))
        pid = procs[-1].pid
        deadline = time.time() + 10
        while b"flower-superlink" not in Path(f"/proc/{pid}/cmdline").read_bytes():  # until exec has happened
            assert time.time() < deadline, "the fake SuperLink did not start"
            time.sleep(0.01)
        return pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_running_superlink_from_another_ray_or_environment_is_named(fake_superlink, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # ps would cut the command line here; the PIDs come from /proc
    here = str(Path(sys.executable).parent)
    local = load_config(None, [])
    clustered = load_config(None, ["federation.ray_address=10.1.2.3:6379"])
    on_cluster = fake_superlink(here, "10.1.2.3:6379")
    assert "Ray cluster '10.1.2.3:6379'" in superlink_mismatch(local, [on_cluster])
    assert superlink_mismatch(clustered, [on_cluster]) is None
    plain = fake_superlink(here, None)
    assert "its own local Ray" in superlink_mismatch(clustered, [plain])
    assert superlink_mismatch(local, [plain]) is None
    other = fake_superlink("/opt/other-env/bin", None)
    assert "another Python environment (/opt/other-env/bin)" in superlink_mismatch(local, [other])
    assert {on_cluster, plain, other} <= set(local_superlink_pids())


def _actor_classes(address: str, env: dict) -> set[str]:
    """Class names of every actor the cluster has run (asked from a separate driver process)."""
    script = (
        "import json, ray; ray.init(address=%r, include_dashboard=False, logging_level='ERROR');"
        "print(json.dumps(sorted({a['ActorClassName'] for a in ray._private.state.actors().values()})))"
    ) % address
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_simulation_runs_on_a_ray_head_started_by_the_test(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}"], check=True, env=env, timeout=180,
                   capture_output=True)
    try:
        stop_local_superlink()  # a SuperLink left running keeps its own Ray (fedfm simulate would refuse it)
        out = tmp_path / "run"
        args = ["simulate", str(REPO / "configs" / "quickstart.yaml"), "--out", str(out)]
        for item in ("data.num_sites=2", "federation.rounds=1", "data.samples_per_site=60", "data.image_size=16",
                     f"federation.ray_address=127.0.0.1:{port}", "eval.report=false"):
            args += ["--set", item]
        assert main(args) == 0
        assert json.loads((out / "results.json").read_text())["status"] == "complete"
        # the ClientApps ran as actors of this cluster: its actor table (GCS) lists them
        assert "ClientAppActor" in _actor_classes(f"127.0.0.1:{port}", env)
    finally:
        stop_local_superlink()  # it is bound to this cluster: never leave it for a later run
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
