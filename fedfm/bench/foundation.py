"""What adapting the CT foundation model (``astra-ct``) costs, beside ``efficientnet-lite0``.

- Steps: seconds per optimizer step of LoRA and DP-LoRA (fused per-sample gradients) with and
  without the frozen-prefix activation cache, with the published weights, each configuration in
  its own process (peak memory is its own); with the cache, the prefix is computed once for the
  batch before timing and its cost per image is reported apart.
- Round: one site's DP round as a site runs it (:class:`fedfm.site.Site`, real data when a
  config points at it), with the cache (built in a first round, reported apart) and without.
- Bytes: one site update (adapter + head, fp32) against the full 117.5 M-parameter 3D encoder.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fedfm.bench.steps import peak_rss_mb
from fedfm.protocol import CACHE_BUILD_SECONDS, CACHE_BYTES, STEPS, TRAIN_SECONDS


def measure_step(backbone: str, image_size: int, batch: int, dp: bool, cached: bool, steps: int) -> dict[str, Any]:
    """Median seconds per step over ``steps`` steps (after 2 warm-up steps) of one configuration."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedfm.config import LoraConfig, ModelConfig, PrivacyConfig
    from fedfm.models import ModelSpec, build_model, count_parameters, train_mode
    from fedfm.models.stages import model_stages, run_stages
    from fedfm.privacy.accountant import SiteAccountant
    from fedfm.training.activation_cache import SuffixModel, prefix_length
    from fedfm.training.local import private_training

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = build_model(ModelSpec(ModelConfig(backbone=backbone), LoraConfig(r=8), 2, 1, image_size))
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.random((batch, 1, image_size, image_size), dtype=np.float32))
    y = torch.tensor(rng.integers(0, 2, batch))
    trained, prefix_s_per_image, length = model, None, prefix_length(model)
    if cached:
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            x = run_stages(model_stages(model)[:length], x)
        prefix_s_per_image = (time.perf_counter() - started) / batch
        trained = SuffixModel(model, length)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def run(module, opt) -> float:
        train_mode(module)
        times = []
        for i in range(steps + 2):
            started = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(module(x), y).backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - started)
        return float(np.median(times))

    if dp:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        privacy = PrivacyConfig(noise_multiplier=1.0, accountant="rdp", grad_sampler="fused")
        with private_training(trained, optimizer, loader, privacy, SiteAccountant("rdp"), 1.0) as (m, opt, _):
            seconds = run(m, opt)
    else:
        seconds = run(trained, optimizer)
    trainable, total = count_parameters(model)
    return {"backbone": backbone, "mode": ("dp_lora" if dp else "lora") + (" + cache" if cached else ""),
            "image_size": image_size, "batch": batch, "trainable_params": trainable, "total_params": total,
            "cached_stages": length if cached else 0, "seconds_per_step": seconds,
            "prefix_seconds_per_image": prefix_s_per_image, "peak_rss_mb": peak_rss_mb()}


def step_rows(image_size: int, batch: int, steps: int) -> list[dict[str, Any]]:
    configs = [("astra-ct", dp, cached) for dp in (False, True) for cached in (False, True)]
    configs += [("efficientnet-lite0", True, False), ("efficientnet-lite0", True, True)]
    rows = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for backbone, dp, cached in configs:
            row = pool.submit(measure_step, backbone, image_size, batch, dp, cached, steps).result()
            rows.append(row)
            print(f"[bench] {backbone} {row['mode']}: {row['seconds_per_step']:.3f} s/step", flush=True)
    return rows


def site_round(config_path: str, backbone: str, cached: bool, overrides: list[str], out: Path) -> dict[str, Any]:
    """Two DP rounds of site 0 (``Site.train``) of ``config_path`` with ``backbone``: the first builds
    the cache (when on), the second is what every later round costs."""
    import torch

    from fedfm.config import load_config
    from fedfm.models import ModelSpec, adapter_state_dict, build_model
    from fedfm.site import Site

    torch.set_num_threads(1)
    config = load_config(config_path, [f"model.backbone={backbone}", f"train.activation_cache={str(cached).lower()}",
                                       *overrides])
    folder = out / f"{backbone}-{'cache' if cached else 'nocache'}"
    site = Site(config, 0, folder)
    model, _ = build_model(ModelSpec(config.model, config.lora, site.data.num_classes, site.data.channels,
                           config.data.image_size, site.data.spatial_dims))
    state = adapter_state_dict(model)
    first = site.train(state, 1).metrics
    started = time.perf_counter()  # a later round as a ClientApp runs it: a new Site, the cache found on disk
    second = Site(config, 0, folder).train(state, 2).metrics
    wall = time.perf_counter() - started
    return {"backbone": backbone, "cache": cached, "image_size": config.data.image_size,
            "n_train": len(site.data.train), "steps": second[STEPS],
            "first_round_train_s": first[TRAIN_SECONDS], "round_train_s": second[TRAIN_SECONDS],
            "round_wall_s": wall,
            "cache_build_s": first.get(CACHE_BUILD_SECONDS, 0.0), "cache_mb": first.get(CACHE_BYTES, 0) / 1e6,
            "peak_rss_mb": peak_rss_mb()}


def round_rows(config_path: str, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    rows = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for backbone, cached in (("astra-ct", True), ("astra-ct", False), ("efficientnet-lite0", True),
                                 ("efficientnet-lite0", False)):
            row = pool.submit(site_round, config_path, backbone, cached, overrides, out).result()
            rows.append(row)
            print(f"[bench] {backbone} DP round, cache {cached}: {row['round_train_s']:.1f} s "
                  f"(cache build {row['cache_build_s']:.1f} s)", flush=True)
    return rows


def bytes_row(image_size: int) -> dict[str, Any]:
    from fedfm.config import LoraConfig, ModelConfig
    from fedfm.models import ModelSpec, adapter_state_dict, build_model, state_bytes
    from fedfm.models.astra import ENCODER_PARAMETERS

    model, _ = build_model(ModelSpec(ModelConfig(backbone="astra-ct"), LoraConfig(r=8), 2, 1, image_size))
    update = state_bytes(adapter_state_dict(model))
    full = ENCODER_PARAMETERS * 4
    return {"backbone": "astra-ct", "update_bytes": update, "full_3d_fp32_bytes": full, "fraction": update / full}
