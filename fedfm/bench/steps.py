"""Seconds per training step and peak memory: DP-LoRA, LoRA and full fine-tuning, same model and data.

Modes: ``lora`` (no DP), ``dp_lora`` (fedfm's DP-SGD as training runs it: fused per-sample
gradients, ``privacy.grad_sampler: fused``), ``dp_lora_opacus`` (the same with Opacus' hooks,
``privacy.grad_sampler: opacus``) and ``full`` (every weight, no DP).

Two measurements. Each (backbone, mode) runs in fresh processes (spawned), so its peak resident
memory is its own; the median of the processes counts. And the ratios to LoRA are measured once
more with every mode's model in one process, taking turns, which removes the process-to-process
variation (up to 40 % here) from the comparison.
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any

MODES = ("lora", "dp_lora", "dp_lora_opacus", "full")
GRAD_SAMPLER = {"dp_lora": "fused", "dp_lora_opacus": "opacus"}


@contextmanager
def stepper(backbone: str, mode: str, image_size: int, batch: int) -> Iterator[tuple[Callable[[], None], int]]:
    """(one optimizer step of ``mode`` on a fixed random batch, trainable parameter count)."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedfm.config import LoraConfig, ModelConfig, PrivacyConfig
    from fedfm.models import ModelSpec, build_model
    from fedfm.models.lora import train_mode
    from fedfm.models.registry import build_backbone
    from fedfm.privacy.accountant import SiteAccountant
    from fedfm.training.local import private_training

    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone=backbone, pretrained=False)
    if mode == "full":
        model = build_backbone(model_cfg, 2, 1, image_size).model
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model, _ = build_model(ModelSpec(model_cfg, LoraConfig(r=8), 2, 1, image_size))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.random((batch, 1, image_size, image_size), dtype=np.float32))
    y = torch.tensor(rng.integers(0, 2, batch))
    loss_fn = nn.CrossEntropyLoss()

    @contextmanager
    def private() -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
        if mode not in GRAD_SAMPLER:
            yield model, optimizer
            return
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)  # sets the expected batch size
        privacy = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
                                grad_sampler=GRAD_SAMPLER[mode])
        with private_training(model, optimizer, loader, privacy, SiteAccountant("rdp"), 1.0) as (m, opt, _):
            yield m, opt

    # Opacus' hooks note that the frozen input layer needs no gradient; as in training, expected
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    with private() as (trained, opt):
        train_mode(trained)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(trained(x), y).backward()
            opt.step()

        yield step, sum(p.numel() for p in params)


def measure(backbone: str, mode: str, image_size: int, batch: int, steps: int, threads: int = 1) -> dict[str, Any]:
    """Time ``steps`` optimizer steps (after 2 warm-up steps) of ``mode`` in this process."""
    import torch

    torch.set_num_threads(threads)
    with stepper(backbone, mode, image_size, batch) as (step, trainable):
        for _ in range(2):
            step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - started) / steps
    return {"backbone": backbone, "mode": mode, "image_size": image_size, "batch": batch,
            "trainable_params": trainable, "seconds_per_step": seconds, "peak_rss_mb": peak_rss_mb()}


def interleaved(backbone: str, image_size: int, batch: int, steps: int, turns: int, threads: int = 1) -> dict[str, float]:
    """Median seconds per step of every mode, all built in this process and taking ``turns`` turns
    of ``steps`` steps each (after 2 warm-up steps), so a slow spell falls on every mode alike."""
    from contextlib import ExitStack

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with ExitStack() as stack:
        steps_of = {mode: stack.enter_context(stepper(backbone, mode, image_size, batch))[0] for mode in MODES}
        for step in steps_of.values():
            for _ in range(2):
                step()
        for _ in range(turns):
            for mode, step in steps_of.items():
                started = time.perf_counter()
                for _ in range(steps):
                    step()
                times[mode].append((time.perf_counter() - started) / steps)
    return {mode: float(np.median(t)) for mode, t in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_table(backbones: list[str], image_size: int, batch: int, steps: int, threads: int = 1,
               repeats: int = 3, turns: int = 5) -> list[dict[str, Any]]:
    """Every (backbone, mode), ``repeats`` times, each in its own process; the median run counts.
    Then, per backbone, one process with every mode taking ``turns`` turns: ``x_lora_interleaved``.

    Step times of one configuration vary by up to 40 % from one process to the next on a shared
    machine, so one process per row is not enough to compare modes. Modes take turns (lora,
    dp_lora, ..., lora, ...) so a slow spell does not fall on one mode only.
    """
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    together: dict[str, dict[str, float]] = {}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for backbone in backbones:
            for _ in range(repeats):
                for mode in MODES:
                    row = pool.submit(measure, backbone, mode, image_size, batch, steps, threads).result()
                    runs.setdefault((backbone, mode), []).append(row)
                    print(f"[bench] {backbone} {mode}: {row['seconds_per_step']:.3f} s/step", flush=True)
            together[backbone] = pool.submit(interleaved, backbone, image_size, batch,
                                             max(1, steps // 2), turns, threads).result()
            print(f"[bench] {backbone}, modes taking turns in one process: "
                  + ", ".join(f"{m} {t:.3f}" for m, t in together[backbone].items()), flush=True)
    rows = median_rows(runs)
    for row in rows:
        times = together[row["backbone"]]
        row["interleaved_seconds_per_step"] = times[row["mode"]]
        row["x_lora_interleaved"] = times[row["mode"]] / times["lora"]
    return rows


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
