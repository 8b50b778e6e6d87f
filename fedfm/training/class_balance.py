"""Class weights for a site whose classes are skewed, under DP when its training is private.

A site weights each class by the inverse of its train count (``train.class_balance``). The
counts are private, so under DP-SGD the site first releases them with the Gaussian mechanism:
adding or removing one image changes one count by one, so the histogram has L2 sensitivity 1
and noise of standard deviation ``train.label_count_noise`` is a Gaussian mechanism with that
noise multiplier, i.e. a sampled Gaussian with sample rate 1 and one step. The site makes this
release once, charges it to its ledger, and derives the decision and the weights from the noisy
counts alone (post-processing); without DP-SGD it uses its exact counts.

Weights are balanced (``w_c`` proportional to ``1 / count_c``) and normalised so the largest is
1. Under DP-SGD they scale each example's gradient after it is clipped to norm C
(:class:`PostClipWeights`): every contribution stays within C, so the sensitivity and the noise
calibration of DP-SGD are unchanged, and clipping cannot undo the weighting (weighting the loss
before clipping loses its effect on every example whose gradient exceeds C). Without DP the
same weights go into the cross-entropy.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Sequence

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise

from fedfm.privacy.accountant import StepBatch
from fedfm.training.per_sample import clip_and_accumulate

LABEL_COUNT_SENSITIVITY = 1.0  # L2 change of the histogram when one image is added or removed


def floored(counts: Sequence[float]) -> np.ndarray:
    """Counts as floats, at least 1 each (a noisy count can be zero or negative)."""
    return np.maximum(np.asarray(counts, dtype=np.float64), 1.0)


def imbalance_ratio(counts: Sequence[float]) -> float:
    """Largest count over smallest, counts floored at 1."""
    c = floored(counts)
    return float(c.max() / c.min())


def balanced_weights(counts: Sequence[float]) -> list[float]:
    """``w_c`` proportional to ``1 / count_c`` (floored at 1), the largest weight 1."""
    c = floored(counts)
    return [float(w) for w in c.min() / c]


def wants_weights(mode: str, counts: Sequence[float], ratio: float, noise: float = 0.0) -> bool:
    """``auto``: the classes are skewed (imbalance ratio >= ``ratio``); ``weighted``: always; ``none``: never.

    With noisy counts (``noise`` = the std of their Gaussian noise), ``auto`` weights only when the
    skew survives two standard deviations against it (largest - 2 noise over smallest + 2 noise), so
    that noise alone does not make a balanced small site look skewed; this reads only the release.
    """
    if mode == "none":
        return False
    if mode == "weighted":
        return True
    if mode == "auto":
        if noise <= 0:
            return imbalance_ratio(counts) >= ratio
        low, high = max(min(counts), 1.0), max(counts)
        return (high - 2 * noise) / (low + 2 * noise) >= ratio
    raise ValueError(f"unknown class_balance {mode!r}")


def label_count_release(noise: float, releases: int = 1) -> StepBatch:
    """The privacy cost of ``releases`` noisy label-count histograms, as an accountant batch."""
    return StepBatch(noise / LABEL_COUNT_SENSITIVITY, 1.0, releases)


def release_seed(seed: int, site_id: int) -> int:
    """The seed of a site's label-count noise outside secure mode (reproducible runs)."""
    digest = hashlib.sha256(f"{seed}/{site_id}/label-counts".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noisy_label_counts(counts: Sequence[int], noise: float, seed: int, secure_mode: bool = False) -> list[float]:
    """``counts`` plus Gaussian noise of standard deviation ``noise`` on each class.

    Outside secure mode the noise comes from ``seed``; in secure mode from the OS' random
    device and with the floating-point-safe sampling Opacus uses for DP-SGD noise.
    """
    exact = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if secure_mode:
        try:
            import torchcsprng
        except ImportError as err:
            raise ImportError("privacy.secure_mode needs the torchcsprng package for secure noise") from err
        generator = torchcsprng.create_random_device_generator("/dev/urandom")
    else:
        generator = torch.Generator().manual_seed(seed)
    noisy = exact + _generate_noise(noise, exact, generator=generator, secure_mode=secure_mode)
    return [float(c) for c in noisy]


class PostClipWeights:
    """Per-example weights on the clipped gradients of a DP optimizer: ``w_{y_i} * clip(g_i)``.

    :meth:`install` makes the optimizer clip with fedfm's clipping and scale each example's clip
    factor by its weight; before every ``optimizer.step()`` the training loop names the labels
    of the (physical) batch the optimizer is about to clip (:meth:`select`).
    """

    def __init__(self, class_weights: Sequence[float]):
        weights = torch.as_tensor([float(w) for w in class_weights], dtype=torch.float32)
        if len(weights) == 0 or bool((weights <= 0).any()) or bool((weights > 1).any()):
            raise ValueError(f"class weights must lie in (0, 1] to keep each clipped gradient within C: {class_weights}")
        self.class_weights = weights
        self._next: torch.Tensor | None = None

    def select(self, labels: torch.Tensor) -> None:
        """The weights of the batch with ``labels``: the one the optimizer clips next."""
        self._next = self.class_weights[labels.long().cpu()]

    def take(self) -> torch.Tensor:
        if self._next is None:
            raise RuntimeError("the optimizer clips a batch whose labels were not selected")
        weights, self._next = self._next, None
        return weights

    def install(self, optimizer: DPOptimizer) -> None:
        """Replace ``optimizer``'s clipping by the weighted one (an instance attribute, as
        :func:`fedfm.training.per_sample.use_fused_per_sample_clipping` does)."""
        optimizer.clip_and_accumulate = types.MethodType(
            lambda opt: clip_and_accumulate(opt, sample_weights=self.take()), optimizer)
