"""A study: the federated run, then what puts it in context: leave-one-site-out runs and baselines.

Layout of a run folder::

    RUN/results.json                         the federated run (as configured)
    RUN/loso/without-site-K/results.json     the federation trained without site K (eval.leave_one_site_out)
    RUN/baselines/<name>/results.json        local, centralized, centralized_nodp, federated_nodp
    RUN/seeds/seed-S/results.json            the same run with train.seed = S (eval.seeds), its own ledger
    RUN/report.html, report.md, report.json  (eval.report)

Each part is a complete run of its own, written as it finishes; ``fedfm simulate --resume RUN``
continues a study where it stopped: finished parts are kept, an interrupted Flower run resumes
from its checkpoint, an interrupted in-process baseline starts again on its sites' ledgers (what
the interrupted attempt spent is kept and counts against their budgets); a study whose runs are
all complete trains nothing and writes its report and model card if they are missing.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from fedfm.baselines import IN_PROCESS, baseline_jobs, is_complete, run_job, write_baseline_results
from fedfm.config import ExperimentConfig, apply_overrides, validate_config
from fedfm.privacy.ledger import spent_epsilon
from fedfm.protocol import loso_folder, site_name
from fedfm.run_folder import seed_dir
from fedfm.simulate import run_simulation


def part_config(config: ExperimentConfig, holdout: list[int] | None = None, private: bool | None = None) -> ExperimentConfig:
    """The config of one part of a study: the same experiment, one change, no study of its own."""
    part = config.model_copy(deep=True)
    part.eval.leave_one_site_out = False
    part.eval.baselines = []
    part.eval.report = False
    part.eval.seeds = []
    part.output.dir = None
    if holdout is not None:
        part.eval.holdout_sites = holdout
    if private is not None:
        part.privacy.enabled = private
    return part


def baseline_config(config: ExperimentConfig, name: str) -> ExperimentConfig:
    """A baseline's config: the experiment, without DP for the *_nodp ones, plus eval.baseline_overrides[name]."""
    part = part_config(config, private=False if name.endswith("_nodp") else None)
    extra = config.eval.baseline_overrides.get(name, [])
    return validate_config(apply_overrides(part.model_dump(mode="json"), extra)) if extra else part


