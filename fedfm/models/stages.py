"""A backbone's forward pass as an ordered list of stages, so a frozen prefix can be cut off.

A backbone model may define ``stages() -> list[Stage]``: running every stage's ``forward`` in
order on the model's input gives exactly ``model(x)``. Each stage names the modules it runs,
so :mod:`fedfm.training.activation_cache` can tell where the first trainable parameter sits and
whether everything before it is deterministic (``random_in_training`` marks a stage that draws
random numbers in training mode, such as drop-connect). ``stages()`` is called on the model as it
is at that moment: after peft has injected its LoRA layers and head wrapper, the stages see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    name: str
    modules: tuple[nn.Module, ...]  # every module whose parameters or buffers this stage uses
    forward: Callable[[torch.Tensor], torch.Tensor]
    random_in_training: bool = False  # draws random numbers when the model is in training mode
    tensors: tuple[torch.Tensor, ...] = ()  # parameters it uses that belong to no module of its own (a CLS token)

    def has_trainable(self) -> bool:
        return any(p.requires_grad for m in self.modules for p in m.parameters()) or any(
            t.requires_grad for t in self.tensors)


def model_stages(model: nn.Module) -> list[Stage] | None:
    """The stages of a (peft-wrapped) backbone model, or None when it does not define them."""
    base = model
    for attr in ("_module", "base_model", "model"):  # Opacus wrapper -> PeftModel -> LoraModel -> backbone
        if hasattr(base, "stages"):
            break
        base = getattr(base, attr, base)
    stages = getattr(base, "stages", None)
    return stages() if callable(stages) else None


def run_stages(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage.forward(x)
    return x
