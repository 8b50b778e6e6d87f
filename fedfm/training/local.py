"""Local training of one site's adapter for one round, with or without DP-SGD.

With privacy on, Opacus' ``PrivacyEngine.make_private`` wraps the model, optimizer and a
Poisson-sampled data loader; the engine is handed the site's persistent accountant, so the
round's steps compose onto the site's whole history instead of starting a new one. Per-sample
gradients come from :mod:`fedfm.training.per_sample` (or Opacus' hooks: ``privacy.grad_sampler``).
With class weights (:mod:`fedfm.training.class_balance`) DP-SGD scales each example's clipped
gradient by its class's weight; training without DP weights the cross-entropy instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedfm.config import PrivacyConfig, TrainConfig
from fedfm.data.types import Split
from fedfm.models.lora import train_mode
from fedfm.training.activation_cache import FeatureSplit
from fedfm.training.class_balance import PostClipWeights
from fedfm.training.per_sample import per_sample_linear_layers, unsupported_layer, use_fused_per_sample_clipping


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a round takes and at which Poisson sampling rate."""

    sample_rate: float
    steps: int


@dataclass(frozen=True)
class RoundOutcome:
    steps: int
    mean_loss: float
    noise_multiplier: float
    sample_rate: float


def plan_steps(n_train: int, batch_size: int, local_epochs: float) -> StepPlan:
    """Expected batch ``batch_size`` means sampling rate 1/ceil(n/B), as Opacus' DPDataLoader uses."""
    batches_per_epoch = max(1, math.ceil(n_train / batch_size))
    return StepPlan(1.0 / batches_per_epoch, max(1, round(local_epochs * batches_per_epoch)))


