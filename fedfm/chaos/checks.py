"""What must hold after a faulted run was resumed to its end, checked from its files and processes.

(a) every site's ledger verifies (hash chain); (b) no ledger entry is above the site's budget;
(c) the independent audit passes and every round the coordinator counted for a site is in that
site's ledger with the epsilon the site reported, the rest being rounds whose reply a fault lost;
(d) with every site in every round, the results equal an unbroken run's; (e) no process of the
deployment is left running.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file

from fedfm.audit.ledgers import audit_run
from fedfm.config import ExperimentConfig
from fedfm.privacy.entries import LABEL_COUNTS
from fedfm.privacy.ledger import LedgerError, SiteLedger
from fedfm.protocol import EPSILON, site_name

RUN_ENV = "FEDFM_CHAOS_RUN"  # every process of a soak run inherits it: how leftovers are found
EPS_TOL = 1e-9


def check_results(run_dir: Path, rounds: int) -> list[str]:
    path = run_dir / "results.json"
    if not path.is_file():
        return ["no results.json: the run never finished"]
    results = json.loads(path.read_text())
    problems = []
    if results.get("status") != "complete":
        problems.append(f"results.json has status {results.get('status')!r}, not complete")
    numbers = [r["round"] for r in results.get("rounds", [])]
    expected = list(range(1, (rounds if not results.get("stopped_early") else len(numbers)) + 1))
    if numbers != expected:  # a run that stopped early (every budget spent) records the rounds before the stop
        problems.append(f"results.json records rounds {numbers}, not 1..{len(expected)} once each")
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        problems.append("no final adapter")
    return problems


def check_ledgers(run_dir: Path, config: ExperimentConfig, site_dirs: dict[int, Path], keys_dir: Path,
                  allowed_extra: dict[int, int]) -> tuple[list[str], dict[str, Any]]:
    """(a), (b), (c); returns the problems and per-site facts (entries, extra entries, epsilon)."""
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    problems: list[str] = []
    facts: dict[str, Any] = {}
    for site, folder in site_dirs.items():
        name = site_name(site)
        try:
            entries = SiteLedger(folder, name).verify()  # (a)
        except LedgerError as err:
            problems.append(f"(a) {name}: {err}")
            continue
        budget = config.privacy.budget.for_site(name)
        over = [e for e in entries if float(e["epsilon"]) > budget + EPS_TOL]
        if over:  # (b)
            problems.append(f"(b) {name}: epsilon {over[0]['epsilon']:.6f} in round {over[0]['round']} exceeds its budget {budget}")
        anchors = run_dir / "ledger-federation"
        for audit in audit_run(folder, keys=keys_dir, anchors=anchors if anchors.is_dir() else None):  # (c)
            problems.extend(f"(c) audit {audit.site}: {p}" for p in audit.problems)
        trained = [e for e in entries if e.get("kind") != LABEL_COUNTS]
        unmatched = list(trained)
        for record in results.get("rounds", []):
            metrics = record.get("train", {}).get(name)
            if metrics is None:
                continue
            match = next((e for e in unmatched if int(e["round"]) == int(record["round"])
                          and abs(float(e["epsilon"]) - float(metrics.get(EPSILON, -1))) <= EPS_TOL), None)
            if match is None:
                problems.append(f"(c) {name}: round {record['round']} was aggregated with epsilon "
                                f"{metrics.get(EPSILON)}, but no ledger entry of that round records it")
            else:
                unmatched.remove(match)
        if len(unmatched) > allowed_extra.get(site, 0):
            problems.append(f"(c) {name}: {len(unmatched)} ledger rounds ({[e['round'] for e in unmatched]}) were never "
                            f"aggregated, more than the {allowed_extra.get(site, 0)} the faults can explain")
        reported = (results.get("sites", {}).get(name) or {}).get("epsilon")
        last_counted = [r["train"][name][EPSILON] for r in results.get("rounds", []) if name in r.get("train", {})]
        if last_counted and reported is not None and abs(float(reported) - float(last_counted[-1])) > EPS_TOL:
            problems.append(f"(c) {name}: results.json reports epsilon {reported}, its last aggregated round {last_counted[-1]}")
        facts[name] = {"entries": len(trained), "lost_replies": len(unmatched),
                       "epsilon": float(trained[-1]["epsilon"]) if trained else 0.0}
    return problems, facts


def full_participation(run_dir: Path, sites: int) -> bool:
    results = json.loads((run_dir / "results.json").read_text())
    everyone = sorted(site_name(s) for s in range(sites))
    return all(sorted(r["participants"]) == everyone for r in results["rounds"])


def compare_with_reference(run_dir: Path, reference: Path, same_spend: bool) -> list[str]:
    """(d): the final adapter bit for bit, each round's loss and validation, the test metrics, and
    (when no fault made a site train a round twice) every site's epsilon."""
    problems = []
    mine = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    if mine.keys() != theirs.keys():
        return ["(d) the final adapter has other tensors than the unbroken run's"]
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    if differ:
        worst = max(float((mine[k] - theirs[k]).abs().max()) for k in differ)
        problems.append(f"(d) {len(differ)} adapter tensors differ from the unbroken run's (max |diff| {worst:.3g})")
    a, b = (json.loads((p / "results.json").read_text()) for p in (run_dir, reference))
    for key in ("train_loss", "val_auroc"):
        if [r[key] for r in a["rounds"]] != [r[key] for r in b["rounds"]]:
            problems.append(f"(d) per-round {key} differs from the unbroken run's")
    if a["pooled"] != b["pooled"]:
        problems.append(f"(d) pooled test metrics differ: AUROC {a['pooled'].get('auroc')} vs {b['pooled'].get('auroc')}")
    if same_spend:
        eps_a = {s: v.get("epsilon") for s, v in a["sites"].items()}
        eps_b = {s: v.get("epsilon") for s, v in b["sites"].items()}
        if eps_a != eps_b:
            problems.append(f"(d) epsilons {eps_a} differ from the unbroken run's {eps_b}")
    return problems


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Processes that inherited this run's marker (SuperLink, SuperNodes, SuperExecs, apps, flwr)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(RUN_ENV) == str(run_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def check_no_leftovers(run_dir: Path, groups: list[int], wait_s: float = 15.0) -> list[str]:
    """(e): no process of the run and no process group it started; kills and names any found."""
    deadline = time.time() + wait_s
    while time.time() < deadline and (run_processes(run_dir) or any(_group_alive(g) for g in groups)):
        time.sleep(0.5)
    left = run_processes(run_dir)
    alive = [g for g in groups if _group_alive(g)]
    problems = []
    if left or alive:
        names = sorted({" ".join(p.cmdline()[:1]) for p in left if p.is_running()})
        problems.append(f"(e) {len(left)} processes left running ({', '.join(names)}), process groups {alive}")
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for group in alive:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return problems


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group of zombies only: reaped by whoever waits for them
    return any(p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter() if _pgid(p) == group)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