def seed_config(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The run again with another seed of sampling, noise and dropout (data and adapter init unchanged)."""
    part = part_config(config)
    part.train.seed = seed
    return part


def loso_dir(run_dir: Path, site_id: int) -> Path:
    return run_dir / "loso" / loso_folder(site_id)


def baseline_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "baselines" / name


def run_study(config: ExperimentConfig, out: str | None = None, verbose: bool = False,
              resume: bool = False, until_round: int = 0) -> Path:
    """Run the federated experiment and every part the config's ``eval`` section asks for."""
    if resume and out is not None and is_complete(Path(out)):
        run_dir = Path(out)
        if all(is_complete(part) for part in part_dirs(config, run_dir)):
            return finish_complete(config, run_dir)
        print(f"[fedfm] federated run already complete in {run_dir}", flush=True)
    else:
        run_dir = run_simulation(config, out, verbose=verbose, resume=resume, until_round=until_round)
        if 0 < until_round < config.federation.rounds:
            return run_dir  # paused: the rest of the study waits for --resume
    for seed in [s for s in config.eval.seeds if s != config.train.seed]:
        print(f"[fedfm] seed {seed}: the same run with train.seed={seed}", flush=True)
        run_part(seed_config(config, seed), seed_dir(run_dir, seed), verbose)
    if config.eval.leave_one_site_out:
        for k in range(config.data.num_sites):
            print(f"[fedfm] leave-one-site-out {k + 1}/{config.data.num_sites}: the federation without {site_name(k)}", flush=True)
            run_part(part_config(config, holdout=[k]), loso_dir(run_dir, k), verbose)
    if "federated_nodp" in config.eval.baselines:
        print("[fedfm] baseline federated_nodp: the same federation without DP", flush=True)
        run_part(baseline_config(config, "federated_nodp"), baseline_dir(run_dir, "federated_nodp"), verbose)
    in_process = [name for name in config.eval.baselines if name in IN_PROCESS]
    if in_process:
        run_in_process_baselines(config, in_process, run_dir / "baselines")
    if config.eval.report:
        write_study_report(run_dir)
    return run_dir


def part_dirs(config: ExperimentConfig, run_dir: Path) -> list[Path]:
    """The folder of every part of the study besides the federated run (seeds, leave-one-site-out, baselines)."""
    seeds = [seed_dir(run_dir, s) for s in config.eval.seeds if s != config.train.seed]
    loso = [loso_dir(run_dir, k) for k in range(config.data.num_sites)] if config.eval.leave_one_site_out else []
    return [*seeds, *loso, *(baseline_dir(run_dir, name) for name in config.eval.baselines)]


def write_study_report(run_dir: Path) -> None:
    """What a study ends with (eval.report): the report and the model card, from the results in ``run_dir``."""
    from fedfm.report import write_report

    paths = write_report([run_dir], run_dir)
    print(f"[fedfm] report: {paths['html']}", flush=True)


def missing_at_end(config: ExperimentConfig, run_dir: Path) -> list[str]:
    """The files a complete study writes last (report, model card) that ``run_dir`` lacks: a kill came first."""
    from fedfm.report import missing_report

    return missing_report(run_dir) if config.eval.report else []


def finish_complete(config: ExperimentConfig, run_dir: Path) -> Path:
    """A resumed study with every run complete: nothing trains; what a kill kept its end from writing is written now."""
    missing = missing_at_end(config, run_dir)
    if not missing:
        print(f"[fedfm] already complete: {run_dir}", flush=True)
        return run_dir
    print(f"[fedfm] already complete: {run_dir}; writing its missing {', '.join(missing)} from the saved results "
          "(no training)", flush=True)
    write_study_report(run_dir)
    return run_dir


def run_part(config: ExperimentConfig, run_dir: Path, verbose: bool) -> Path:
    """A Flower run of a study: kept when complete, resumed when it has a checkpoint, else (re)started."""
    if is_complete(run_dir):
        print(f"[fedfm]   already complete: {run_dir}", flush=True)
        return run_dir
    if (run_dir / "checkpoint" / "state.json").is_file():
        return run_simulation(config, str(run_dir), verbose=verbose, resume=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_simulation(config, str(run_dir), verbose=verbose)


def run_in_process_baselines(config: ExperimentConfig, names: list[str], root: Path) -> None:
    """Train the local and centralized baselines in a pool of processes, one per CPU."""
    todo = [name for name in names if not is_complete(root / name)]
    for name in todo:
        keep_spent_ledgers(root / name, name)
    configs = {name: baseline_config(config, name) for name in todo}
    jobs = baseline_jobs(part_config(config), todo, root)
    if not jobs:
        return
    workers = max(1, min(len(jobs), (os.cpu_count() or 1) // config.train.threads))
    print(f"[fedfm] baselines {', '.join(todo)}: {len(jobs)} trainings on {workers} processes", flush=True)
    parts: dict[str, list] = {name: [] for name in todo}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        attempt = time.strftime("%Y%m%d-%H%M%S")  # the ledgers tell an interrupted attempt from its restart
        futures = {pool.submit(run_job, configs[name].to_json(), kind, site_id, out, f"{name}-{attempt}"): name
                   for name, kind, site_id, out in jobs}
        for future in as_completed(futures):
            parts[futures[future]].append(future.result())
    for name in todo:
        results = write_baseline_results(configs[name], name, root / name, parts[name])
        for site, why in results["stopped_early"].items():
            print(f"[fedfm] baseline {name}: {site} stopped early: {why}", flush=True)
        auroc = results["pooled"].get("auroc")
        print(f"[fedfm] baseline {name}: pooled test AUROC {auroc:.4f}" if auroc is not None
              else f"[fedfm] baseline {name}: done", flush=True)


def keep_spent_ledgers(folder: Path, name: str) -> None:
    """Clear an interrupted baseline for its restart, except its sites' ledgers when they record
    spending: the hospitals were charged for it, so the restart trains on the same ledgers (the
    audit verifies and composes both attempts) and their budgets count it; a site it leaves too
    little for refuses the restart's rounds and the baseline says so."""
    ledger = folder / "ledger"
    spent = {path.stem: spent_epsilon(ledger, path.stem) for path in sorted(ledger.glob("*.jsonl"))}
    spent = {site: epsilon for site, epsilon in spent.items() if epsilon}
    if not spent:
        shutil.rmtree(folder, ignore_errors=True)  # nothing spent: the restart starts afresh
        return
    for path in folder.iterdir():  # the rest of the attempt goes
        if path != ledger:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(ledger / "personal", ignore_errors=True)  # its personal state: the restart starts at round 1
    print(f"[fedfm] baseline {name} was interrupted after spending epsilon "
          + ", ".join(f"{site} {epsilon:.3f}" for site, epsilon in spent.items())
          + f": its ledgers in {ledger} are kept and the restart's budgets count it (a site may stop early)", flush=True)
