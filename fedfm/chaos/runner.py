"""One soak run: a local deployment with the fault its seed chose, resumed to its end, then checked.

A run is *recovered* when its fault fired and every check held; *lost* when its fault fired and
a check failed (a lost run names the check and replays with ``fedfm chaos --seed S --runs 1``).
A fault whose moment never came (the run ended first) is counted as not fired.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedfm.appconfig import APP_DIR
from fedfm.chaos import checks
from fedfm.chaos.hooks import ENV as HOOK_ENV, write_sitecustomize
from fedfm.chaos.plan import (
    DELAY_REPLY, DISK_FULL, DROP_REPLY, KILL_CLIENTAPP, KILL_COORDINATOR, KILL_IN_CHECKPOINT_WRITE,
    KILL_IN_LEDGER_WRITE, RESTART_SUPERNODE, Fault,
)
from fedfm.config import ExperimentConfig, load_config
from fedfm.deploy.init import init_deployment
from fedfm.deploy.local import LocalDeployment, site_node_config
from fedfm.protocol import site_name
from fedfm.simulate import prepare_run_dir, spawned_by, write_run_config

TINY = ("data.samples_per_site=120", "data.image_size=16", "train.batch_size=16")
HOOKED = (KILL_IN_LEDGER_WRITE, DROP_REPLY, DELAY_REPLY, KILL_IN_CHECKPOINT_WRITE)
MAX_ATTEMPTS = 4  # the first try and up to three resumes
ATTEMPT_LIMIT_S = 1200.0  # a try that runs longer is stopped (the coordinator killed) and counted as hung
DISK_BYTES = 32 * 2**20  # the size of a disk-full site's tmpfs


def soak_config(rounds: int = 2, sites: int = 2, round_timeout_s: float = 90.0, overrides=()) -> ExperimentConfig:
    """The quick start on tiny images: a few seconds of training per site and round. The noise is
    calibrated to epsilon 6 over the planned rounds under a budget of 8: a round a fault makes a
    site train twice still fits (so the results can equal an unbroken run's), a second does not."""
    return load_config(APP_DIR / "configs" / "quickstart.yaml", [
        *TINY, f"data.num_sites={sites}", f"federation.rounds={rounds}", f"federation.round_timeout_s={round_timeout_s}",
        "federation.site_wait_s=120", "privacy.target_epsilon=6", "privacy.budget.epsilon=8", "eval.report=false",
        *overrides])


@dataclass
class RunOutcome:
    seed: int | None
    fault: dict[str, Any] | None
    description: str
    fired: bool = False
    attempts: int = 0
    problems: list[str] = field(default_factory=list)
    compared: bool = False  # (d) was checked against the unbroken run
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    run_dir: str = ""

    @property
    def recovered(self) -> bool:
        return self.fired and not self.problems

    @property
    def lost(self) -> bool:
        return self.fired and bool(self.problems)


class SoakRun:
    def __init__(self, config: ExperimentConfig, fault: Fault | None, run_dir: Path, reference: Path | None = None):
        self.config = config
        self.fault = fault
        self.sites = list(range(config.data.num_sites))
        self.run_dir = prepare_run_dir(config, str(run_dir))
        self.site_dirs = {s: self.run_dir / "sites" / site_name(s) for s in self.sites}
        self.reference = reference
        self.marker = self.run_dir / "chaos-fired.json"
        self.groups: list[int] = []
        self.external_fired = False
        self.mounted: Path | None = None
        self.stop = threading.Event()
        self.notes: list[str] = []

    # --- setup -------------------------------------------------------------------------------
    def _hook_env(self) -> dict[str, str]:
        hooks = write_sitecustomize(self.run_dir / "chaos-hook")
        spec = {**self.fault.to_dict(), "marker": str(self.marker)}
        path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, HOOK_ENV: json.dumps(spec)}

    def _site_env(self, site: int) -> dict[str, str]:
        f = self.fault
        if f is not None and f.kind in HOOKED and f.site_side and f.site == site:
            return self._hook_env()
        return {}

    def _start_site(self, local: LocalDeployment, site: int) -> None:
        node = site_node_config(self.config, site, self.site_dirs[site], local.dep.private_key(site))
        self.groups.append(local.start_supernode(site, node, env=self._site_env(site)).pid)

    def _start_coordinator(self, local: LocalDeployment) -> None:
        local.start_superlink(timeout=180)
        self.groups.append(local.procs["superlink"].pid)

    def _mount_disk(self) -> None:
        folder = self.site_dirs[self.fault.site]
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"disk-full needs a tmpfs for the site's folder (run as root): {done.stderr.strip()}")
        self.mounted = folder

    # --- the run -----------------------------------------------------------------------------
    def execute(self) -> RunOutcome:
        started = time.time()
        f = self.fault
        outcome = RunOutcome(f.seed if f else None, f.to_dict() if f else None,
                             f.describe() if f else "no fault (the unbroken run)", run_dir=str(self.run_dir))
        for folder in self.site_dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        try:
            if f is not None and f.kind == DISK_FULL:
                self._mount_disk()
            dep = init_deployment(self.run_dir / "deployment", sites=len(self.sites))
            with LocalDeployment(dep, self.run_dir / "deployment", self.config.train.threads) as local:
                local.env[checks.RUN_ENV] = str(self.run_dir)
                if f is not None and f.kind == KILL_IN_CHECKPOINT_WRITE:
                    local.env.update(self._hook_env())  # only the ServerApp acts on it
                outcome.attempts = self._drive(local, outcome)
            outcome.problems += checks.check_no_leftovers(self.run_dir, self.groups)  # (e)
            outcome.fired = f is None or self.external_fired or self.marker.exists()
            outcome.problems += self._check(outcome)
        except Exception as err:  # a soak run that breaks is a lost run, not a broken soak
            outcome.problems.append(f"the soak run itself failed: {type(err).__name__}: {err}")
            outcome.fired = True
            outcome.problems += checks.check_no_leftovers(self.run_dir, self.groups, wait_s=5)
        finally:
            self._unmount()
        outcome.problems = self.notes + outcome.problems  # a hung try or a failed injection is a problem too
        outcome.seconds = round(time.time() - started, 1)
        (self.run_dir / "chaos-outcome.json").write_text(json.dumps(outcome.__dict__, indent=2, default=str))
        return outcome

    def _drive(self, local: LocalDeployment, outcome: RunOutcome) -> int:
        self._start_coordinator(local)
        for site in self.sites:
            local.register(site)
            self._start_site(local, site)
        local.wait_online(self.sites, timeout=180)
        injector = None
        if self.fault is not None and self.fault.kind not in HOOKED:
            injector = threading.Thread(target=self._inject_guarded, args=(local,), daemon=True)
            injector.start()
        attempt = 0
        try:
            while attempt < MAX_ATTEMPTS:
                attempt += 1
                resume = (self.run_dir / "checkpoint" / "state.json").is_file()
                watchdog = threading.Timer(ATTEMPT_LIMIT_S, self._hung, args=(local, attempt))
                watchdog.start()
                try:
                    local.run_app(write_run_config(self.config, self.run_dir, resume=resume),
                                  self.run_dir / f"flwr-{attempt}.log")
                finally:
                    watchdog.cancel()
                if self._complete():
                    break
                if injector is not None:
                    injector.join(timeout=180)  # it may be restarting what it killed
                self._heal(local)
        finally:
            self.stop.set()
            if injector is not None:
                injector.join(timeout=300)
        return attempt

    def _complete(self) -> bool:
        path = self.run_dir / "results.json"
        try:
            return path.is_file() and json.loads(path.read_text()).get("status") == "complete"
        except json.JSONDecodeError:
            return False

    def _hung(self, local: LocalDeployment, attempt: int) -> None:
        self.notes.append(f"try {attempt} ran past {ATTEMPT_LIMIT_S:.0f} s and was stopped")
        kill_coordinator(local)

    def _heal(self, local: LocalDeployment) -> None:
        """What an operator does after a crash: start what died again, with the same keys and state."""
        if local.procs["superlink"].poll() is not None:
            kill_coordinator(local)  # whatever of the coordinator is still there
            self._start_coordinator(local)
        for site in self.sites:
            if local.procs[site_name(site)].poll() is not None:
                self._start_site(local, site)
        local.wait_online(self.sites, timeout=300)

    # --- faults from outside ------------------------------------------------------------------
    def _inject_guarded(self, local: LocalDeployment) -> None:
        try:
            self._inject(local)
        except Exception as err:
            self.notes.append(f"injecting {self.fault.kind} failed: {type(err).__name__}: {err}")

    def _checkpointed(self) -> int:
        try:
            return int(json.loads((self.run_dir / "checkpoint" / "state.json").read_text())["round"])
        except (OSError, ValueError, KeyError):
            return 0

    def _round_started(self, local: LocalDeployment, server_round: int) -> bool:
        if server_round > 1:
            return self._checkpointed() >= server_round - 1
        return bool(_apps(local.procs["superlink"], "flwr-serverapp"))

    def _wait(self, predicate, timeout: float = 900.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and not self.stop.is_set():
            if predicate():
                return True
            time.sleep(0.2)
        return False

    def _inject(self, local: LocalDeployment) -> None:
        f = self.fault
        if not self._wait(lambda: self._round_started(local, f.round)):
            return
        name = site_name(f.site)
        if f.kind == KILL_CLIENTAPP:
            if not self._wait(lambda: _apps(local.procs[name], "flwr-clientapp")):
                return
            self.stop.wait(f.delay_s)
            apps = _apps(local.procs[name], "flwr-clientapp") or []
            if not apps and not self._wait(lambda: _apps(local.procs[name], "flwr-clientapp"), 120):
                return
            for proc in apps or _apps(local.procs[name], "flwr-clientapp"):
                _sigkill(proc)
            self.external_fired = True
        elif f.kind == RESTART_SUPERNODE:
            self.stop.wait(f.delay_s)
            if self.stop.is_set():
                return
            local.kill(name)  # SIGKILL the SuperNode's process group: its SuperExec and apps too
            self.external_fired = True
            time.sleep(f.pause_s)
            self._start_site(local, f.site)  # same key: the same node id
        elif f.kind == KILL_COORDINATOR:
            self.stop.wait(f.delay_s)
            if self.stop.is_set():
                return
            kill_coordinator(local)
            self.external_fired = True
        elif f.kind == DISK_FULL:
            self.stop.wait(f.delay_s)
            if self.stop.is_set():
                return
            filler = self.mounted / ".filler"
            _fill(filler)
            self.external_fired = True
            self._wait(lambda: self._checkpointed() >= f.round, 900)
            filler.unlink(missing_ok=True)  # the operator frees the disk

    # --- after the run ------------------------------------------------------------------------
    def _allowed_extra(self, attempts: int) -> dict[int, int]:
        """Rounds a site may have trained (and ledgered) whose reply the faults lost."""
        f = self.fault
        extra = {s: attempts - 1 for s in self.sites}  # every interrupted try may lose the round in flight
        if f is not None and f.site_side and f.kind != DELAY_REPLY:
            extra[f.site] += 1
        return extra

    def _check(self, outcome: RunOutcome) -> list[str]:
        problems = checks.check_results(self.run_dir, self.config.federation.rounds)
        if problems:
            return problems
        keys = self.run_dir / "deployment" / "keys"
        found, facts = checks.check_ledgers(self.run_dir, self.config, self.site_dirs, keys,
                                            self._allowed_extra(outcome.attempts))
        problems += found
        outcome.facts = facts
        if self.reference is not None and checks.full_participation(self.run_dir, len(self.sites)):
            outcome.compared = True
            same_spend = all(v["lost_replies"] == 0 for v in facts.values())
            problems += checks.compare_with_reference(self.run_dir, self.reference, same_spend)
        return problems

    def _unmount(self) -> None:
        if self.mounted is None:
            return
        saved = self.mounted.with_name(self.mounted.name + ".saved")
        shutil.copytree(self.mounted, saved, ignore=shutil.ignore_patterns(".filler"))
        subprocess.run(["umount", str(self.mounted)], capture_output=True)
        shutil.rmtree(self.mounted, ignore_errors=True)
        saved.rename(self.mounted)  # the run folder keeps what the site's disk held
        self.mounted = None


def kill_coordinator(local: LocalDeployment) -> None:
    """SIGKILL the SuperLink, its SuperExec (in a session of its own) and the ServerApp."""
    below = spawned_by([local.procs["superlink"].pid])
    local.kill("superlink")
    for proc in below:
        _sigkill(proc)


def _apps(proc: Any, program: str) -> list[psutil.Process]:
    """The live ``program`` processes (flwr-clientapp, flwr-serverapp) below ``proc``."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            named = child.name() == program[:15]  # a ClientApp forked from the SuperExec's template
            if (named or any(Path(part).name == program for part in child.cmdline()[:2])) \
                    and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _sigkill(proc: psutil.Process) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


def _fill(path: Path) -> None:
    """Write to ``path`` until the disk is full."""
    chunk = b"\0" * 2**20
    with open(path, "wb", buffering=0) as handle:
        while True:
            try:
                handle.write(chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
    # the last partial chunk may leave a few KiB: take them too
    with open(path, "ab", buffering=0) as handle:
        for _ in range(4096):
            try:
                handle.write(b"\0" * 512)
            except OSError:
                break
