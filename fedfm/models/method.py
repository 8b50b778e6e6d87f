"""How a run adapts the backbone and combines the sites' adapters, as one object.

:func:`adapter_method` reads it from the run's :class:`ModelSpec`:

- :class:`SharedAdapter` (``lora.variant`` lora / ffa / head): every site trains the same
  adapter; the next global adapter is the sites' adapters averaged by weight.
- :class:`StackedRanks` (``lora.site_ranks``): each site trains its own rank on top of the global
  adapter merged into the base weights; the next global adapter stacks the sites' factors
  exactly (FLoRA, :mod:`fedfm.models.stacking`).

Either knows which tensors are a site's own (``lora.personal``), how to build the server's and a
site's model, how to combine updates, what a site's update must look like, and the spec the
global adapter is saved with. Callers never branch on the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedfm.config import LoraConfig
from fedfm.models.lora import adapter_state_dict, build_model, load_adapter_state_dict
from fedfm.models.spec import ModelSpec
from fedfm.models.stacking import LORA_A, LORA_B, global_lora_config, global_model, initial_state, site_model, stack

Adapter = dict[str, torch.Tensor]


def is_personal(key: str, mode: str) -> bool:
    """Whether adapter key ``key`` is personal under ``lora.personal=mode``."""
    if mode == "head":
        return "lora_" not in key
    if mode == "lora_B":
        return ".lora_B." in key
    return False


def weighted_average(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """``sum_k (w_k / sum w) adapter_k``, accumulated in numpy in the order given and in the
    adapters' dtype: the arithmetic of Flower's FedAvg, so results carry over to the digit."""
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        factor = weight / total
        for key, tensor in adapter.items():
            if key in out:
                out[key] += tensor.numpy() * factor
            else:
                out[key] = tensor.numpy() * factor
    return {key: torch.from_numpy(np.asarray(value)) for key, value in out.items()}


class AdapterMethod(ABC):
    """The run's adaptation method; ``spec`` is the run's model spec (site ranks included)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @abstractmethod
    def global_model(self, state: Adapter | None = None) -> nn.Module:
        """The server's model holding ``state`` (the initial global adapter when None)."""

    def initial_state(self) -> Adapter:
        """The global adapter before the first round."""
        return adapter_state_dict(self.global_model())

    @abstractmethod
    def site_model(self, site: str, state: Adapter) -> nn.Module:
        """What ``site`` trains or evaluates, starting from the global adapter ``state``."""

    @abstractmethod
    def combine(self, state: Adapter, updates: list[tuple[Adapter, float]]) -> Adapter:
        """The next global adapter from the round's global ``state`` and the sites' (adapter, weight)."""

    def update_problem(self, site: str, update: Adapter) -> str | None:
        """Why ``site``'s update does not fit this method (beyond the keys the server sent), or None."""
        return None

    @property
    def saved_spec(self) -> ModelSpec:
        """The spec of the global adapter as a run folder saves it."""
        return self.spec

    @property
    def update_size_varies(self) -> bool:
        """Whether sites send updates of different sizes (the report then averages upload bytes)."""
        return update_size_varies(self.spec.lora)

    def is_personal(self, key: str) -> bool:
        """Whether adapter tensor ``key`` is a site's own (``lora.personal``)."""
        return is_personal(key, self.spec.lora.personal)


class SharedAdapter(AdapterMethod):
    """Every site trains the same seeded adapter (LoRA, FFA-LoRA or head only); FedAvg combines."""

    def global_model(self, state: Adapter | None = None) -> nn.Module:
        model, _ = build_model(self.spec)
        if state is not None:
            load_adapter_state_dict(model, state)
        return model

    def site_model(self, site: str, state: Adapter) -> nn.Module:
        return self.global_model(state)

    def combine(self, state: Adapter, updates: list[tuple[Adapter, float]]) -> Adapter:
        return weighted_average([u for u, _ in updates], [w for _, w in updates])


class StackedRanks(AdapterMethod):
    """Per-site LoRA ranks (``lora.site_ranks``), stacked exactly whatever the ranks."""

    def global_model(self, state: Adapter | None = None) -> nn.Module:
        return global_model(self.spec, initial_state(self.spec) if state is None else state)

    def initial_state(self) -> Adapter:
        return initial_state(self.spec)

    def site_model(self, site: str, state: Adapter) -> nn.Module:
        return site_model(self.spec, self.spec.lora.rank_for(site), state)

    def combine(self, state: Adapter, updates: list[tuple[Adapter, float]]) -> Adapter:
        return stack(state, updates, self.spec.lora.alpha, self.spec.lora.stack_max_rank)

    def update_problem(self, site: str, update: Adapter) -> str | None:
        rank = self.spec.lora.rank_for(site)
        for key, a in update.items():
            if key.endswith(LORA_A):
                b = update[key[: -len(LORA_A)] + LORA_B]
                if a.shape[0] != rank or b.shape[1] != rank:
                    return f"{key} has rank {a.shape[0]} (B: {b.shape[1]}), but lora.site_ranks gives {site} rank {rank}"
        return None

    @property
    def saved_spec(self) -> ModelSpec:
        return replace(self.spec, lora=global_lora_config(self.spec.lora))


def update_size_varies(lora: LoraConfig) -> bool:
    """Whether the method ``lora`` selects has sites send updates of different sizes (their own ranks)."""
    return lora.stacked


def adapter_method(spec: ModelSpec) -> AdapterMethod:
    """The method ``spec`` asks for: per-site ranks stack, everything else is shared and averaged."""
    return StackedRanks(spec) if spec.lora.stacked else SharedAdapter(spec)
