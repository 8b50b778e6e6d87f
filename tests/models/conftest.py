"""Shared fixtures for the model tests: small configs, tiny HF folders, determinism helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

def tiny_hf_dir(root: Path, kind: str) -> Path:
    """save_pretrained a randomly initialised tiny ViTModel or Dinov2Model (hidden 32, 2 layers, 32 px)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    cfg_cls, model_cls = {"vit": (ViTConfig, ViTModel), "dinov2": (Dinov2Config, Dinov2Model)}[kind]
    config = cfg_cls(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_channels=3,
    )
    torch.manual_seed(123)  # not fedfm.models.registry.BASE_SEED, so random re-init differs
    out = root / kind
    model_cls(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: tiny_hf_dir(root, kind) for kind in ("vit", "dinov2")}


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout p=0 and EfficientNet drop-connect off, so batch and one-sample passes are comparable."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        params = getattr(module, "_global_params", None)
        if params is not None and hasattr(params, "drop_connect_rate"):
            module._global_params = params._replace(drop_connect_rate=0.0)
    return model


def randomize_lora_b(model: nn.Module, seed: int = 1) -> nn.Module:
    """lora_B starts at zero; give it values so gradients reach lora_A and outputs depend on it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(name="disable_dropout")
def _disable_dropout_fixture():
    return disable_dropout


@pytest.fixture(name="randomize_lora_b")
def _randomize_lora_b_fixture():
    return randomize_lora_b


# test name -> (backbone string or hf folder kind, image size)
BACKBONES = {"vit-tiny": 32, "efficientnet-lite0": 32, "hf-vit": 32, "hf-dinov2": 32}


@pytest.fixture
def build(hf_dirs):
    """build(name, **lora_fields) -> (peft model, backbone) via fedfm.models.build_model (1 gray channel, 2 classes)."""
    from fedfm.config import LoraConfig, ModelConfig
    from fedfm.models import ModelSpec, build_model

    def _build(name: str, num_classes: int = 2, **lora_fields: object):
        backbone = f"hf:{hf_dirs[name[3:]]}" if name.startswith("hf-") else name
        lora = LoraConfig(**{"r": 4, **lora_fields})
        return build_model(ModelSpec(ModelConfig(backbone=backbone), lora, num_classes, 1, BACKBONES[name]))

    return _build
