"""Gradient canaries for the one-run empirical audit of a site's DP-SGD.

Each canary is an extra training record whose per-sample gradient is a spike of norm
``max_grad_norm`` on one adapter coordinate (a "Dirac" canary, white-box threat model: the
auditor sees the released adapter). Each canary is included with probability 1/2; an included
canary is Poisson-sampled into every step with the site's sampling rate, exactly like an image,
so the DP guarantee covers it. After training, a canary's score is how far its coordinate moved
against its gradient: included canaries should score higher than excluded ones only as much as
the claimed epsilon allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn


@dataclass
class GradientCanaries:
    names: list[str]  # trainable parameters, in the optimizer's order
    param_index: np.ndarray  # (m,) which parameter each canary lives in
    flat_index: np.ndarray  # (m,) which coordinate of that parameter
    included: np.ndarray  # (m,) bool: drawn S_i = +1
    norm: float
    generator: torch.Generator

    @classmethod
    def plant(cls, model: nn.Module, m: int, norm: float, seed: int) -> "GradientCanaries":
        """Pick ``m`` distinct trainable coordinates and each canary's membership, from ``seed``."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sizes = np.array([p.numel() for _, p in params])
        if m > sizes.sum():
            raise ValueError(f"{m} canaries need {m} trainable coordinates; the adapter has {sizes.sum()}")
        rng = np.random.default_rng(seed)
        flat = rng.choice(int(sizes.sum()), size=m, replace=False)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        param_index = np.searchsorted(offsets, flat, side="right") - 1
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return cls([n for n, _ in params], param_index, flat - offsets[param_index],
                   rng.random(m) < 0.5, norm, generator)

    def install(self, optimizer: DPOptimizer, sample_rate: float) -> None:
        """Add the sampled included canaries' gradients to every clipping step of ``optimizer``.

        Assumes one physical batch per logical batch (no BatchMemoryManager splitting).
        """
        original = optimizer.clip_and_accumulate
        members = np.flatnonzero(self.included)

        def clip_and_accumulate_with_canaries() -> None:
            drawn = members[(torch.rand(len(members), generator=self.generator) < sample_rate).numpy()]
            for index, p in enumerate(optimizer.params):
                rows = torch.zeros((len(drawn), p.numel()), dtype=p.dtype)
                mine = self.param_index[drawn] == index
                rows[np.flatnonzero(mine), self.flat_index[drawn][mine]] = self.norm
                flat = optimizer._get_flat_grad_sample(p)
                p.grad_sample = torch.cat([flat, rows.view(len(drawn), *p.shape).to(flat.device)])
            original()

        optimizer.clip_and_accumulate = clip_and_accumulate_with_canaries

    def scores(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> np.ndarray:
        """How far each canary's coordinate moved against its (positive) gradient."""
        out = np.empty(len(self.included))
        for i, (p, j) in enumerate(zip(self.param_index, self.flat_index)):
            name = self.names[p]
            out[i] = float(before[name].reshape(-1)[j] - after[name].reshape(-1)[j])
        return out
