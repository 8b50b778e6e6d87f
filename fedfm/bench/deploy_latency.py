"""Rounds on the deployment runtime (3 local SuperNodes, TLS + authentication), taken apart.

Per round (from results.json, what the sites reported with their train replies):

- ``round_s``: the ServerApp's time for the round (training, validation, aggregation, checkpoint);
  the last round's validation is the run's final validation (one evaluate message per site);
- ``compute_s``: the slowest site's local training (sites train in parallel);
- ``site_call_s``: the slowest site's whole train call in its site process: building the site
  (data, model) when it is new, the training, encoding the update;
- ``process_start_s``: the slowest site's ClientApp process age when its train handler ran (Flower
  1.42 starts a process per message: a fork of a pre-imported template (``runtime/superexec.py``),
  or all its imports with ``FEDFM_CLIENTAPP_TEMPLATE=0``; then pulling the message, the FAB
  install check and loading the app);
- ``rest_s``: round minus site call minus process start: waits (SuperLink, SuperNode, SuperExec
  polling), transfer over TLS, the validation message, aggregation and the checkpoint.

Then ``idle_cpu_pct``: the CPU time every process of the federation (SuperLink, SuperNodes,
SuperExecs, site workers) uses while no run is active, in percent of one core over ``IDLE_S``,
just after the run and (``quiet_cpu_pct``) ``QUIET_AFTER_S`` after it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfm.protocol import PROCESS_AGE, SITE_CALL_SECONDS, TRAIN_SECONDS

IDLE_S = 20.0
QUIET_AFTER_S = 70.0  # runtime/supernode.py: a minute without messages, Flower's own idle waits


def idle_cpu_pct(procs: list) -> float:
    before = cpu_seconds(procs)
    time.sleep(IDLE_S)
    return 100.0 * (cpu_seconds(procs) - before) / IDLE_S


def federation_processes(groups: set[int]) -> list:
    """Every live process in the process groups ``groups`` (LocalDeployment starts each SuperLink
    and SuperNode in its own group; their SuperExecs, ClientApps and site workers stay in it)."""
    import os

    import psutil

    procs = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups:
                procs.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return procs


def is_site_worker(proc) -> bool:
    import psutil

    try:
        return "fedfm.deploy.site_worker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def cpu_seconds(procs: list) -> float:
    import psutil

    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def deployment_rounds(sites: int = 3, rounds: int = 4, image_size: int = 16) -> dict[str, Any]:
    from fedfm.config import load_config
    from fedfm.deploy.init import init_deployment
    from fedfm.deploy.local import LocalDeployment, site_node_config
    from fedfm.simulate import prepare_run_dir, write_run_config

    config = load_config(None, [f"data.num_sites={sites}", f"federation.rounds={rounds}", "data.samples_per_site=120",
                                f"data.image_size={image_size}", "train.batch_size=16", "eval.report=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = prepare_run_dir(config, str(Path(tmp) / "run"))
        dep = init_deployment(run_dir / "deployment", sites=sites)
        started = time.time()
        with LocalDeployment(dep, run_dir / "deployment") as local:
            local.start_superlink()
            for site in range(sites):
                local.register(site)
                local.start_supernode(site, site_node_config(config, site, run_dir / "ledger"))
            local.wait_online(list(range(sites)))
            startup = time.time() - started
            run_started = time.time()
            code = local.run_app(write_run_config(config, run_dir), run_dir / "flwr.log")
            total = time.time() - run_started
            time.sleep(2.0)  # the last replies' bookkeeping settles
            procs = federation_processes({p.pid for p in local.procs.values()})
            workers = sum(is_site_worker(p) for p in procs)
            idle_cpu = idle_cpu_pct(procs)  # just after the run
            time.sleep(QUIET_AFTER_S - IDLE_S - 2.0)
            quiet_cpu = idle_cpu_pct(procs)  # a minute later: the SuperNodes poll at Flower's pace again
        results = json.loads((run_dir / "results.json").read_text())
    if code != 0 or results["status"] != "complete":
        raise RuntimeError(f"deployment benchmark run failed (exit {code}, status {results['status']})")
    rows, previous = [], 0.0
    for entry in results["rounds"]:
        train = entry["train"].values()
        round_s = entry["elapsed_s"] - previous
        previous = entry["elapsed_s"]
        compute = max(m[TRAIN_SECONDS] for m in train)
        call = max(m.get(SITE_CALL_SECONDS, m[TRAIN_SECONDS]) for m in train)
        start = max(m[PROCESS_AGE] for m in train)
        rows.append({"round": entry["round"], "round_s": round_s, "compute_s": compute, "site_call_s": call,
                     "process_start_s": start, "rest_s": round_s - call - start, "minus_compute_s": round_s - compute})
    later = rows[1:] or rows
    return {"sites": sites, "startup_s": startup, "run_total_s": total, "rounds": rows,
            "later_minus_compute_s": sum(r["minus_compute_s"] for r in later) / len(later),
            "idle_cpu_pct": idle_cpu, "quiet_cpu_pct": quiet_cpu, "site_workers": workers,
            "update_bytes": results["communication"]["update_bytes"]}


def deploy_table(d: dict[str, Any]) -> list[str]:
    out = ["", f"{d['sites']} sites, start-up {d['startup_s']:.1f} s (SuperLink, keys registered, SuperNodes online), "
           f"run {d['run_total_s']:.1f} s; {d['site_workers']} site workers; idle federation CPU "
           f"{d['idle_cpu_pct']:.1f} % of one core just after the run, {d.get('quiet_cpu_pct', float('nan')):.1f} % "
           f"{QUIET_AFTER_S:.0f} s after it; rounds after the first: round minus compute "
           f"{d['later_minus_compute_s']:.2f} s on average", "",
           "| round | round s | compute s | site call s | ClientApp process start s | rest (waits, transfer, validation) s | "
           "round minus compute s |", "|---|---|---|---|---|---|---|"]
    out += [f"| {r['round']} | {r['round_s']:.2f} | {r['compute_s']:.2f} | {r['site_call_s']:.2f} | "
            f"{r['process_start_s']:.2f} | {r['rest_s']:.2f} | {r['minus_compute_s']:.2f} |" for r in d["rounds"]]
    return out
