"""The model the server holds: the backbone with the initial (seeded) LoRA adapter."""

from __future__ import annotations

from torch import nn

from fedfm.config import ExperimentConfig
from fedfm.data import dataset_info
from fedfm.models import build_model


def build_global_model(config: ExperimentConfig) -> nn.Module:
    info = dataset_info(config.data)
    model, _ = build_model(config.model, config.lora, info.num_classes, info.channels, config.data.image_size)
    return model
