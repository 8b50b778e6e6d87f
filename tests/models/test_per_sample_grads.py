"""Per-sample gradients of the LoRA model (Opacus' hooks and fedfm's fused layers) equal one-sample backward passes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedfm.models import train_mode
from fedfm.training.per_sample import per_sample_linear_layers

BATCH = 5


def _batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 1, size, size, generator=gen), torch.randint(0, 2, (BATCH,), generator=gen)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("sampler", ["opacus", "fused"])
@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0", "hf-vit", "hf-dinov2"])
def test_per_sample_gradients_match_one_sample_backward(name, sampler, build, disable_dropout, randomize_lora_b):
    model, backbone = build(name)
    randomize_lora_b(disable_dropout(model))
    reference = train_mode(copy.deepcopy(model))
    x, y = _batch(backbone.image_size)

    if sampler == "opacus":
        gsm = train_mode(GradSampleModule(model, loss_reduction="sum"))
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    else:
        with per_sample_linear_layers(model, loss_reduction="sum"):
            F.cross_entropy(train_mode(model)(x), y, reduction="sum").backward()
        # the summed weight gradient, which DP-SGD would discard, is never computed
        assert all(p.grad is None for _, p in _trainable(model))
    names = [n for n, _ in _trainable(model)]
    assert any("lora_A" in n for n in names) and any("modules_to_save" in n for n in names)
    per_sample = {n: p.grad_sample for n, p in _trainable(model)}
    assert all(g is not None and g.shape[0] == BATCH for g in per_sample.values())

    ref_params = [p for _, p in _trainable(reference)]
    for i in range(BATCH):
        loss = F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, ref_params)
        for n, g in zip(names, grads):
            scale = g.abs().max().clamp_min(1e-12)
            err = (per_sample[n][i] - g).abs().max() / scale
            assert err < 1e-4, f"{name} sample {i} {n}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0"])
def test_dp_step_without_noise_or_clipping_equals_plain_step(name, build, disable_dropout, randomize_lora_b):
    """make_private with sigma=0 and a huge clip must give the plain SGD step (opacus issue 820 guard)."""
    model, backbone = build(name)
    randomize_lora_b(disable_dropout(model))
    plain = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in _trainable(model)}
    x, y = _batch(backbone.image_size, seed=1)

    opt = torch.optim.SGD([p for _, p in _trainable(plain)], lr=0.5)
    train_mode(plain)
    F.cross_entropy(plain(x), y).backward()
    opt.step()

    opt = torch.optim.SGD([p for _, p in _trainable(model)], lr=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    private, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6,
        poisson_sampling=False,
    )
    train_mode(private)
    for xb, yb in loader:
        F.cross_entropy(private(xb), yb).backward()
        opt.step()

    for (n, p), (_, q) in zip(_trainable(plain), _trainable(model)):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
        assert not torch.equal(q, before[n]), f"{n} did not move"
