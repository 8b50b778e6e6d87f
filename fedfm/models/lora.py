"""LoRA on a backbone (peft), frozen norm layers, and the adapter state that sites and server exchange.

``lora.variant``: ``lora`` trains and exchanges A and B; ``ffa`` (FFA-LoRA, Sun et al. 2024)
keeps every A at its seeded random init (identical at the server and every site because
``lora.seed`` seeds it), so only B and the head train and travel, and averaging the B's averages
the sites' weight deltas exactly (scale * B @ A is linear in B when A is shared). ``head`` freezes
every adapter tensor (B stays 0, so the adapted layers compute exactly the base layers): only the
new head trains and travels, a linear probe of the frozen backbone under the same pipeline.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedfm.config import ConfigError, LoraConfig, ModelConfig
from fedfm.models.registry import Backbone, build_backbone
from fedfm.models.cache import fresh
from fedfm.models.spec import SPEC_ATTR, ModelSpec

VARIANT_ATTR = "fedfm_lora_variant"  # attribute of the peft model that holds lora.variant

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def unwrap(model: nn.Module) -> nn.Module:
    """The peft model inside an Opacus ``GradSampleModule`` (or the model itself)."""
    return getattr(model, "_module", model)


def apply_lora(backbone: Backbone, lora_cfg: LoraConfig, ranks: dict[str, int] | None = None) -> nn.Module:
    """Wrap ``backbone.model`` (in place) with a seeded LoRA adapter; only adapter + head train.

    ``ranks`` (module name -> rank) gives single layers their own rank with scale 1 (alpha =
    rank); the stacked global adapter of per-site ranks is such a model.
    """
    target = lora_cfg.target_modules or backbone.lora_targets
    # peft matches a pattern as a suffix of the module name; "^" anchors it to the whole name
    patterns = {"^" + re.escape(name): rank for name, rank in (ranks or {}).items()}
    config = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target,
        modules_to_save=list(backbone.head),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_cfg.seed)
        try:
            model = get_peft_model(backbone.model, config)
        except ValueError as err:
            msg = str(err).splitlines()[0]
            raise ConfigError(f"lora.target_modules={target!r} does not fit backbone {backbone.name}: {msg}") from None
    if lora_cfg.variant == "ffa":
        _freeze_lora_a(model)
    elif lora_cfg.variant == "head":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
    setattr(model, VARIANT_ATTR, lora_cfg.variant)
    _check_only_adapter_trains(model)
    return model


def _freeze_lora_a(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


def lora_variant(model: nn.Module) -> str:
    """The ``lora.variant`` the model was built with (``lora`` for a peft model fedfm did not wrap)."""
    return getattr(unwrap(model), VARIANT_ATTR, "lora")


def is_exchanged(key: str, variant: str) -> bool:
    """Whether adapter key ``key`` travels between server and sites under ``variant`` (ffa: no lora_A;
    head: no LoRA tensor at all)."""
    if variant == "head":
        return "lora_" not in key
    return variant != "ffa" or ".lora_A." not in key


def _check_only_adapter_trains(model: nn.Module) -> None:
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_key(n)]
    if wrong:
        raise RuntimeError(f"base parameters left trainable after LoRA: {wrong[:5]}")


def _is_adapter_key(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def freeze_norm_layers(model: nn.Module) -> nn.Module:
    """Put every BatchNorm/LayerNorm/GroupNorm/InstanceNorm in eval mode (running stats stay as built)."""
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            module.eval()
    return model


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` with norm layers kept in eval mode; use instead of ``.train()``."""
    model.train()
    return freeze_norm_layers(model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The exchanged adapter + head tensors (fp32, CPU, contiguous, detached), keys sorted.

    With ``lora.variant=ffa`` the frozen lora_A tensors are left out: every party already holds them.
    """
    state = get_peft_model_state_dict(unwrap(model))
    variant = lora_variant(model)
    keys = sorted(k for k in state if is_exchanged(k, variant))
    return {k: state[k].detach().to("cpu", torch.float32).contiguous().clone() for k in keys}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter + head tensors; raises ``ValueError`` naming missing/unexpected keys or bad shapes."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(".lora_A." in k for k in missing + unexpected):
            hint = f" (this model has lora.variant={lora_variant(model)}: server and sites must use the same variant)"
        raise ValueError(
            f"adapter keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"adapter shapes do not match the model: {wrong[:5]}")
    result = set_peft_model_state_dict(unwrap(model), {k: torch.as_tensor(v) for k, v in state.items()})
    if result.unexpected_keys:
        raise ValueError(f"peft did not place adapter keys {result.unexpected_keys[:5]}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def state_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (numel * element size)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def full_model_bytes(model: nn.Module) -> int:
    """Bytes of the whole model's state dict, base weights included."""
    return state_bytes(unwrap(model).state_dict())


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (load with ``PeftModel.from_pretrained``).

    The file holds every adapter tensor, the frozen lora_A of ``ffa`` included (inference needs
    them). A model from :func:`build_model` also gets ``fedfm_model.json`` (its :class:`ModelSpec`).
    """
    out = Path(out_dir)
    peft_model = unwrap(model)
    peft_model.save_pretrained(str(out))
    spec = getattr(peft_model, SPEC_ATTR, None)
    if spec is not None:
        spec.write(out)
    return out


def build_model(spec: ModelSpec) -> tuple[nn.Module, Backbone]:
    """The backbone with its seeded LoRA adapter, as ``spec`` says: a fresh copy of the process's
    pristine one (:mod:`fedfm.models.cache`). Returns (peft model, its backbone)."""

    def build() -> tuple[nn.Module, Backbone]:
        backbone = build_backbone(spec.model, spec.num_classes, spec.channels, spec.image_size, spec.spatial_dims)
        peft_model = apply_lora(backbone, spec.lora)  # wraps backbone.model in place: the copy keeps them one
        setattr(peft_model, SPEC_ATTR, replace(spec, model=spec.model.model_copy(), lora=spec.lora.model_copy()))
        return peft_model, backbone

    return fresh("peft", spec.key(), build)
