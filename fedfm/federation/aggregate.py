"""How a round's adapters become the next global adapter.

Each aggregator takes the round's global adapter and the screened replies (fp32, sorted by site)
and returns the new global adapter, or None when the round releases nothing:

- :class:`CombineByMethod`: what the adaptation method does (``fedfm.models.method``): the
  average weighted by each site's training images, or the exact stacking of per-site ranks;
- ``fedfm.federation.client_dp.ClientLevelDP``: clipped, equally weighted, Gaussian noise.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from fedfm.federation.replies import Reply
from fedfm.models.method import AdapterMethod
from fedfm.protocol import NUM_EXAMPLES

Adapter = dict[str, torch.Tensor]


class Aggregator(Protocol):
    def aggregate(self, server_round: int, current: Adapter, replies: list[Reply]) -> Adapter | None: ...


class CombineByMethod:
    """FedAvg or FLoRA stacking: whatever the run's adaptation method combines, weighted by the
    sites' training images."""

    def __init__(self, method: AdapterMethod, weight_key: str = NUM_EXAMPLES):
        self.method = method
        self.weight_key = weight_key

    def aggregate(self, server_round: int, current: Adapter, replies: list[Reply]) -> Adapter | None:
        if not replies:
            return None
        return self.method.combine(current, [(r.arrays, float(r.metrics[self.weight_key])) for r in replies])


def update_norm(arrays: list[np.ndarray]) -> float:
    """L2 norm of all arrays flattened together (computed per array, then combined)."""
    norms = [np.linalg.norm(a.flat) for a in arrays]
    return float(np.sqrt(sum(n**2 for n in norms)))


def clip_update(adapter: Adapter, current: Adapter, clipping_norm: float) -> Adapter:
    """``current + (adapter - current) * min(1, C / ||adapter - current||)``: the site's update
    scaled to norm at most ``clipping_norm`` (FlatClip, McMahan et al. 2018)."""
    keys = list(adapter)
    update = [np.subtract(adapter[k].numpy(), current[k].numpy()) for k in keys]
    norm = update_norm(update)
    factor = min(1, clipping_norm / norm) if norm > 0 else 1  # an unchanged adapter needs no scaling
    for array in update:
        array *= factor
    return {k: torch.from_numpy(np.asarray(current[k].numpy() + u)) for k, u in zip(keys, update, strict=True)}


def add_gaussian_noise(adapter: Adapter, std: float, rng: np.random.Generator) -> Adapter:
    """Each entry plus independent N(0, std^2) noise, in the adapter's dtype."""
    out = {}
    for key, tensor in adapter.items():
        values = tensor.numpy().copy()
        values += rng.normal(0.0, std, values.shape).astype(values.dtype)
        out[key] = torch.from_numpy(values)
    return out

