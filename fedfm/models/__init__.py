"""Backbones (registry of factories) and LoRA adapters on them; no Flower imports."""

from fedfm.models.lora import (
    adapter_state_dict,
    apply_lora,
    build_model,
    count_parameters,
    freeze_norm_layers,
    full_model_bytes,
    is_exchanged,
    load_adapter_state_dict,
    lora_variant,
    save_adapter,
    state_bytes,
    train_mode,
    unwrap,
)
from fedfm.models.cache import clear_model_cache
from fedfm.models.registry import (
    Backbone,
    available_backbones,
    build_backbone,
    register_backbone,
)
from fedfm.models.spec import ModelSpec, read_spec

__all__ = [
    "Backbone",
    "ModelSpec",
    "adapter_state_dict",
    "apply_lora",
    "available_backbones",
    "build_backbone",
    "build_model",
    "clear_model_cache",
    "count_parameters",
    "freeze_norm_layers",
    "full_model_bytes",
    "is_exchanged",
    "load_adapter_state_dict",
    "lora_variant",
    "read_spec",
    "register_backbone",
    "save_adapter",
    "state_bytes",
    "train_mode",
    "unwrap",
]