class ArrayDataset(Dataset):
    """(input, label) pairs read from an array that may be a memory-mapped file, a batch at a time."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.inputs[index], np.float32)), torch.tensor(self.labels[index])

    def __getitems__(self, indices: list[int]):
        inputs = torch.from_numpy(np.asarray(self.inputs[np.asarray(indices, np.int64)], np.float32))
        labels = torch.from_numpy(np.asarray(self.labels[np.asarray(indices, np.int64)]))
        return list(zip(inputs.unbind(0), labels.unbind(0)))


def split_dataset(split: Split | FeatureSplit) -> Dataset:
    if isinstance(split, FeatureSplit):  # cached prefix activations, memory-mapped: read batch by batch
        return ArrayDataset(split.images, split.labels)
    return TensorDataset(torch.tensor(split.images), torch.tensor(split.labels))  # cached arrays are read-only


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)



class StepAccountant(Protocol):
    """What DP-SGD steps are charged to: an Opacus accountant with the site's history
    (``fedfm.privacy.accountant.SiteAccountant`` is one; the trainer needs no more of it)."""

    mechanism: str
    opacus: IAccountant

    @property
    def total_steps(self) -> int: ...

def train_round(
    model: nn.Module,
    split: Split | FeatureSplit,
    train_cfg: TrainConfig,
    privacy_cfg: PrivacyConfig,
    accountant: StepAccountant | None,
    noise_multiplier: float,
    seed: int,
    on_private_optimizer: Callable[[DPOptimizer, float], None] | None = None,
    class_weights: Sequence[float] | None = None,
) -> RoundOutcome:
    """Train ``model``'s trainable parameters in place for one round of local steps.

    ``on_private_optimizer(optimizer, sample_rate)`` is called once the DP optimizer exists
    (the empirical audit uses it to plant gradient canaries). ``class_weights`` (one per class,
    in (0, 1]) weight each example by its label: after clipping under DP-SGD, in the loss without.
    """
    plan = plan_steps(len(split), train_cfg.batch_size, train_cfg.local_epochs)
    torch.manual_seed(seed)  # drives Poisson sampling, DP noise and dropout of this round
    loader = DataLoader(split_dataset(split), batch_size=train_cfg.batch_size, shuffle=True)
    optimizer = make_optimizer(model, train_cfg)
    if accountant is None:
        weight = None if class_weights is None else torch.tensor([float(w) for w in class_weights])
        losses = _run_steps(model, optimizer, loader, plan.steps, lambda: None, nn.CrossEntropyLoss(weight=weight))
        return RoundOutcome(plan.steps, float(np.mean(losses)), 0.0, plan.sample_rate)

    weighting = None if class_weights is None else PostClipWeights(class_weights)
    with private_training(model, optimizer, loader, privacy_cfg, accountant, noise_multiplier) as (
        private_model, private_opt, private_loader,
    ):
        if weighting is not None:
            weighting.install(private_opt)
        if on_private_optimizer is not None:
            on_private_optimizer(private_opt, private_loader.sample_rate)
        start = accountant.total_steps
        with BatchMemoryManager(
            data_loader=private_loader,
            max_physical_batch_size=train_cfg.max_physical_batch_size,
            optimizer=private_opt,
        ) as physical_loader:
            losses = _run_steps(
                private_model, private_opt, physical_loader, plan.steps,
                lambda: accountant.total_steps - start,
                before_step=None if weighting is None else weighting.select,
            )
    taken = accountant.total_steps - start
    return RoundOutcome(taken, float(np.mean(losses)) if losses else float("nan"),
                        noise_multiplier, private_loader.sample_rate)


@contextmanager
def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     privacy_cfg: PrivacyConfig, accountant: StepAccountant, noise_multiplier: float):
    """Opacus' private model, optimizer and Poisson loader for ``model``, charged to ``accountant``.

    Per-sample gradients come from ``privacy.grad_sampler``: ``fused`` (fedfm's
    :mod:`fedfm.training.per_sample`, for adapters whose trainable layers are all Linear or 1x1
    convolutions; any other layer falls back to Opacus' hooks, with a warning) or ``opacus``.
    """
    fused = privacy_cfg.grad_sampler == "fused"
    problem = unsupported_layer(model) if fused else None
    if problem is not None:
        warnings.warn(f"privacy.grad_sampler=fused: {problem} is not a Linear or 1x1 Conv2d layer, "
                      "so Opacus' hooks compute its per-sample gradients (set privacy.grad_sampler=opacus "
                      "to silence this)", stacklevel=2)
        fused = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant.mechanism, secure_mode=privacy_cfg.secure_mode)
        engine.accountant = accountant.opacus  # the site's history, not a fresh one
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy_cfg.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="no_op" if fused else "hooks",
        )
    try:
        if fused:
            use_fused_per_sample_clipping(private_opt)
            with per_sample_linear_layers(model):
                yield private_model, private_opt, private_loader
        else:
            yield private_model, private_opt, private_loader
    finally:
        private_model._close()  # remove Opacus' hooks (if any) and per-sample state from the discarded wrapper


def _run_steps(model, optimizer, loader, steps: int, dp_steps_taken, loss_fn: nn.Module | None = None,
               before_step: Callable[[torch.Tensor], None] | None = None) -> list[float]:
    """Loop over ``loader`` until ``steps`` optimizer steps were taken.

    ``dp_steps_taken`` returns the accountant's count under DP (physical batches of one logical
    batch do not step), or None without DP, where every batch is one step. ``loss_fn`` is the
    (unweighted, by default) cross-entropy; ``before_step(labels)`` runs before each
    ``optimizer.step()`` (the post-clipping class weights take the batch's labels there).
    """
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    train_mode(model)
    # The frozen input layer needs no gradient, which makes torch note that Opacus' hooks fire
    # on module outputs; that is what they are meant to do here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    losses: list[float] = []
    taken = 0
    while taken < steps:
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()  # an empty Poisson batch still steps: Opacus adds the noise
            if len(labels) > 0:
                losses.append(float(loss.detach()))
            if before_step is not None:
                before_step(labels)
            optimizer.step()
            counted = dp_steps_taken()
            taken = taken + 1 if counted is None else counted
            if taken >= steps:
                break
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def predict_probs(model: nn.Module, split: Split | FeatureSplit, batch_size: int) -> np.ndarray:
    """Class probabilities (N, C) of ``model`` on ``split``, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        images = torch.tensor(np.asarray(split.images[start : start + batch_size], np.float32))
        out.append(torch.softmax(model(images).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
