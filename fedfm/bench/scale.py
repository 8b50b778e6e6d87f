"""How many virtual sites one machine holds: wall time per round and peak memory of the simulation.

Runs ``fedfm simulate`` (Flower's simulation engine) with N virtual sites of which 10 are sampled
per round, and samples the resident memory of the whole process tree (the local SuperLink, the
ServerApp, Ray and its workers) every half second.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil


class TreeMemory:
    """Peak summed RSS of every process started for the simulation (sampled in a thread)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    @staticmethod
    def sample() -> int:
        roots = [psutil.Process()]
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if "flower-superlink" in cmd and "--simulation" in cmd:
                roots.append(proc)
        seen: dict[int, int] = {}
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    seen[proc.pid] = proc.memory_info().rss
            except psutil.Error:
                continue
        return sum(seen.values())


def simulate_scale(sites: int, sampled: int = 10, rounds: int = 2, image_size: int = 16) -> dict[str, Any]:
    from fedfm.config import load_config
    from fedfm.simulate import run_simulation

    import json

    overrides = [
        f"data.num_sites={sites}", "data.samples_per_site=40", f"data.image_size={image_size}",
        f"federation.rounds={rounds}", f"federation.fraction_train={sampled / sites}",
        f"federation.fraction_evaluate={sampled / sites}", f"federation.min_train_sites={min(sampled, sites)}",
        "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.budget.epsilon=1000",
        "eval.share_predictions=false", "eval.report=false",
    ]
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp, TreeMemory() as memory:
        started = time.time()
        run_dir = run_simulation(config, str(Path(tmp) / "run"))
        wall = time.time() - started
        results = json.loads((run_dir / "results.json").read_text())
    elapsed = [r["elapsed_s"] for r in results["rounds"]]
    per_round = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    return {"sites": sites, "sampled_per_round": sampled, "rounds": rounds, "wall_s": wall,
            "first_round_s": per_round[0], "later_round_s": sum(per_round[1:]) / max(1, len(per_round) - 1),
            "peak_rss_gib": memory.peak / 2**30}
