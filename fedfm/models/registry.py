"""Backbone registry: a name in ``model.backbone`` -> a factory that builds a :class:`Backbone`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedfm.config import ConfigError, ModelConfig

HF_PREFIX = "hf:"
# Random parts of every backbone (random-init bases, new heads) are drawn from this seed, so the
# server and every site build bit-identical base weights without exchanging them.
BASE_SEED = 0

_BUILTIN_MODULES = ("fedfm.models.vit", "fedfm.models.efficientnet", "fedfm.models.hf", "fedfm.models.astra")


@dataclass
class Backbone:
    """A classifier ready for LoRA: ``model`` maps [0,1] images (N, C, S, S) (or, with
    ``spatial_dims=3``, volumes (N, C, S, S, S)) to logits (N, K)."""

    model: nn.Module
    name: str
    image_size: int  # the model's native input size (informational: the data layer resizes to data.image_size,
                     #   and a backbone that needs its own size, like hf:, resizes inside its forward)
    lora_targets: str  # default regex for peft ``target_modules``
    head: list[str]  # module names of the newly initialised classifier -> peft ``modules_to_save``
    spatial_dims: int = 2  # 2: images, 3: volumes


Factory = Callable[..., Backbone]
_FACTORIES: dict[str, Factory] = {}
_DIMS: dict[str, tuple[int, ...]] = {}
_CHECKS: dict[str, Callable[[ModelConfig], None]] = {}


def register_backbone(name: str, spatial_dims: tuple[int, ...] = (2,),
                      check: Callable[[ModelConfig], None] | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(model_cfg, num_classes, in_channels, image_size)`` under ``name``.

    A backbone that also takes volumes declares ``spatial_dims=(2, 3)``; its factory then gets a
    ``spatial_dims`` keyword. ``check(model_cfg)`` raises ConfigError when what the backbone needs
    (its weights) is missing; :func:`check_backbone` runs it before a run starts.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"backbone '{name}' is registered twice")
        _FACTORIES[name] = factory
        _DIMS[name] = tuple(spatial_dims)
        if check is not None:
            _CHECKS[name] = check
        return factory

    return decorate


def check_backbone(model_cfg: ModelConfig, spatial_dims: int = 2) -> None:
    """Fail now, in one line, if ``model.backbone`` is unknown, cannot take the data's dimensions, or
    lacks what it loads (e.g. astra-ct without its weights); cheap: builds nothing."""
    _import_builtins()
    name = model_cfg.backbone
    key = HF_PREFIX if name.startswith(HF_PREFIX) else name
    if key not in _FACTORIES:
        raise ConfigError(
            f"model.backbone={name!r} is not a known backbone; available: {', '.join(available_backbones())}"
        )
    if spatial_dims not in _DIMS[key]:
        takes = [n for n, d in sorted(_DIMS.items()) if spatial_dims in d and n != HF_PREFIX]
        raise ConfigError(f"model.backbone={name!r} takes 2D images only but the data is {spatial_dims}D: "
                          f"use a backbone that takes volumes ({', '.join(takes)})")
    if key in _CHECKS:
        _CHECKS[key](model_cfg)


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_backbones() -> list[str]:
    """Registered names, sorted; ``hf:<hub-id-or-dir>`` stands for any HF vision encoder."""
    _import_builtins()
    return sorted(n for n in _FACTORIES if n != HF_PREFIX) + [f"{HF_PREFIX}<hub-id-or-dir>"]


def build_backbone(model_cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int,
                   spatial_dims: int = 2) -> Backbone:
    """Build the backbone named by ``model_cfg.backbone`` with seeded, reproducible random parts."""
    _import_builtins()
    name = model_cfg.backbone
    key = HF_PREFIX if name.startswith(HF_PREFIX) else name
    if key not in _FACTORIES or spatial_dims not in _DIMS[key]:
        check_backbone(model_cfg, spatial_dims)  # raises the one-line error
    extra = {"spatial_dims": spatial_dims} if _DIMS[key] != (2,) else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        return _FACTORIES[key](model_cfg, num_classes, in_channels, image_size, **extra)
