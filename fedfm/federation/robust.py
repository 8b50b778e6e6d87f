"""Updates a site cannot blow up: a norm bound on each site's update at the server, and robust
aggregates (coordinate-wise median, trimmed mean) for sample-level DP runs.

A site's update is its adapter minus the round's global adapter. ``federation.update_clip_norm``
scales any update longer than the bound back to it (the direction is kept), before aggregation;
every clipped update is recorded with its norm. ``federation.aggregator: median`` takes each
coordinate's median over the sites, ``trimmed_mean`` drops the ``federation.trim_fraction`` largest
and smallest values of each coordinate and averages the rest (Yin et al., ICML 2018): one site
alone cannot move either by more than the honest sites' spread, whatever it sends.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedfm.federation.aggregate import Adapter, clip_update, update_norm
from fedfm.federation.replies import Reply


def update_length(adapter: Adapter, current: Adapter) -> float:
    """L2 norm of ``adapter - current`` over every tensor."""
    return update_norm([np.subtract(adapter[k].numpy(), current[k].numpy()) for k in adapter])


def bound_updates(replies: list[Reply], current: Adapter, norm: float) -> dict[str, float]:
    """Clip every reply's update to ``norm`` in place; returns site -> norm before clipping, for
    the sites that were clipped."""
    clipped: dict[str, float] = {}
    for reply in replies:
        length = update_length(reply.arrays, current)
        if length > norm:
            reply.arrays = clip_update(reply.arrays, current, norm)
            clipped[reply.site] = length
    return clipped


def coordinate_median(adapters: list[Adapter]) -> Adapter:
    """Each coordinate's median over the adapters (the mean of the middle two for an even count)."""
    return {key: torch.from_numpy(np.median(np.stack([a[key].numpy() for a in adapters]), axis=0)
                                  .astype(adapters[0][key].numpy().dtype)) for key in adapters[0]}


def trimmed_mean(adapters: list[Adapter], fraction: float) -> Adapter:
    """Each coordinate's mean after dropping the ``floor(fraction * n)`` largest and smallest values."""
    n = len(adapters)
    cut = math.floor(fraction * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trim fraction {fraction} leaves no site of {n} to average")
    out = {}
    for key in adapters[0]:
        values = np.sort(np.stack([a[key].numpy() for a in adapters]), axis=0)
        kept = values[cut:n - cut]
        out[key] = torch.from_numpy(kept.mean(axis=0).astype(values.dtype))
    return out


class RobustAggregate:
    """``median`` or ``trimmed_mean`` of the sites' adapters (unweighted: a site's weight is a claim
    it makes itself), after the optional norm bound."""

    def __init__(self, kind: str, trim_fraction: float = 0.2):
        if kind not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust aggregate {kind!r}")
        self.kind = kind
        self.trim_fraction = trim_fraction

    def aggregate(self, server_round: int, current: Adapter, replies: list[Reply]) -> Adapter | None:
        if not replies:
            return None
        adapters = [r.arrays for r in replies]
        return coordinate_median(adapters) if self.kind == "median" else trimmed_mean(adapters, self.trim_fraction)
