"""fedfm's fused per-sample gradients and clipping give Opacus' DP-SGD step, only faster.

The per-sample gradients themselves are checked against one-sample backward passes in
tests/models/test_per_sample_grads.py; here: the clipping arithmetic, whole DP rounds against
Opacus' hooks (same Poisson batches, same noise), and the fallback for other layers.
"""

import copy

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fedfm.config import LoraConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedfm.data.types import Split
from fedfm.models import ModelSpec, build_model
from fedfm.privacy.accountant import SiteAccountant
from fedfm.training.local import train_round
from fedfm.training.per_sample import clip_and_accumulate, per_sample_linear_layers, unsupported_layer

SIZE = 32
TRAIN = TrainConfig(batch_size=8, max_physical_batch_size=8, lr=2e-3)


def _optimizer_with_samples(n: int, seed: int) -> DPOptimizer:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 3, 1, 1)]]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                            expected_batch_size=max(n, 1))
    for p in params:
        # per-sample norms from about 0.1 to 10: some examples are clipped, some are not
        scales = torch.logspace(-1, 1, n).view(n, *([1] * p.dim())) if n else torch.zeros(0, *([1] * p.dim()))
        p.grad_sample = torch.randn((n, *p.shape), generator=gen) * scales / 2
    return optimizer


@pytest.mark.parametrize("n", [0, 1, 7])
def test_fedfm_clipping_equals_opacus_clipping(n):
    ours, theirs = _optimizer_with_samples(n, seed=n), _optimizer_with_samples(n, seed=n)
    clip_and_accumulate(ours)
    theirs.clip_and_accumulate()
    for p, q in zip(ours.params, theirs.params):
        assert p.summed_grad.shape == p.shape
        torch.testing.assert_close(p.summed_grad, q.summed_grad, rtol=1e-5, atol=1e-7)
    if n > 1:  # the check means something: clipping changed the sum
        raw = sum(p.grad_sample.sum(0).norm() for p in theirs.params)
        assert not torch.isclose(raw, sum(p.summed_grad.norm() for p in theirs.params))


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.random((n, 1, SIZE, SIZE), dtype=np.float32), rng.integers(0, 2, n).astype(np.int64))


def _dp_round(model: nn.Module, sampler: str, steps_seen: list[int]) -> SiteAccountant:
    accountant = SiteAccountant("rdp")
    privacy = PrivacyConfig(noise_multiplier=1.0, accountant="rdp", grad_sampler=sampler)
    outcome = train_round(model, _split(24, seed=3), TRAIN, privacy, accountant, 1.0, seed=5)
    steps_seen.append(outcome.steps)
    return accountant


@pytest.mark.parametrize("backbone", ["vit-tiny", "efficientnet-lite0"])
def test_a_fused_dp_round_equals_an_opacus_hooks_round(backbone):
    """Same seed: the same Poisson batches and noise draws, so the adapters agree to float rounding."""
    model, _ = build_model(ModelSpec(ModelConfig(backbone=backbone, pretrained=False), LoraConfig(r=4, dropout=0.0), 2, 1, SIZE))
    with torch.no_grad():  # B = 0 at init would leave A's gradient zero: give both something to learn
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    fused, hooks = copy.deepcopy(model), copy.deepcopy(model)
    steps: list[int] = []
    a = _dp_round(fused, "fused", steps)
    b = _dp_round(hooks, "opacus", steps)
    assert steps[0] == steps[1] == 3 and a.opacus.history == b.opacus.history
    moved = 0
    for (name, p), q, before in zip(fused.named_parameters(), hooks.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(p.requires_grad and not torch.equal(p, before))
    assert moved == sum(p.requires_grad for p in model.parameters())  # every trainable tensor was trained
    assert not any(hasattr(m, "forward") and "forward" in vars(m) for m in fused.modules())  # layers restored


class _ConvHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.head = nn.Linear(2 * SIZE * SIZE, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def test_other_trainable_layers_fall_back_to_opacus_with_a_warning():
    model = _ConvHead()
    assert unsupported_layer(model) == "conv (Conv2d)"
    with pytest.raises(ValueError, match=r"conv \(Conv2d\) is neither"):
        with per_sample_linear_layers(model):
            pass
    fallback, hooks = copy.deepcopy(model), copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"privacy.grad_sampler=fused: conv \(Conv2d\) is not a Linear"):
        _dp_round(fallback, "fused", [])
    _dp_round(hooks, "opacus", [])
    for p, q in zip(fallback.parameters(), hooks.parameters()):
        assert torch.equal(p, q)


class _SharedLayer(nn.Module):
    """One Linear applied twice per example (at 3 positions each), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))).flatten(1))


def test_a_layer_used_twice_gets_the_sum_of_both_uses_per_example():
    torch.manual_seed(0)
    model, x, y = _SharedLayer(), torch.randn(5, 3, 4), torch.tensor([0, 1, 1, 0, 1])
    with per_sample_linear_layers(model, loss_reduction="mean"):
        nn.functional.cross_entropy(model(x), y).backward()
    for i in range(5):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]),
                                    list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-5, atol=1e-6)
