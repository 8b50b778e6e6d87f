"""Run an experiment on Flower's simulation engine through ``flwr run``.

The experiment config is resolved here, written into the run folder and handed to the
ServerApp and every ClientApp as ``config-json`` in the run config, so all processes see
exactly the same validated settings. ``flwr run`` starts a local SuperLink in the
background; the last fedfm run using it stops it when it ends (:mod:`fedfm.superlink_users`),
so simulations started side by side do not cut each other off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from fedfm import superlink_users
from fedfm.appconfig import APP_DIR
from fedfm.config import ConfigError, ExperimentConfig, load_config
from fedfm.run_log import stream_run

# the port of the SuperLink `flwr run` starts for local simulation (Flower 1.42 serves its Control,
# Fleet and Runtime HTTP APIs there; the --control-api-address it is also given is no longer used)
LOCAL_SUPERLINK_PORT = 39091


def default_run_dir(config: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.output.name}-{stamp}"


def prepare_run_dir(config: ExperimentConfig, out: str | None) -> Path:
    run_dir = Path(out or config.output.dir or default_run_dir(config)).expanduser().resolve()
    if (run_dir / "results.json").exists():
        raise ConfigError(
            f"output folder '{run_dir}' already holds a run: pass a new --out, or --resume {run_dir} "
            "to continue it (nothing was overwritten)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    config.output.dir = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    return run_dir


def resumable_run(run_dir: str | Path) -> tuple[ExperimentConfig, Path]:
    """The config of an interrupted or paused run, checked to be resumable."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoint" / "state.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder with a checkpoint (config.yaml, checkpoint/state.json)")
    config = load_config(run_dir / "config.yaml")
    results = run_dir / "results.json"
    complete = results.exists() and json.loads(results.read_text()).get("status") == "complete"
    if complete and not (config.eval.leave_one_site_out or config.eval.baselines or config.eval.seeds):
        from fedfm.study import missing_at_end

        if not missing_at_end(config, run_dir):  # else the resume writes what a kill kept its end from writing
            raise ConfigError(f"--resume {run_dir}: the run is already complete")
    return config, run_dir


def write_run_config(config: ExperimentConfig, run_dir: Path, resume: bool = False, until_round: int = 0,
                     ledger_dir: Path | None = None, anchor_dir: Path | None = None) -> Path:
    """The ``--run-config`` TOML: the resolved experiment as JSON, the output folder, resume settings,
    in simulation the sites' ledger folder (RUN/ledger, or the one several runs of a search share;
    the coordinator reads the sites' spent epsilon there), and when the coordinator's anchor log
    outlives the run (deployment state) its folder."""
    path = run_dir / "run-config.toml"
    path.write_text(
        f"config-json = {json.dumps(config.to_json())}\n"
        f"out-dir = {json.dumps(str(run_dir))}\n"
        f"resume = {'true' if resume else 'false'}\n"
        f"until-round = {int(until_round)}\n"
        + (f"ledger-dir = {json.dumps(str(ledger_dir))}\n" if ledger_dir is not None else "")
        + (f"anchor-dir = {json.dumps(str(anchor_dir))}\n" if anchor_dir is not None else "")
    )
    return path


def federation_config(config: ExperimentConfig) -> str:
    base = f"num-supernodes={config.data.num_sites} client-resources-num-cpus={config.federation.client_cpus}"
    if config.federation.ray_address:
        return base  # an existing Ray cluster brings its own resources (RAY_ADDRESS, see simulation_env)
    return f"{base} init-args-num-cpus={max(1, os.cpu_count() or 1)}"


def flwr_command(config: ExperimentConfig, run_config: Path) -> list[str]:
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    return [
        flwr, "run", str(APP_DIR),
        "--run-config", str(run_config),
        "--federation-config", federation_config(config),
        "--stream",
    ]


def simulation_env(config: ExperimentConfig) -> dict[str, str]:
    env = dict(os.environ)
    # flwr starts `flower-superlink` by name: make this environment's scripts findable even
    # when it is not activated (e.g. `.venv/bin/fedfm simulate`).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env["OMP_NUM_THREADS"] = str(config.train.threads)
    env["MKL_NUM_THREADS"] = str(config.train.threads)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    if config.federation.ray_address:
        # Flower's Ray backend calls ray.init(), which joins the cluster RAY_ADDRESS names
        env["RAY_ADDRESS"] = config.federation.ray_address
    return env


