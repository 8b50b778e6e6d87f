"""``fedfm bench [--quick] [--out DIR]``: the three costs users compare, measured in one sitting.

1. DP overhead: seconds per step of DP-LoRA (fedfm's fused per-sample gradients, and Opacus' hooks),
   LoRA and full fine-tuning (and peak memory), per backbone.
2. Communication: bytes of one site update (LoRA, FFA-LoRA, fp16) against the full model.
3. Simulation scale: wall time per round and peak memory for 10, 50 and 100 virtual sites.
4. Deployment: one round with 3 local SuperNodes, split into start-up, compute and the rest.
5. Foundation model: ``astra-ct`` LoRA and DP-LoRA steps with and without the
   frozen-prefix activation cache, one site's DP round on PneumoniaMNIST against
   ``efficientnet-lite0``, and bytes per update against the full 3D encoder.

Prints a table per part and writes ``bench.json`` (with the machine's description).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

PARTS = ("steps", "comm", "scale", "deploy", "foundation")
PNEUMONIA = Path(__file__).resolve().parents[2] / "configs" / "pneumonia-astra.yaml"


def machine() -> dict[str, Any]:
    import psutil
    import torch

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def run_bench(out: Path, quick: bool = False, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "bench.json").write_text(json.dumps(report, indent=2))

    if "comm" in parts:
        from fedfm.bench.comm import comm_table

        report["comm"] = comm_table(image_size=32)
        save()
    if "steps" in parts:
        from fedfm.bench.steps import step_table

        report["steps"] = step_table(["vit-tiny", "efficientnet-lite0"], image_size=32, batch=32 if quick else 64,
                                     steps=3 if quick else 10, repeats=1 if quick else 3, turns=2 if quick else 5)
        save()
    if "scale" in parts:
        from fedfm.bench.scale import simulate_scale

        report["scale"] = []
        for sites in ((10, 20) if quick else (10, 50, 100)):
            report["scale"].append(simulate_scale(sites, rounds=2))
            print(f"[bench] simulation {sites} sites: {report['scale'][-1]['later_round_s']:.1f} s/round, "
                  f"peak {report['scale'][-1]['peak_rss_gib']:.2f} GiB", flush=True)
            save()
    if "deploy" in parts:
        from fedfm.bench.deploy_latency import deployment_rounds

        report["deploy"] = deployment_rounds(3)
        save()
    if "foundation" in parts:
        from fedfm.bench import foundation

        report["foundation"] = {"bytes": foundation.bytes_row(32)}
        report["foundation"]["steps"] = foundation.step_rows(32, 32 if quick else 64, 3 if quick else 10)
        save()
        overrides = ["data.image_size=32"] + (["data.samples_per_site=60"] if quick else [])
        report["foundation"]["rounds"] = foundation.round_rows(str(PNEUMONIA), overrides, out / "foundation-sites")
        save()
    return report


def tables(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what ``fedfm bench`` prints and BENCHMARKS.md holds)."""
    out = [f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['memory_gib']} GiB, "
           f"CUDA {report['machine']['cuda']}, torch {report['machine']['torch']}"]
    if "steps" in report:
        out += ["", "| backbone | mode | trainable params | s / step (median) | every run | x LoRA | "
                "s / step, modes taking turns | x LoRA, modes taking turns | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['backbone']} | {r['mode']} | {r['trainable_params']:,} | {r['seconds_per_step']:.3f} | "
                f"{' '.join(f'{t:.3f}' for t in r.get('runs_seconds_per_step', [r['seconds_per_step']]))} | "
                f"{r['x_lora']:.2f} | {r.get('interleaved_seconds_per_step', float('nan')):.3f} | "
                f"{r.get('x_lora_interleaved', float('nan')):.2f} | {r['peak_rss_mb']:.0f} |" for r in report["steps"]]
    if "comm" in report:
        out += ["", "| backbone | full model | LoRA | FFA-LoRA | LoRA fp16 | FFA fp16 | LoRA / full | FFA fp16 / full |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['backbone']} | {r['full_model']:,} | {r['lora']:,} | {r['ffa']:,} | {r['lora_fp16']:,} | "
                f"{r['ffa_fp16']:,} | 1/{1 / r['lora_fraction']:.0f} | 1/{1 / r['ffa_fp16_fraction']:.0f} |"
                for r in report["comm"]]
    if "scale" in report:
        out += ["", "| virtual sites | sampled / round | first round s | later rounds s | peak memory GiB | wall s |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['sites']} | {r['sampled_per_round']} | {r['first_round_s']:.1f} | {r['later_round_s']:.1f} | "
                f"{r['peak_rss_gib']:.2f} | {r['wall_s']:.0f} |" for r in report["scale"]]
    if "foundation" in report:
        out += foundation_tables(report["foundation"])
    if "deploy" in report:
        from fedfm.bench.deploy_latency import deploy_table

        out += deploy_table(report["deploy"])
    return "\n".join(out)


def foundation_tables(f: dict[str, Any]) -> list[str]:
    out = []
    if "steps" in f:
        out += ["", "| backbone | mode | trainable / total params | cached stages | s / step | "
                "prefix s / image (once) | peak RSS MB |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['backbone']} | {r['mode']} | {r['trainable_params']:,} / {r['total_params']:,} | "
                f"{r['cached_stages']} | {r['seconds_per_step']:.3f} | "
                f"{'-' if r['prefix_seconds_per_image'] is None else format(r['prefix_seconds_per_image'], '.4f')} | "
                f"{r['peak_rss_mb']:.0f} |" for r in f["steps"]]
    if "rounds" in f:
        out += ["", "| backbone | activation cache | site train images | steps | DP round s (train) | "
                "later round s (wall, new process state) | cache build s (once) | cache MB | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['backbone']} | {'on' if r['cache'] else 'off'} | {r['n_train']} | {r['steps']} | "
                f"{r['round_train_s']:.1f} | {r['round_wall_s']:.1f} | {r['cache_build_s']:.1f} | {r['cache_mb']:.1f} | "
                f"{r['peak_rss_mb']:.0f} |" for r in f["rounds"]]
    if "bytes" in f:
        b = f["bytes"]
        out += ["", "| backbone | one site update (fp32) | full 3D encoder (fp32) | update / full |", "|---|---|---|---|",
                f"| {b['backbone']} | {b['update_bytes']:,} | {b['full_3d_fp32_bytes']:,} | 1/{1 / b['fraction']:.0f} |"]
    return out
