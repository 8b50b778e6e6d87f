"""A faster, exact per-sample gradient for pointwise (1x1) convolutions, registered with Opacus.

LoRA on a convolutional backbone (EfficientNet's expand/project convs) adds 1x1 convolutions:
A maps C_in -> r and B maps r -> C_out channels. Opacus computes every Conv2d's per-sample
gradient through ``unfold`` and a grouped einsum, which for a 1x1 kernel with stride 1, no
padding and one group copies the activations twice for nothing: the unfolded tensor is the
activation itself. This sampler does that case as one batched matmul,
``grad[n] = backprops[n] @ activations[n]^T`` over the H*W positions, and hands every other
convolution to Opacus' own sampler. ``tests/models/test_per_sample_grads.py`` checks both paths
against gradients computed one sample at a time.

Importing this module registers it (``opacus.grad_sample.register_grad_sampler`` keeps one
sampler per layer type, process-wide).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn


def is_pointwise(layer: nn.Module) -> bool:
    """A Conv2d whose unfold is a reshape: 1x1 kernel, stride 1, no padding, no dilation, one group."""
    return (
        isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (1, 1)
        and layer.stride == (1, 1)
        and layer.padding in ((0, 0), "valid")
        and layer.dilation == (1, 1)
        and layer.groups == 1
    )


@register_grad_sampler(nn.Conv2d)
def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d: a batched matmul when pointwise, else Opacus' unfold path."""
    x = activations[0]
    if not is_pointwise(layer) or x.shape[0] == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    n = x.shape[0]
    x = x.to(backprops.dtype).reshape(n, layer.in_channels, -1)
    g = backprops.reshape(n, layer.out_channels, -1)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(g, x.transpose(1, 2)).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2)
    return out
