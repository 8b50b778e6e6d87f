"""Per-site LoRA ranks, aggregated exactly by stacking (FLoRA, Wang et al., NeurIPS 2024).

Site k trains a fresh rank-r_k adapter (A_k, B_k at scale s_k = alpha / r_k) on top of the
global model. The round's global update is ``sum_k p_k s_k B_k A_k`` (p_k: the site's share of
the round's training images). Stacking the A_k as rows and the p_k s_k B_k as columns gives one
pair of factors whose product is exactly that sum, whatever the ranks; averaging A and B
separately (what FedAvg does) would not be.

The global adapter is a peft adapter with one rank per layer at scale 1: every round's stacked
factors, appended. A layer whose rank outgrows ``min(out, in)`` is recompressed by an SVD of its
product to that rank, which keeps it exact up to float rounding. Sites merge the global adapter
into their frozen base weights (peft's merge) and train their own rank on top, so a site sends
only its own A_k, B_k and the head; the server sends the stacked factors.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from torch import nn

from fedfm.config import LoraConfig
from fedfm.models.cache import fresh
from fedfm.models.lora import adapter_state_dict, apply_lora, load_adapter_state_dict
from fedfm.models.registry import Backbone, build_backbone
from fedfm.models.spec import SPEC_ATTR, ModelSpec

PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


def layer_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module name (in the backbone) -> rank of its adapter in ``state``."""
    return {key[len(PREFIX):-len(LORA_A)]: int(t.shape[0]) for key, t in state.items() if key.endswith(LORA_A)}


def global_lora_config(lora_cfg: LoraConfig) -> LoraConfig:
    """The global adapter's settings: scale 1 (alpha = rank), no dropout, ranks set per layer."""
    return lora_cfg.model_copy(update={"r": 1, "alpha": 1.0, "dropout": 0.0, "site_ranks": {}, "personal": "none"})


def pristine_backbone(spec: ModelSpec) -> Backbone:
    """A fresh copy of ``spec``'s backbone without an adapter (:mod:`fedfm.models.cache`)."""
    key = json.dumps([spec.model.model_dump(), spec.num_classes, spec.channels, spec.image_size, spec.spatial_dims])
    return fresh("backbone", key, lambda: build_backbone(spec.model, spec.num_classes, spec.channels, spec.image_size,
                                                         spec.spatial_dims))


def global_model(spec: ModelSpec, state: dict[str, torch.Tensor], backbone: Backbone | None = None) -> nn.Module:
    """The global model: backbone + a scale-1 adapter with the ranks in ``state``, loaded from it.

    ``backbone`` (a pristine copy, wrapped in place) saves a copy when the caller has one.
    """
    backbone = backbone or pristine_backbone(spec)
    config = global_lora_config(spec.lora)
    model = apply_lora(backbone, config, ranks=layer_ranks(state))
    setattr(model, SPEC_ATTR, replace(spec, lora=config))
    load_adapter_state_dict(model, state)
    return model


def initial_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The global adapter before any round: rank 1 per layer with B = 0 (no change to the backbone)."""
    backbone = pristine_backbone(spec)
    return adapter_state_dict(apply_lora(backbone, global_lora_config(spec.lora)))


def site_model(spec: ModelSpec, rank: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """What a site trains: the global adapter merged into the base weights, plus a fresh rank-``rank``
    adapter (seeded A, B = 0) and the global head, ready to train."""
    backbone = pristine_backbone(spec)
    merged = global_model(spec, state, backbone).merge_and_unload()
    site_cfg = spec.lora.model_copy(update={"r": rank})
    model = apply_lora(replace(backbone, model=merged), site_cfg)
    setattr(model, SPEC_ATTR, replace(spec, lora=site_cfg))
    return model


def stack(
    global_state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], float]], alpha: float,
    max_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """The next global adapter from the sites' trained adapters and their weights.

    Each layer's factors become ``[A_g; A_1; ...; A_K]`` and ``[B_g, w_1 s_1 B_1, ..., w_K s_K B_K]``
    (w_k = weight_k / sum of weights, s_k = alpha / r_k), so B @ A = B_g @ A_g + sum_k w_k s_k B_k @ A_k.
    Tensors that are not LoRA factors (the head) are averaged with the same weights. ``max_rank``
    (lora.stack_max_rank) truncates each layer to its best rank-``max_rank`` approximation: no
    longer exact, but it bounds what the server sends.
    """
    if not updates:
        raise ValueError("stack() needs at least one site update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError(f"site weights must sum to a positive number, not {total}")
    shares = [w / total for _, w in updates]
    out: dict[str, torch.Tensor] = {}
    for key in global_state:
        if key.endswith(LORA_B):
            continue
        if key.endswith(LORA_A):
            b_key = key[: -len(LORA_A)] + LORA_B
            a_parts, b_parts = _live_factors(global_state[key], global_state[b_key])
            for (state, _), share in zip(updates, shares):
                a, b = state[key], state[b_key]
                a_parts.append(a)
                b_parts.append(b * (share * alpha / a.shape[0]))
            out[key], out[b_key] = compress(torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1), max_rank)
        else:
            out[key] = sum(state[key] * share for (state, _), share in zip(updates, shares))
    return dict(sorted(out.items()))


def _live_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The global factors to keep; the all-zero rank-1 start contributes nothing and is dropped."""
    if not torch.any(b):
        return [], []
    return [a], [b]


def compress(a: torch.Tensor, b: torch.Tensor, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``b @ a`` with rank at most min(out, in): unchanged while the rank is within it,
    else the SVD of the product (computed in float64) truncated to its full rank. With ``max_rank``
    below that, the truncation keeps the best rank-``max_rank`` approximation (Eckart-Young)."""
    rank = a.shape[0]
    a2 = a.reshape(rank, -1)
    b2 = b.reshape(b.shape[0], rank)
    limit = min(a2.shape[1], b2.shape[0], max_rank or rank)
    if rank <= limit:
        return a.contiguous(), b.contiguous()
    u, s, vh = torch.linalg.svd(b2.double() @ a2.double(), full_matrices=False)
    u, s, vh = u[:, :limit], s[:limit], vh[:limit]
    new_a = vh.to(a.dtype).reshape(limit, *a.shape[1:])
    new_b = (u * s).to(b.dtype).reshape(b.shape[0], limit, *b.shape[2:])
    return new_a.contiguous(), new_b.contiguous()


def dense_delta(state: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Module name -> the dense weight change ``scale * B @ A`` of every adapted layer (for checks)."""
    out = {}
    for name, rank in layer_ranks(state).items():
        a = state[PREFIX + name + LORA_A]
        b = state[PREFIX + name + LORA_B]
        out[name] = scale * (b.reshape(b.shape[0], rank).double() @ a.reshape(rank, -1).double())
    return out
