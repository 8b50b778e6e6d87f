"""The seeds section of the report: each seed's pooled metrics before and after calibration, the
site with the lowest balanced accuracy after it, and mean / standard deviation across seeds."""

import json
import statistics
from pathlib import Path

from fedfm.config import load_config
from fedfm.report.collect import seeds_block
from fedfm.report.tables import seeds_table
from fedfm.run_folder import seed_dir

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "breast.yaml"

# per seed: pooled (auroc, ece, balanced acc.), pooled after calibration (ece, balanced acc.),
# each site's balanced accuracy after calibration
SEEDS = {
    0: ((0.70, 0.25, 0.50), (0.05, 0.62), {"site-0": 0.61, "site-1": 0.70, "site-2": 0.58}),
    1: ((0.66, 0.18, 0.59), (0.04, 0.60), {"site-0": 0.52, "site-1": 0.66, "site-2": 0.64}),
    2: ((0.68, 0.21, 0.55), (0.06, 0.66), {"site-0": 0.63, "site-1": 0.63, "site-2": 0.71}),
}


def results_of(seed: int, calibrated: bool = True) -> dict:
    (auroc, ece, bal), (ece_after, bal_after), sites = SEEDS[seed]
    return {
        "status": "complete",
        "pooled": {"auroc": auroc, "ece": ece, "balanced_accuracy": bal, "ci95": {"auroc": [auroc - 0.1, auroc + 0.1]}},
        "pooled_calibrated": {"ece": ece_after, "balanced_accuracy": bal_after} if calibrated else {},
        "worst_site": {"site": "site-0", "auroc": auroc - 0.05},
        "sites": {name: {"test": {"balanced_accuracy": 0.5},
                         **({"test_calibrated": {"balanced_accuracy": b}} if calibrated else {})}
                  for name, b in sites.items()},
    }


def study(tmp_path: Path, calibrated: bool = True):
    config = load_config(CONFIG)
    config.eval.seeds = [0, 1, 2]
    config.train.seed = 0
    for seed in (1, 2):
        folder = seed_dir(tmp_path, seed)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results_of(seed, calibrated)))
    return seeds_block(tmp_path, config, results_of(0, calibrated))


def test_each_seed_shows_its_metrics_before_and_after_calibration_and_its_lowest_site(tmp_path):
    block = study(tmp_path)
    lowest = [(row["lowest_site"], row["lowest_site_balanced_accuracy"]) for row in block["rows"]]
    assert lowest == [("site-2", 0.58), ("site-0", 0.52), ("site-0", 0.63)]  # site-0 beats site-1 on a tie by name
    for key, values in {"ece_calibrated": [0.05, 0.04, 0.06], "balanced_accuracy_calibrated": [0.62, 0.60, 0.66],
                        "lowest_site_balanced_accuracy": [0.58, 0.52, 0.63], "auroc": [0.70, 0.66, 0.68]}.items():
        assert abs(block["spread"][key]["mean"] - statistics.mean(values)) < 1e-12
        assert abs(block["spread"][key]["std"] - statistics.stdev(values)) < 1e-12

    table = seeds_table({"seeds": block})
    assert table.headers[3:] == ["ECE (before -> after)", "balanced acc. (before -> after)", "lowest site balanced acc. (after)"]
    assert table.rows[1][3:] == ["0.1800 -> 0.0400", "0.5900 -> 0.6000", "0.5200 (site-0)"]
    assert table.rows[-1][0] == "mean +/- std" and table.rows[-1][-1].startswith("0.5767 +/- ")


def test_without_calibration_the_table_keeps_the_metrics_as_they_are(tmp_path):
    table = seeds_table({"seeds": study(tmp_path, calibrated=False)})
    assert table.headers == ["train.seed", "pooled test AUROC (95 % CI)", "worst site", "ECE", "balanced acc."]
    assert table.rows[0][3:] == ["0.2500", "0.5000"] and all("->" not in cell for row in table.rows for cell in row)
