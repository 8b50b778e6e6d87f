"""Seconds per training step and peak memory: DP-LoRA, LoRA and full fine-tuning, same model and data.

Each measurement runs in a fresh process (spawned), so its peak resident memory is its own and
no cache or allocator state carries over from another mode.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

MODES = ("lora", "dp_lora", "full")


def measure(backbone: str, mode: str, image_size: int, batch: int, steps: int, threads: int = 1) -> dict[str, Any]:
    """Time ``steps`` optimizer steps (after 2 warm-up steps) of ``mode`` in this process."""
    import numpy as np
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    from fedfm.config import LoraConfig, ModelConfig
    from fedfm.models import build_model
    from fedfm.models.lora import train_mode
    from fedfm.models.registry import build_backbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone=backbone, pretrained=False)
    if mode == "full":
        model = build_backbone(model_cfg, 2, 1, image_size).model
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model, _ = build_model(model_cfg, LoraConfig(r=8), 2, 1, image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    if mode == "dp_lora":
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, noise_multiplier=1.0,
                                                  max_grad_norm=1.0, data_loader=_loader(batch, image_size),
                                                  poisson_sampling=False)
    train_mode(model)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.random((batch, 1, image_size, image_size), dtype=np.float32))
    y = torch.tensor(rng.integers(0, 2, batch))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {"backbone": backbone, "mode": mode, "image_size": image_size, "batch": batch,
            "trainable_params": sum(p.numel() for p in params), "seconds_per_step": seconds,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loader(batch: int, image_size: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.zeros(batch, 1, image_size, image_size), torch.zeros(batch, dtype=torch.long))
    return DataLoader(data, batch_size=batch)


def step_table(backbones: list[str], image_size: int, batch: int, steps: int, threads: int = 1,
               repeats: int = 3) -> list[dict[str, Any]]:
    """Every (backbone, mode), ``repeats`` times, each in its own process; the median run counts.

    Step times of one configuration vary by up to 30 % from one process to the next on a shared
    machine, so one process per row is not enough to compare modes. Modes take turns (lora,
    dp_lora, full, lora, ...) so a slow spell does not fall on one mode only.
    """
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for backbone in backbones:
            for _ in range(repeats):
                for mode in MODES:
                    row = pool.submit(measure, backbone, mode, image_size, batch, steps, threads).result()
                    runs.setdefault((backbone, mode), []).append(row)
                    print(f"[bench] {backbone} {mode}: {row['seconds_per_step']:.3f} s/step", flush=True)
    return median_rows(runs)


def median_rows(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (backbone, mode): its median run, every run's time, and the ratio to LoRA's median."""
    rows = []
    for (backbone, mode), measured in runs.items():
        times = sorted(r["seconds_per_step"] for r in measured)
        median = times[len(times) // 2]
        row = next(r for r in measured if r["seconds_per_step"] == median)
        rows.append({**row, "runs_seconds_per_step": [r["seconds_per_step"] for r in measured]})
    for backbone in {r["backbone"] for r in rows}:
        by_mode = {r["mode"]: r for r in rows if r["backbone"] == backbone}
        for r in by_mode.values():
            r["x_lora"] = r["seconds_per_step"] / by_mode["lora"]["seconds_per_step"]
    return rows
