"""The model the server holds: the backbone with the initial (seeded) LoRA adapter.

With per-site ranks (lora.site_ranks) it is the stacked global adapter instead: rank 1 with
B = 0 before the first round (see :mod:`fedfm.models.stacking`).
"""

from __future__ import annotations

from torch import nn

from fedfm.config import ExperimentConfig
from fedfm.data import dataset_info
from fedfm.models import ModelSpec, build_model
from fedfm.models import stacking


def build_global_model(config: ExperimentConfig) -> nn.Module:
    info = dataset_info(config.data)
    if config.lora.stacked:
        spec = ModelSpec(config.model, config.lora, info.num_classes, info.channels, config.data.image_size,
                         info.spatial_dims)
        return stacking.global_model(spec, stacking.initial_state(spec))
    model, _ = build_model(config.model, config.lora, info.num_classes, info.channels, config.data.image_size,
                           info.spatial_dims)
    return model
