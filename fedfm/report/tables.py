"""The report's tables and key findings as plain strings, shared by the HTML and Markdown writers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfm.protocol import sorted_sites
from fedfm.report.collect import BASELINE_LABELS

METRIC_LABELS = {
    "auroc": "AUROC", "accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
    "sensitivity": "sensitivity", "specificity": "specificity", "ece": "ECE",
}


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def num(x: Any, digits: int = 4) -> str:
    if not isinstance(x, (int, float)) or x != x:
        return "-"
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.0000"


def with_ci(entry: dict[str, Any] | None) -> str:
    """``0.9433 (0.9210-0.9612)``: value and bootstrap 95 % interval."""
    if not entry:
        return "-"
    ci = entry.get("ci95")
    return f"{num(entry['value'])} ({num(ci[0])}-{num(ci[1])})" if ci else num(entry["value"])


def site_table(run: dict[str, Any]) -> Table:
    metrics = [k for k in METRIC_LABELS if any(k in r["metrics"] for r in run["sites"])]
    headers = ["site", "train / val / test images", "train labels", *[METRIC_LABELS[k] for k in metrics], "epsilon / budget"]
    rows = []
    for r in run["sites"]:
        labels = " : ".join(str(c) for c in r["label_counts"].get("train", [])) or "-"
        eps = "held out (never trained)" if r["held_out"] else (
            f"{num(r['epsilon'], 3)} / {num(r['budget'], 1)}" if r["budget"] is not None else "no DP")
        name = r["site"] + (" (unseen)" if r["held_out"] else "")
        rows.append([name, f"{r['n_train']} / {r['n_val']} / {r['n_test']}", labels,
                     *[with_ci(r["metrics"].get(k)) for k in metrics], eps])
    for label, block in (("pooled", run["pooled"]), ("pooled, seen sites", run["pooled_seen"]),
                         ("pooled, unseen sites", run["pooled_unseen"])):
        if block:
            rows.append([label, "", "", *[with_ci(block.get(k)) for k in metrics], ""])
    return Table("Per-site test results of the federated model", headers, rows,
                 "Values are on each site's own test split; brackets are bootstrap 95 % confidence intervals "
                 "(1000 resamples of test images). Train labels: images per class (class 0 : class 1 : ...). "
                 "ECE: expected calibration error, 15 equal-width bins (0 = perfectly calibrated).")


def shift_table(run: dict[str, Any]) -> Table | None:
    rows = [[r["site"], *(num(r["shift"].get(k), 3) for k in ("gamma", "gain", "offset", "noise_std", "bias_coeff"))]
            for r in run["sites"] if r["shift"]]
    if not rows:
        return None
    return Table("Simulated acquisition shift per site (MONAI intensity transforms)",
                 ["site", "gamma", "gain", "offset", "noise std", "bias field coeff."], rows,
                 "Applied to every image of the site (train, val and test): gamma curve, smooth bias field "
                 "(RandBiasField, degree 2), gain (ScaleIntensity), offset (ShiftIntensity), Gaussian noise.")


def loso_table(run: dict[str, Any]) -> Table | None:
    m = run["loso"]
    if not m:
        return None
    rows = [[r["label"], *(num(r["auroc"].get(s)) for s in m["sites"])] for r in m["rows"]]
    rows.append(["unseen minus seen", *(num(-m["gap"][s]) if s in m["gap"] else "" for s in m["sites"])])
    worst_site, worst = m["worst_unseen"]
    return Table("Leave-one-site-out: test AUROC at each site (columns) of the federation trained on (rows)",
                 ["trained on", *m["sites"]], rows,
                 f"The federation is retrained without one site at a time and tested at every site. Its score at the "
                 f"left-out site is the unseen-hospital AUROC: mean {num(m['mean_unseen_auroc'])}, worst "
                 f"{num(worst)} ({worst_site}).")


def baselines_table(run: dict[str, Any]) -> Table | None:
    b = run["baselines"]
    if not b:
        return None
    sites = sorted_sites({s for v in b.values() for s in v["auroc"]})
    rows = []
    tuned = any(v.get("chosen") for v in b.values())
    for v in b.values():
        worst = v["worst_site"] or {}
        chosen = [", ".join(f"{k}={x}" for k, x in (v.get("chosen") or {}).items()) or "-"] if tuned else []
        calibration = v.get("calibration") or {}
        auroc = calibration.get("auroc") or {}
        several = auroc.get("after") is not None and v.get("calibrated_models", 0) > 1  # one model keeps its ranking
        pooled = with_ci(v["pooled"].get("auroc")) + (f" -> {num(auroc['after'])}" if several else "")
        rows.append([v["label"], *chosen, *(num(v["auroc"].get(s)) for s in sites), pooled,
                     f"{num(worst.get('auroc'))} ({worst.get('site', '-')})", num(v["max_epsilon"], 3),
                     *(_before_after(calibration.get(k)) for k in ("ece", "balanced_accuracy"))])
    note = ("Same data, model and rounds. Local only: each site trains alone with DP-SGD at its own budget and "
            "is tested on its own test split. Centralized: all training images pooled in one place. "
            "ECE and balanced accuracy: pooled test, before -> after the temperature and threshold each model "
            "fitted on the validation splits it trained with (a local-only site on its own split). Pooled AUROC "
            "changes with calibration only where several models' predictions are pooled (local only): x -> y.")
    if tuned:
        note += " Each method's values were chosen by its own search on validation over the same candidates."
    searched = [f"{v['label']} ({v['search_runs']} runs)" for v in b.values() if v.get("search_runs")]
    if searched:
        note += (" Max epsilon of a DP baseline composes every run of its search, trials and final run, as the "
                 f"federated model's ledgers do: {', '.join(searched)}.")
    return Table("Federated model against baselines: test AUROC",
                 ["model", *(["chosen on validation"] if tuned else []), *sites, "pooled", "worst site", "max epsilon",
                  "pooled ECE", "balanced acc."],
                 rows, note)


def _before_after(pair: dict[str, Any] | None) -> str:
    if not pair:
        return "-"
    return num(pair["before"]) if pair.get("after") is None else f"{num(pair['before'])} -> {num(pair['after'])}"


def runs_table(report: dict[str, Any]) -> Table | None:
    if len(report["runs"]) < 2:
        return None
    rows = [[p["run"], p.get("adapter", "-"), _count(p.get("trainable_params")), num(p["max_epsilon"], 3),
             num(p["pooled_auroc"]), num(p["worst_site_auroc"]), num(p.get("pooled_ece")),
             num(p.get("seconds_per_round"), 1), _mb(p.get("mean_upload_bytes")), _mb(p.get("update_bytes")),
             _mb(p.get("bytes_per_round"))]
            for p in report["tradeoff"]]
    return Table("Runs side by side",
                 ["run", "adapter", "trainable params", "largest site epsilon", "pooled AUROC", "worst-site AUROC",
                  "pooled ECE", "s / round", "MB per site upload", "MB final model sent", "MB moved per round"], rows,
                 "Trainable params: what a site trains (adapter and head). s / round: the run's wall time over its "
                 "rounds (start-up, cache building and the final evaluation included). MB per site upload: a site's "
                 "train reply, averaged over the run. MB final model sent: the adapter the server sends at the end. "
                 "MB moved per round: every adapter sent and received (training down and up, validation down), "
                 "averaged over the run's rounds.")


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "-"


def _mb(x: Any) -> str:
    return num(x / 1e6, 3) if isinstance(x, (int, float)) else "-"


def personal_table(run: dict[str, Any]) -> Table | None:
    rows = [r for r in run["sites"] if r.get("personal")]
    if not rows:
        return None
    out = []
    for r in rows:
        glob, own = r["metrics"].get("auroc"), r["personal"].get("auroc")
        diff = own["value"] - glob["value"] if glob and own else None
        out.append([r["site"], with_ci(glob), with_ci(own), ("+" if (diff or 0) >= 0 else "") + num(diff),
                    num((r["metrics"].get("accuracy") or {}).get("value")), num((r["personal"].get("accuracy") or {}).get("value"))])
    if run.get("pooled_personal") and run["pooled"]:
        glob, own = run["pooled"].get("auroc"), run["pooled_personal"].get("auroc")
        diff = own["value"] - glob["value"] if glob and own else None
        out.append(["pooled", with_ci(glob), with_ci(own), ("+" if (diff or 0) >= 0 else "") + num(diff),
                    num((run["pooled"].get("accuracy") or {}).get("value")),
                    num((run["pooled_personal"].get("accuracy") or {}).get("value"))])
    return Table("Personalized against global model", ["site", "global AUROC", "personalized AUROC", "difference",
                                                       "global acc.", "personalized acc."], out,
                 "Personalized: the global adapter with the site's own personal tensors (lora.personal) from its last "
                 "round; global: the aggregated adapter every site receives. Same test split for both.")


def screening_table(run: dict[str, Any]) -> Table | None:
    rows = run.get("screening") or []
    if not rows:
        return None
    return Table("Updates refused, rejected or bounded", ["round", "site or node", "what happened"],
                 [[str(r["round"]), r["who"], r["what"]] for r in rows],
                 "A refusal is the site's own (its privacy budget, a rolled-back ledger); a rejection is the server's "
                 "(malformed, non-finite, wrong rank, above federation.max_update_bytes, ledger head missing or behind). "
                 "Neither is averaged. A bounded update is averaged at federation.update_clip_norm.")


def key_findings(run: dict[str, Any]) -> list[str]:
    """A few sentences a clinical reader starts with."""
    out = []
    pooled = run["pooled"].get("auroc")
    if pooled:
        out.append(f"Pooled test AUROC {with_ci(pooled)} over {sum(r['n_test'] or 0 for r in run['sites'])} test images "
                   f"from {len(run['sites'])} sites.")
    worst = run["worst_site"]
    if worst:
        out.append(f"Worst site: {worst['site']} with AUROC {num(worst['auroc'])}; the best site ({worst['best_site']}) "
                   f"is {num(worst['best_minus_worst_auroc'])} higher.")
    own = (run.get("pooled_personal") or {}).get("auroc")
    if own and pooled:
        better = sum(1 for r in run["sites"] if r.get("personal", {}).get("auroc") and r["metrics"].get("auroc")
                     and r["personal"]["auroc"]["value"] > r["metrics"]["auroc"]["value"])
        out.append(f"Personalized models: pooled AUROC {with_ci(own)} against {num(pooled['value'])} for the global "
                   f"model; personalization helps {better} of {len(run['sites'])} sites.")
    if run["loso"]:
        m = run["loso"]
        out.append(f"At a hospital it never trained on, the federation reaches AUROC {num(m['mean_unseen_auroc'])} on "
                   f"average (worst {num(m['worst_unseen'][1])} at {m['worst_unseen'][0]}).")
    if run["pooled_unseen"].get("auroc"):
        out.append(f"Held-out sites (never trained): pooled AUROC {with_ci(run['pooled_unseen']['auroc'])}.")
    b = run["baselines"]
    for name in ("local", "centralized", "centralized_nodp", "federated_nodp"):
        if name in b and b[name]["pooled"].get("auroc") and pooled:
            diff = pooled["value"] - b[name]["pooled"]["auroc"]["value"]
            out.append(f"Against {b[name]['label']}: pooled AUROC {num(b[name]['pooled']['auroc']['value'])} "
                       f"({'+' if diff >= 0 else ''}{num(diff)} for the federated model).")
    trained = [r for r in run["sites"] if r["budget"] is not None and not r["held_out"]]
    if trained:
        top = max(trained, key=lambda r: r["epsilon"] or 0)
        out.append(f"Privacy: every site stayed within its budget; the largest spend is epsilon {num(top['epsilon'], 3)} "
                   f"of {num(top['budget'], 1)} ({top['site']}, delta {run['summary']['delta']})."
                   if all((r["epsilon"] or 0) <= r["budget"] for r in trained) else
                   "Privacy: a site exceeded its budget - see the per-site table.")
    return out


def calibration_table(run: dict[str, Any]) -> Table | None:
    cal = run.get("calibration")
    if not cal:
        return None
    labels = {"loss": "test loss (NLL)", **METRIC_LABELS}
    rows = [[labels.get(k, k), num(v["before"]), num(v["after"])] for k, v in cal["pooled"].items()]
    for name, site in cal["sites"].items():
        rows.append([f"{name} balanced acc.", num(site["before"].get("balanced_accuracy")),
                     num(site["after"].get("balanced_accuracy"))])
    threshold = "" if cal["threshold"] is None else f" and a decision threshold of {num(cal['threshold'], 3)} on p(class 1)"
    return Table("Calibration fitted on validation: pooled test metrics before and after", ["metric", "before", "after"], rows,
                 f"A temperature of {num(cal['temperature'], 3)}{threshold}, fitted on the sum of the sites' validation "
                 "statistics (NLL per temperature, confusion counts per threshold; no images or predictions moved). "
                 "Those statistics carry no DP noise. AUROC does not change: both steps keep the ranking.")


def tuning_table(run: dict[str, Any]) -> Table | None:
    tuning = run.get("tuning")
    if not tuning:
        return None
    methods = tuning.get("methods") or {"federated": {"trials": tuning["trials"], "chosen": tuning.get("chosen")}}
    keys = list(dict.fromkeys([*tuning["grid"], *(k for search in methods.values() for k in search.get("grid", {}))]))
    own = [BASELINE_LABELS.get(m, m) for m, search in methods.items() if search.get("grid", tuning["grid"]) != tuning["grid"]]
    rows = []
    for method, search in methods.items():
        for t in search["trials"]:
            mark = " (chosen)" if t["number"] == search.get("chosen") else ""
            rows.append([BASELINE_LABELS.get(method, method), f"{t['number'] + 1}{mark}", *(str(t["values"].get(k)) for k in keys),
                         num(t["val_auroc"]), num(t["val_metrics"].get("ece")), f"{t['wall_s']:.0f}"])
    privacy = tuning.get("privacy") or {}
    spent = "; ".join(f"{site}: {p['runs']} runs, epsilon {num(p['epsilon_total'], 3)}"
                      + (f" (random-count bound {num(p['ps_epsilon'], 3)})" if p.get("ps_epsilon") is not None else "")
                      for site, p in privacy.items())
    diverged = [BASELINE_LABELS.get(m, m) for m, search in methods.items() if search.get("diverged")]
    left_out = (f" Not run on test, every candidate diverged (no validation AUROC): {', '.join(diverged)}."
                if diverged else "")
    same = ("each method chose among the same candidates on its own" if not own else
            f"each method chose on its own, among the same candidates except {', '.join(own)} (its own values, "
            "as many candidates)")
    return Table("Hyperparameter search (validation only)",
                 ["method", "trial", *keys, "validation AUROC", "validation ECE", "wall s"], rows,
                 f"{tuning['selection']}; {same}.{left_out} Every federated trial "
                 f"trained on the same private data: the sites' ledgers compose all of them with the final run "
                 f"(privacy.runs_in_budget = {tuning['runs_in_budget']}). Spent per site: {spent}.")


def seeds_table(run: dict[str, Any]) -> Table | None:
    seeds = run.get("seeds")
    if not seeds:
        return None
    spread = seeds["spread"]
    calibrated = "lowest_site_balanced_accuracy" in spread

    def moved(before: str, after: str) -> str:
        return f"{before} -> {after}" if calibrated else before

    rows = []
    for r in seeds["rows"]:
        ci = r.get("auroc_ci95")
        auroc = f"{num(r['auroc'])} ({num(ci[0])}-{num(ci[1])})" if ci else num(r["auroc"])
        row = [str(r["seed"]), auroc, num(r["worst_site_auroc"]), moved(num(r["ece"]), num(r.get("ece_calibrated"))),
               moved(num(r["balanced_accuracy"]), num(r.get("balanced_accuracy_calibrated")))]
        if calibrated:
            lowest = r.get("lowest_site_balanced_accuracy")
            row.append(f"{num(lowest)} ({r['lowest_site']})" if lowest is not None else "-")
        rows.append(row)

    def cell(key: str) -> str:
        s = spread.get(key)
        return f"{num(s['mean'])} +/- {num(s['std'])}" if s else "-"

    last = ["mean +/- std", cell("auroc"), cell("worst_site_auroc"), moved(cell("ece"), cell("ece_calibrated")),
            moved(cell("balanced_accuracy"), cell("balanced_accuracy_calibrated"))]
    rows.append([*last, cell("lowest_site_balanced_accuracy")] if calibrated else last)
    headers = ["train.seed", "pooled test AUROC (95 % CI)", "worst site", "ECE", "balanced acc."]
    note = ("Standard deviation across seeds (n - 1); the intervals are each seed's bootstrap over test images. "
            "Each seed is a separate replication with its own ledger at the stated epsilon: releasing several "
            "of them would compose their epsilons.")
    if calibrated:
        headers = [*headers[:3], "ECE (before -> after)", "balanced acc. (before -> after)", "lowest site balanced acc. (after)"]
        note += (" Before -> after: pooled test metrics without and with the temperature and threshold each seed's run "
                 "fitted on validation; the last column is the site whose own test split scores the lowest balanced "
                 "accuracy with that threshold.")
    return Table("Seeds: the same configuration with other seeds of sampling, noise and dropout", headers, rows, note)


def per_class_table(run: dict[str, Any]) -> Table | None:
    recalls = run.get("recall_per_class")
    if not recalls:
        return None
    return Table("Per-class sensitivity (pooled test)", ["class", "sensitivity (recall)"],
                 [[str(c), num(r)] for c, r in enumerate(recalls)],
                 "Balanced accuracy is their mean; a class near 0 is one the model does not predict.")
