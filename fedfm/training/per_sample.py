"""Per-sample gradients of the adapter's linear maps, computed inside one autograd function.

Opacus' default ("hooks") computes per-sample gradients with a forward hook that keeps each
layer's input and a full backward hook that catches its output gradient, layer by layer in
Python, while autograd still computes the summed weight gradient that DP-SGD then throws away.
Every trainable layer of a fedfm adapter is a linear map without padding: a LoRA A or B
(``nn.Linear``, or a 1x1 ``nn.Conv2d`` / 1x1x1 ``nn.Conv3d`` on convolutional backbones; a
strided one is the same map on every s-th pixel) or the linear head.
For those, :class:`PerSampleLinear` does the whole job in its backward: the input gradient, and
each trainable weight's per-sample gradient as one batched matmul, written to ``p.grad_sample``
as Opacus' hooks would (scaled by the batch size for a mean loss), and no summed weight
gradient. Opacus still does Poisson sampling, noise and accounting
(``make_private(..., grad_sample_mode="no_op")``).

:func:`clip_and_accumulate` clips with the same arithmetic as ``DPOptimizer`` (per-sample norm
over all parameters, factor ``min(1, C / (norm + 1e-6))``), with one matrix-vector product per
parameter for the clipped sum, optionally scaling each clipped gradient by a per-sample weight.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 (2D) or 1x1x1 (3D), unpadded, ungrouped convolution: a linear map applied at every
    pixel (with stride s: at every s-th pixel)."""
    return (
        isinstance(module, (nn.Conv2d, nn.Conv3d))
        and all(k == 1 for k in module.kernel_size)
        and all(p == 0 for p in module.padding)
        and all(d == 1 for d in module.dilation)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def unsupported_layer(model: nn.Module) -> str | None:
    """The first layer with trainable weights that :class:`PerSampleLinear` cannot take, described; else None."""
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if type(module) is nn.Linear or (type(module) in (nn.Conv2d, nn.Conv3d) and is_pointwise_conv(module)):
            continue
        return f"{name} ({type(module).__name__})"
    return None


class PerSampleLinear(torch.autograd.Function):
    """``y = x W^T + b`` (Linear over any leading dims) or its 1x1-convolution form (NCHW or NCDHW).

    Backward returns the input gradient only; each trainable weight (and bias) gets
    ``grad_sample`` of shape (batch, *weight.shape): the gradient of each example's own loss.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: bool, batch_scale: bool):
        ctx.save_for_backward(x, weight, bias)
        ctx.conv, ctx.batch_scale = conv, batch_scale
        if conv:
            return (F.conv2d if x.dim() == 4 else F.conv3d)(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        n, out_features, in_features = x.shape[0], weight.shape[0], weight.shape[1]
        grad_x = None
        if ctx.conv:  # (n, C, H, W) or (n, C, D, H, W): pixels (voxels) are the positions
            if ctx.needs_input_grad[0]:
                transposed = weight.reshape(out_features, in_features).t().reshape(in_features, out_features,
                                                                                  *weight.shape[2:])
                grad_x = (F.conv2d if x.dim() == 4 else F.conv3d)(grad_out, transposed)
            positions = x.shape[2:].numel()
            per_position = grad_out.reshape(n, out_features, positions)
            inputs = x.reshape(n, in_features, positions).transpose(1, 2)
        else:  # (n, ..., features): every dim between the first and the last is a position
            if ctx.needs_input_grad[0]:
                grad_x = grad_out @ weight
            positions = x.shape[1:-1].numel()
            per_position = grad_out.reshape(n, positions, out_features).transpose(1, 2)
            inputs = x.reshape(n, positions, in_features)
        # per_position: (n, out, positions); inputs: (n, positions, in)
        scale = float(n) if ctx.batch_scale else 1.0  # a mean loss: each example's own gradient is n times its share
        if weight.requires_grad:
            _set_grad_sample(weight, torch.bmm(per_position, inputs).mul_(scale).view(n, *weight.shape))
        if bias is not None and bias.requires_grad:
            _set_grad_sample(bias, per_position.sum(-1).mul_(scale))
        return grad_x, None, None, None, None


def _subsample(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """The pixels a strided 1x1 convolution reads (every s-th along each spatial axis)."""
    if all(s == 1 for s in stride):
        return x
    return x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]


def _set_grad_sample(param: torch.Tensor, grad_sample: torch.Tensor) -> None:
    """A layer applied twice in one forward pass gets the sum of both uses' gradients, as in Opacus.

    Several backward passes per optimizer step (gradient accumulation) are not supported: with
    Poisson sampling Opacus forbids them too, and fedfm's training loop clears ``grad_sample``
    (``zero_grad``) before every backward pass.
    """
    current = getattr(param, "grad_sample", None)
    param.grad_sample = grad_sample if current is None else current + grad_sample


@contextmanager
def per_sample_linear_layers(model: nn.Module, loss_reduction: str = "mean") -> Iterator[None]:
    """Route every trainable layer of ``model`` through :class:`PerSampleLinear` while inside.

    Call :func:`unsupported_layer` first; the layers' own ``forward`` comes back on exit.
    """
    problem = unsupported_layer(model)
    if problem is not None:
        raise ValueError(f"per-sample gradients need Linear or 1x1 Conv2d layers; {problem} is neither")
    batch_scale = loss_reduction == "mean"
    patched = []
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            conv = isinstance(module, (nn.Conv2d, nn.Conv3d))
            stride = tuple(module.stride) if conv else ()
            module.forward = types.MethodType(
                lambda self, x, _conv=conv, _stride=stride: PerSampleLinear.apply(
                    _subsample(x, _stride), self.weight, self.bias, _conv, batch_scale), module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def clip_and_accumulate(optimizer: DPOptimizer, sample_weights: torch.Tensor | None = None) -> None:
    """``DPOptimizer.clip_and_accumulate``, same arithmetic, with one norm and one matrix-vector
    product per parameter (Opacus' einsum over the per-sample gradients was slower here).

    ``sample_weights`` (n,), when given, scale each example's gradient after clipping: the sum
    is ``sum_i w_i * clip(g_i)``, so with weights in [0, 1] each term stays within the clipping
    norm (:mod:`fedfm.training.class_balance`)."""
    samples = [g.flatten(1) for g in optimizer.grad_samples]  # (n, numel) per parameter, in params order
    norms = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in samples], dim=1).norm(2, dim=1)
    factors = (optimizer.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    if sample_weights is not None:
        if sample_weights.shape != factors.shape:
            raise ValueError(f"{tuple(sample_weights.shape)} sample weights for {len(factors)} per-sample gradients")
        factors = factors * sample_weights.to(device=factors.device, dtype=factors.dtype)
    for p, grad_sample in zip(optimizer.params, samples):
        _check_processed_flag(p.grad_sample)
        grad = (factors.to(grad_sample.dtype) @ grad_sample).view_as(p).to(p.dtype)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        _mark_as_processed(p.grad_sample)


def use_fused_per_sample_clipping(optimizer: DPOptimizer) -> None:
    """Make ``optimizer`` clip with :func:`clip_and_accumulate` (an instance attribute, so
    wrappers installed later, such as gradient canaries, wrap this one)."""
    optimizer.clip_and_accumulate = types.MethodType(clip_and_accumulate, optimizer)
