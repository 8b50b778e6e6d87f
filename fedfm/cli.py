"""The ``fedfm`` command line: ``simulate``, ``tune``, ``report``, ``audit``, ``export``, ``predict``, ``deploy``, ``bench``, ``chaos``, ``config``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fedfm.appconfig import APP_DIR
from fedfm.config import ConfigError, load_config

DEFAULT_CONFIG = APP_DIR / "configs" / "quickstart.yaml"


def check_out_folder(value: str | Path | None, flag: str = "--out") -> None:
    """Bad input fails before any work: a folder flag that names a file (or a path under a file),
    or a folder that cannot be created. Creates nothing; a missing folder is created later."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag} {value} is a file: give a folder (it is created if missing)")
        return
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{flag} {value}: {parent} is a file: give a folder (it is created if missing)")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {value} cannot be created: no write permission in {parent}; give a folder you can write")


def check_positive_count(value: int | None, flag: str, what: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run N simulated hospitals on Flower's simulation engine")
    sim.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML (default: configs/quickstart.yaml)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value, e.g. --set federation.rounds=5 (repeatable)")
    sim.add_argument("--out", default=None, help="run folder (default: runs/<output.name>-<timestamp>)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's full log, not only progress")
    sim.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue an interrupted or paused run from its last checkpoint (its own config)")
    sim.add_argument("--until-round", type=int, default=0, metavar="K",
                     help="stop cleanly after round K (continue later with --resume)")
    tune = sub.add_parser("tune", help="choose hyperparameters on validation only, then test the chosen ones once")
    tune.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML (default: configs/quickstart.yaml)")
    tune.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                      help="values to try for one config key, e.g. --grid train.lr=0.01,0.03 (repeatable: every combination runs)")
    tune.add_argument("--method-grid", action="append", default=[], metavar="METHOD:SECTION.KEY=V1,V2",
                      help="one method's own values for a key, same count as in --grid, e.g. "
                           "--method-grid centralized_nodp:train.lr=0.001,0.003 (non-private SGD needs smaller steps)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value for every candidate (repeatable)")
    tune.add_argument("--out", default=None, help="search folder, also the final run's (default: runs/<output.name>-tune-<timestamp>)")
    tune.add_argument("--resume", action="store_true", help="continue the search in --out: finished trials are kept")
    tune.add_argument("--random-trials", type=float, default=None, metavar="MEAN",
                      help="random search: a geometric number of trials with this mean, each a random grid point "
                           "(the chosen model then also gets Papernot & Steinke's sharper bound)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the random search (logged in tuning.json)")
    tune.add_argument("--verbose", action="store_true", help="show Flower's full log, not only progress")
    audit = sub.add_parser("audit", help="verify site ledgers and recompute every epsilon independently")
    audit.add_argument("run_dir", help="a run folder (with ledger/) or a folder of <site>.jsonl ledgers")
    audit.add_argument("--out", default=None, help="where to write audit.json and audit.md (default: run_dir)")
    audit.add_argument("--canaries", type=int, default=0, metavar="M",
                       help="also replay each site's training with M gradient canaries for an empirical lower bound")
    audit.add_argument("--seed", type=int, default=0, help="seed of the canaries")
    audit.add_argument("--keys", default=None, metavar="DIR",
                       help="the sites' public keys (<site>.pub, as registered at the coordinator); default: keys/ beside the ledgers")
    audit.add_argument("--anchors", default=None, metavar="DIR",
                       help="the coordinator's anchor log folder (anchors.jsonl; deployment: next to the SuperLink's state); "
                            "default: RUN_DIR/ledger-federation when it has one")
    report = sub.add_parser("report", help="write report.html/.md/.json for one or more run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by fedfm simulate")
    report.add_argument("--out", default=None, help="where to write the report (default: the first RUN_DIR)")
    add_export_and_predict(sub)
    add_deploy(sub)
    bench = sub.add_parser("bench", help="measure DP overhead, bytes per update, simulation scale, deployment latency")
    bench.add_argument("--quick", action="store_true", help="fewer steps and sites (minutes, not an hour)")
    bench.add_argument("--out", default="runs/bench", help="where to write bench.json (default: runs/bench)")
    bench.add_argument("--only", default=None, metavar="PARTS", help="comma-separated subset of steps,comm,scale,deploy,foundation")
    chaos = sub.add_parser("chaos", help="fault soak: local deployments with a random fault each, resumed, then checked")
    chaos.add_argument("--seed", type=int, default=0, help="seed of the first run; run k uses seed + k (default 0)")
    chaos.add_argument("--runs", type=int, default=8, help="faulted runs (default 8: one of each fault kind)")
    chaos.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    chaos.add_argument("--sites", type=int, default=2, help="sites per run (default 2)")
    chaos.add_argument("--no-reference", action="store_true", help="skip the unbroken run (and check d)")
    chaos.add_argument("--out", default="runs/chaos", help="where the runs and soak.json go (default: runs/chaos)")
    check = sub.add_parser("config", help="validate a config, check it against its data and print it resolved")
    check.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedfm.data.resolve import check_data, resolve_data
    from fedfm.models.registry import check_backbone
    from fedfm.simulate import resumable_run
    from fedfm.study import run_study

    if args.until_round < 0:
        raise ConfigError(f"--until-round {args.until_round}: give the round K to stop after (1..federation.rounds), "
                          "or leave it out to run to the end")
    if args.resume:
        if args.overrides or args.out:
            raise ConfigError("--resume continues a run with its own config: drop --set and --out")
        config, run_dir = resumable_run(args.resume)
        check_until_round(args.until_round, config.federation.rounds)
        check_data(config.data)  # the data still matches the run's recorded config, which stays as it is
        run_dir = run_study(config, str(run_dir), args.verbose, resume=True, until_round=args.until_round)
    else:
        check_out_folder(args.out)
        config = load_config(args.config, args.overrides)
        check_until_round(args.until_round, config.federation.rounds)
        if not args.out:
            check_out_folder(config.output.dir, "output.dir")
        facts = resolve_data(config.data)  # before Flower and before the run folder: one line, exit 2
        check_backbone(config.model, facts.spatial_dims)  # missing weights: one line, before Flower
        print(f"[fedfm] {facts.summary()}", flush=True)
        run_dir = run_study(config, args.out, verbose=args.verbose, until_round=args.until_round)
    if json.loads((run_dir / "results.json").read_text())["status"] == "complete":
        print_summary(run_dir)
    return 0


