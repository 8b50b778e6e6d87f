"""The model the server holds: the backbone with the run's initial global adapter
(what that is depends on the adaptation method, :mod:`fedfm.models.method`)."""

from __future__ import annotations

from torch import nn

from fedfm.config import ExperimentConfig
from fedfm.data import dataset_info
from fedfm.models import ModelSpec
from fedfm.models.method import AdapterMethod, adapter_method


def run_spec(config: ExperimentConfig) -> ModelSpec:
    """The run's model spec: the config's backbone and adapter, the data's classes, channels and dimensions."""
    info = dataset_info(config.data)
    return ModelSpec(config.model, config.lora, info.num_classes, info.channels, config.data.image_size,
                     info.spatial_dims)


def run_method(config: ExperimentConfig) -> AdapterMethod:
    return adapter_method(run_spec(config))


def build_global_model(config: ExperimentConfig) -> nn.Module:
    return run_method(config).global_model()