def run_simulation(
    config: ExperimentConfig,
    out: str | None = None,
    verbose: bool = False,
    resume: bool = False,
    until_round: int = 0,
    ledger_dir: Path | None = None,
) -> Path:
    """Run ``config`` on Flower's simulation engine; return the run folder with results.json.

    ``resume`` continues the run in ``out`` from its last checkpoint; ``until_round`` stops
    cleanly after that round (results.json says ``paused``); ``ledger_dir`` puts the sites' ledgers
    there instead of RUN/ledger (runs of one search share them, so each site's budget covers all).
    """
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ConfigError(f"fedfm simulate needs the fedfm app folder (with pyproject.toml); not found at {APP_DIR}")
    run_dir = Path(out).resolve() if resume else prepare_run_dir(config, out)
    # the sites' ledgers are in this machine's folder: the coordinator reads their spent epsilon there
    command = flwr_command(config, write_run_config(config, run_dir, resume, until_round, ledger_dir or run_dir / "ledger"))
    users = superlink_users.users_dir(LOCAL_SUPERLINK_PORT)
    entry = superlink_users.join(users)  # before looking: a run ending meanwhile then leaves the SuperLink up
    started = False
    try:
        port_open, running = settled_superlink()
        # a SuperLink process counts even while its port is closed: this run must not start a second one
        if port_open or running:
            problem = superlink_mismatch(config, running)
            if problem:
                raise ConfigError(
                    f"a local SuperLink is already running on port {LOCAL_SUPERLINK_PORT}, but {problem}; this run would "
                    "run inside it: stop it with python -c 'from fedfm.simulate import stop_local_superlink; "
                    "stop_local_superlink()' and run again"
                )
        else:
            superlink_users.mark_started(users)
        print(f"[fedfm] {config.data.num_sites} sites, {config.federation.rounds} rounds -> {run_dir}", flush=True)
        log_path = run_dir / ("flwr-resumed.log" if resume else "flwr.log")
        started = True
        code = stream_run(command, simulation_env(config), log_path, verbose)
    finally:
        # the last fedfm run to end stops a SuperLink fedfm started (one started by hand stays);
        # a run refused before it started stops nothing
        superlink_users.leave(entry, stop_local_superlink if started else None)
    results = run_dir / "results.json"
    status = json.loads(results.read_text()).get("status") if results.exists() else None
    expected = "paused" if 0 < until_round < config.federation.rounds else "complete"
    if code != 0 or status != expected:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"simulation did not complete (flwr exit {code}, status {status}); last log lines:\n{tail}")
    return run_dir


def settled_superlink(timeout: float = 15.0) -> tuple[bool, list[int]]:
    """(local SuperLink port open, its PIDs), once a SuperLink that is starting or stopping has settled."""
    deadline = time.time() + timeout
    while True:
        port_open, pids = _port_open(LOCAL_SUPERLINK_PORT), local_superlink_pids()
        if port_open or not pids or time.time() >= deadline:
            return port_open, pids
        time.sleep(0.5)


def superlink_mismatch(config: ExperimentConfig, pids: list[int]) -> str | None:
    """Why the running local SuperLink cannot host this run, or None when it can.

    ``flwr run`` reuses a SuperLink that is already up, with the environment it was started
    with: its Ray cluster (RAY_ADDRESS) and its Python environment (whose fedfm it imports).
    """
    wanted_ray = simulation_env(config).get("RAY_ADDRESS", "")
    here = str(Path(sys.executable).parent)
    for pid in pids:
        env = _process_environ(pid)
        if env is None:
            continue  # gone, or not ours to read
        ray = env.get("RAY_ADDRESS", "")
        if ray != wanted_ray:
            theirs = f"Ray cluster {ray!r}" if ray else "its own local Ray"
            ours = f"federation.ray_address={wanted_ray!r}" if wanted_ray else "a local Ray (federation.ray_address=null)"
            return f"it uses {theirs} and this run asks for {ours}"
        theirs_bin = _script_dir(pid, "flower-superlink")
        if theirs_bin is not None and theirs_bin != here:
            return f"it was started from another Python environment ({theirs_bin}), not this one ({here})"
    return None


def _script_dir(pid: int, script: str) -> str | None:
    """The folder of ``script`` in the process's command line (its Python environment's bin/)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in argv:
        path = Path(arg.decode(errors="replace"))
        if path.name == script and path.is_absolute():
            return str(path.parent)
    return None


def _process_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def local_superlink_pids() -> list[int]:
    """PIDs of the simulation SuperLink that ``flwr run`` starts (never a deployment SuperLink).

    Read from /proc/PID/cmdline, not from ``ps``: ``ps`` cuts its output to the COLUMNS of the
    environment (80 under pytest), which hid ``--simulation`` and with it every SuperLink.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args) and b"--simulation" in args:
            pids.append(int(entry.name))
    return sorted(pids)


def stop_local_superlink(timeout: float = 15.0) -> None:
    """Stop the background SuperLink that ``flwr run`` starts for local simulations, and what it
    spawned: its SuperExec, a simulation still running (after Ctrl-C) and that simulation's Ray.
    Those outlive a SuperLink stopped alone, and a simulation left running keeps training and
    spending the sites' privacy budgets."""
    spawned = spawned_by(local_superlink_pids())
    for pid in local_superlink_pids():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.time() + timeout
    while local_superlink_pids() and time.time() < deadline:
        time.sleep(0.2)
    for pid in local_superlink_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop_processes(spawned, timeout)


def spawned_by(pids: list[int]) -> list:
    """Every process below ``pids``, as psutil processes (children, their children, ...)."""
    import psutil

    below = []
    for pid in pids:
        try:
            below += psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    return below


def stop_processes(procs: list, timeout: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout`` seconds (Ray's agents ignore SIGTERM)."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