def check_until_round(until_round: int, rounds: int) -> None:
    if until_round > rounds:
        raise ConfigError(f"--until-round {until_round}: the run has federation.rounds={rounds}: give a round in "
                          f"1..{rounds}, or leave it out to run to the end")


def cmd_tune(args: argparse.Namespace) -> int:
    from datetime import datetime

    from fedfm.data.resolve import resolve_data
    from fedfm.models.registry import check_backbone
    from fedfm.tune import parse_grid, parse_method_grids, run_tuning

    if args.random_trials is not None and not (math.isfinite(args.random_trials) and args.random_trials > 1):
        raise ConfigError(f"--random-trials {args.random_trials}: give the mean number of trials as a finite "
                          "number > 1, e.g. --random-trials 4")
    check_out_folder(args.out)
    config = load_config(args.config, args.overrides)
    facts = resolve_data(config.data)  # every candidate trains on this data: checked once, before any trial
    grid = parse_grid(args.grid)
    method_grids = parse_method_grids(args.method_grid, grid, ["federated", *config.eval.baselines])
    if args.resume and not args.out:
        raise ConfigError("--resume continues the search in --out: pass --out RUN_DIR")
    check_backbone(config.model, facts.spatial_dims)
    out = args.out or str(Path("runs") / f"{config.output.name}-tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_tuning(config, grid, out, verbose=args.verbose, resume=args.resume,
                         random_trials=args.random_trials, seed=args.seed, method_grids=method_grids)
    print_summary(run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedfm.report import write_report

    check_out_folder(args.out)
    paths = write_report(args.run_dirs, args.out or args.run_dirs[0])
    print(f"wrote {paths['html']}, {paths['md'].name} and {paths['json'].name}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedfm.audit import audit_run, write_audit

    from fedfm.audit.scope import scope_notes

    if args.canaries < 0:
        raise ConfigError(f"--canaries {args.canaries}: give a number of canaries >= 0 (0: no canary audit)")
    check_out_folder(args.out)  # a file fails now, not after the audit; write_audit creates a missing folder
    audits = audit_run(args.run_dir, canaries=args.canaries, seed=args.seed, keys=args.keys, anchors=args.anchors)
    json_path, md_path = write_audit(audits, args.out or args.run_dir)
    notes = scope_notes(args.run_dir)
    if notes:  # what the statements cover beyond the ledgers: a search's trials, un-noised statistics
        payload = json.loads(json_path.read_text())
        json_path.write_text(json.dumps({**payload, "scope": notes}, indent=2))
        md_path.write_text(md_path.read_text().rstrip("\n") + "\n\n## Scope\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    for a in audits:
        eps = ", ".join(f"{k} {v:.4f}" for k, v in a.epsilons.items())
        last = f"  last round {a.rounds[-1]}" if a.rounds else ""
        print(f"{a.site}: {'PASS' if a.passed else 'FAIL'}  reported {a.reported_epsilon}{last}  {eps}")
        if len(a.runs) > 1:
            print(f"  {len(a.runs)} runs on this ledger: " + ", ".join(
                f"run {r['run_id'] or '?'} {r['rounds']} rounds -> epsilon {r['epsilon_after']:.3f}" for r in a.runs))
        if a.empirical:
            r = a.empirical["result"]
            print(f"  empirical: {r['correct']}/{r['guesses']} guesses right, epsilon >= {r['epsilon_lower_bound']:.3f}")
        for problem in a.problems:
            print(f"  - {problem}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(a.passed for a in audits) else 1


def add_export_and_predict(sub) -> None:
    export = sub.add_parser("export", help="write a run's adapter (PEFT format), or with --merge the merged model")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a completed run folder written by fedfm simulate")
    export.add_argument("--merge", action="store_true",
                        help="merge LoRA into the backbone weights: model.safetensors + model.json")
    export.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/export)")
    predict = sub.add_parser("predict", help="classify image files with a run's trained adapter")
    predict.add_argument("run_dir", metavar="RUN_DIR", help="a completed run folder written by fedfm simulate")
    predict.add_argument("images", nargs="+", metavar="IMAGES", help="image files (png, jpg, ...) or folders of them")
    predict.add_argument("--out", default=None, metavar="FILE", help="also write the predictions as CSV")
    predict.add_argument("--labels", action="store_true",
                         help="each image's parent folder is named by its true class index: report accuracy")
    predict.add_argument("--uncalibrated", action="store_true",
                         help="raw softmax and most probable class, ignoring the temperature and threshold fitted on validation")


def add_deploy(sub) -> None:
    deploy = sub.add_parser("deploy", help="set up or run a deployment across hospital sites")
    actions = deploy.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="write a CA, the SuperLink certificate, site keys and env files")
    init.add_argument("--sites", type=int, required=True, help="number of hospital sites")
    init.add_argument("--out", default="deployment", help="output folder (default: ./deployment)")
    init.add_argument("--name", dest="names", action="append", default=[], metavar="HOST",
                      help="host name or IP the sites dial for the SuperLink (repeatable; first one is used in the steps)")
    init.add_argument("--budget", type=float, default=8.0, help="each site's epsilon budget in its env file")
    init.add_argument("--site-keys", default=None, metavar="DIR",
                      help="the public keys the sites made themselves (site-K.pub from fedfm deploy keygen); "
                           "default: generate every site's key pair here (deploy local, demos)")
    keygen = actions.add_parser("keygen", help="at a hospital: make this site's own key pair; send only site-K.pub")
    keygen.add_argument("--site", type=int, required=True, help="this site's number K (as in site-K)")
    keygen.add_argument("--out", default="keys", help="folder for site-K and site-K.pub (default: ./keys)")
    local = actions.add_parser("local", help="run the deployment as local processes on loopback (TLS + auth)")
    local.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML")
    local.add_argument("--sites", type=int, default=None, help="number of sites (default: data.num_sites)")
    local.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    local.add_argument("--out", default=None, help="run folder (default: runs/<output.name>-<timestamp>)")
    local.add_argument("--verbose", action="store_true", help="show Flower's full log")
    local.add_argument("--state", default=None, metavar="DIR",
                       help="a folder that outlives runs, as hospitals' volumes do: the deployment's keys, each "
                            "site's ledger and the coordinator's anchor log; the next run with the same DIR "
                            "continues every site's epsilon (default: all inside the run folder)")


def cmd_deploy(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
    if args.action == "init":
        from fedfm.deploy.init import init_deployment

        dep = init_deployment(args.out, args.sites, args.names, args.budget, site_keys=args.site_keys)
        print((dep.root / "STEPS.md").read_text())
        if args.site_keys:
            print(f"wrote {dep.root}: keep certs/ca.key private; hand each site certs/ca.crt and its sites/site-K.env")
        else:
            print(f"wrote {dep.root}: keep certs/ca.key and every keys/site-K private; hand site K only its own files")
        return 0
    if args.action == "keygen":
        from fedfm.deploy.init import site_keygen

        private, public = site_keygen(args.out, args.site)
        print(f"wrote {private} (private: stays at this site; it authenticates the SuperNode and signs the ledger) "
              f"and {public}: send {public.name} to the coordinator")
        return 0
    from fedfm.data.resolve import resolve_data
    from fedfm.deploy.local import deploy_local
    from fedfm.models.registry import check_backbone

    check_positive_count(args.sites, "--sites", "a deployment needs at least one site (default: data.num_sites)")
    check_out_folder(args.state, "--state")
    overrides = list(args.overrides) + ([f"data.num_sites={args.sites}"] if args.sites is not None else [])
    config = load_config(args.config, overrides)
    if not args.out:
        check_out_folder(config.output.dir, "output.dir")
    facts = resolve_data(config.data)  # before any process, key or run folder: one line, exit 2
    check_backbone(config.model, facts.spatial_dims)  # missing weights: one line, before any process
    print(f"[fedfm] {facts.summary()}", flush=True)
    run_dir = deploy_local(config, args.out, verbose=args.verbose, state=args.state)
    print_summary(run_dir)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedfm.bench import PARTS, run_bench, tables

    parts = PARTS
    if args.only is not None:
        parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
        if not parts:
            raise ConfigError(f"--only {args.only!r} names no part: give one or more of {', '.join(PARTS)} "
                              "(comma-separated), or leave --only out to run them all")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"--only {args.only}: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    check_out_folder(args.out)
    report = run_bench(Path(args.out), quick=args.quick, parts=parts)
    print(tables(report))
    print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from fedfm.chaos.soak import soak, table

    if args.runs < 1:
        raise ConfigError(f"--runs {args.runs}: a soak needs at least one run")
    check_positive_count(args.rounds, "--rounds", "each soak run needs at least one round (default 2)")
    check_positive_count(args.sites, "--sites", "each soak run needs at least one site (default 2)")
    check_out_folder(args.out)
    report = soak(Path(args.out), args.seed, args.runs, args.rounds, args.sites, reference=not args.no_reference)
    print(table(report))
    print(f"wrote {Path(args.out) / 'soak.json'}")
    return 0 if report["summary"]["lost"] == 0 and report.get("summary", {}).get("runs") == args.runs else 1


def cmd_export(args: argparse.Namespace) -> int:
    from fedfm.export import export_run
    from fedfm.models.spec import MERGED_SPEC, MERGED_WEIGHTS

    check_out_folder(args.out)
    folder = export_run(args.run_dir, args.out, merge=args.merge)
    written = f"{MERGED_WEIGHTS} + {MERGED_SPEC}" if args.merge else "PEFT adapter + fedfm_model.json"
    print(f"wrote {written} to {folder}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedfm.predict import format_line, predict_run, write_csv

    if args.out and Path(args.out).expanduser().is_dir():
        raise ConfigError(f"--out {args.out} is a folder: give the name of the CSV file to write, e.g. --out predictions.csv")
    predictions = predict_run(args.run_dir, args.images, labelled=args.labels, calibrated=not args.uncalibrated)
    if predictions.calibration is not None:
        cal = predictions.calibration
        threshold = "" if cal.threshold is None else f", class 1 when p1 >= {cal.threshold:.3f}"
        print(f"calibrated on validation: temperature {cal.temperature:.3f}{threshold} (--uncalibrated for raw)")
    for i, path in enumerate(predictions.files):
        label = None if predictions.labels is None else int(predictions.labels[i])
        print(format_line(path, predictions.probs[i], label, int(predictions.predicted[i])))
    if predictions.accuracy is not None:
        print(f"accuracy {predictions.accuracy:.4f} on {len(predictions.files)} labelled images")
    if args.out:
        print(f"wrote {write_csv(predictions, args.out)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedfm.data.resolve import resolve_data
    from fedfm.models.registry import check_backbone

    config = load_config(args.config, args.overrides)
    facts = resolve_data(config.data)  # the data opened and checked; num_classes and dataset as a run would get them
    check_backbone(config.model, facts.spatial_dims)  # the backbone and what it loads, as a run checks them
    print(json.dumps(config.model_dump(), indent=2))
    return 0


def print_summary(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    print(f"\n{'site':<10} {'n_train':>8} {'n_test':>7} {'AUROC':>7} {'acc':>7} {'bal.acc':>8} {'epsilon':>8}")
    rows = list(results["sites"].items()) + [("pooled", {"test": results["pooled"]})]
    for name, site in rows:
        test = site.get("test", {})
        print(
            f"{name:<10} {site.get('n_train', ''):>8} {site.get('n_test', test.get('n', '')):>7} "
            f"{_fmt(test.get('auroc'))} {_fmt(test.get('accuracy'))} {_fmt(test.get('balanced_accuracy'), 8)} "
            f"{_fmt(site.get('epsilon'), 8, 3) if 'epsilon' in site else '':>8}"
        )
    ci = results["pooled"].get("ci95", {}).get("auroc")
    if ci:
        print(f"pooled AUROC 95 % CI [{ci[0]:.4f}, {ci[1]:.4f}] (bootstrap over test images)")
    worst = results.get("worst_site")
    if worst:
        print(f"worst site {worst['site']} (AUROC {worst['auroc']:.4f}); best minus worst {worst['best_minus_worst_auroc']:.4f}")
    comm = results["communication"]
    print(
        f"\nupdate {comm['update_bytes'] / 1e6:.3f} MB vs full model {comm['full_model_bytes'] / 1e6:.2f} MB "
        f"({100 * (comm['update_to_full_ratio'] or 0):.2f} %), {comm['total_bytes_moved'] / 1e6:.1f} MB moved"
    )
    ledgers = f"  ledgers: {run_dir / 'ledger'}" if (run_dir / "ledger").is_dir() else ""
    print(f"results: {run_dir / 'results.json'}  adapter: {run_dir / 'adapter'}{ledgers}")


def _fmt(value, width: int = 7, digits: int = 4) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"export": cmd_export, "predict": cmd_predict,
                "simulate": cmd_simulate, "tune": cmd_tune, "audit": cmd_audit, "report": cmd_report, "config": cmd_config,
                "deploy": cmd_deploy, "bench": cmd_bench, "chaos": cmd_chaos}
    try:
        return handlers[args.command](args)
    except ConfigError as err:  # also a report's ReportError
        print(f"fedfm: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, FileNotFoundError) as err:
        print(f"fedfm: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the local SuperLink, its simulation and Ray were stopped on the way out
        print("fedfm: interrupted: training stopped; continue a run from its last checkpoint with fedfm simulate "
              "--resume RUN_DIR, a search with the same fedfm tune command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
