"""Bytes one site sends per round, counted from the real tensors of each configuration.

For every backbone: standard LoRA, FFA-LoRA (only B and the head), LoRA sent as fp16, and the
whole model (what FedAvg of a fully fine-tuned model moves). The ViT-Base-sized configuration is a
randomly initialised Hugging Face ViT (hidden 768, 12 layers, 224 px, patch 16) built from a
config written to a temporary folder and loaded through ``hf:<dir>``, the path real checkpoints take.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

VIT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "image_size": 224, "patch_size": 16, "num_channels": 3}


def _bytes(model, fp16: bool = False) -> int:
    from fedfm.models import adapter_state_dict

    state = adapter_state_dict(model)
    return sum(t.numel() * (2 if fp16 else t.element_size()) for t in state.values())


def update_bytes(backbone: str, image_size: int, channels: int = 1, r: int = 8) -> dict[str, Any]:
    from fedfm.config import LoraConfig, ModelConfig
    from fedfm.models import ModelSpec, build_model, state_bytes
    from fedfm.models.registry import build_backbone

    model_cfg = ModelConfig(backbone=backbone, pretrained=False)
    lora, _ = build_model(ModelSpec(model_cfg, LoraConfig(r=r), 2, channels, image_size))
    ffa, _ = build_model(ModelSpec(model_cfg, LoraConfig(r=r, variant="ffa"), 2, channels, image_size))
    full = state_bytes(build_backbone(model_cfg, 2, channels, image_size).model.state_dict())
    row = {"backbone": backbone, "r": r, "full_model": full, "lora": _bytes(lora), "ffa": _bytes(ffa),
           "lora_fp16": _bytes(lora, fp16=True), "ffa_fp16": _bytes(ffa, fp16=True)}
    for key in ("lora", "ffa", "lora_fp16", "ffa_fp16"):
        row[f"{key}_fraction"] = row[key] / full
    return row


def vit_base_dir(root: Path) -> Path:
    from transformers import ViTConfig

    folder = root / "vit-base-sized"
    ViTConfig(**VIT_BASE).save_pretrained(str(folder))
    return folder


def comm_table(image_size: int, r: int = 8) -> list[dict[str, Any]]:
    rows = [update_bytes("vit-tiny", image_size, r=r), update_bytes("efficientnet-lite0", image_size, r=r)]
    with tempfile.TemporaryDirectory() as tmp:
        row = update_bytes(f"hf:{vit_base_dir(Path(tmp))}", 224, channels=3, r=r)
        row["backbone"] = "ViT-Base-sized (hf, 86M)"
        rows.append(row)
    return rows
