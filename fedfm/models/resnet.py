"""A bottleneck ResNet encoder for 2D images or 3D volumes, with torchvision's module names.

The layout is torchvision's ResNet v1.5 (stride on the 3x3 convolution, a 1x1 strided
``downsample`` on the first block of a stage), written once for both dimensionalities so that a
2D model and a 3D ("inflated") model share names: ``conv1``, ``bn1``, ``layerK.B.conv{1,2,3}``,
``layerK.B.bn{1,2,3}``, ``layerK.0.downsample.{0,1}``. The 3D stem is that of inflated CT
encoders (I3D-style): a (3, 7, 7) convolution with stride (1, 2, 2) that keeps the depth, then a
3x3x3 max-pool with stride 2 in every axis.

:func:`centre_slice_state_dict` turns a 3D state dict into the 2D one whose every kernel is the
centre depth-slice of the 3D kernel. On a depth-1 volume the 3D network only ever sees that slice
(the other depth taps multiply zero padding, and every depth stride maps depth 1 to depth 1), so
the 2D network on the image equals the 3D network on the single-slice volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EXPANSION = 4  # a bottleneck's output width over its inner width


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _bn(dims: int):
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1, each followed by BatchNorm, plus the (projected) shortcut."""

    def __init__(self, dims: int, in_width: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        out_width = width * EXPANSION
        self.conv1 = conv(in_width, width, kernel_size=1, bias=False)
        self.bn1 = bn(width)
        self.conv2 = conv(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = conv(width, out_width, kernel_size=1, bias=False)
        self.bn3 = bn(out_width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(conv(in_width, out_width, kernel_size=1, stride=stride, bias=False), bn(out_width))
            if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """Stem + four bottleneck stages; ``forward`` returns the last stage's feature map."""

    def __init__(self, dims: int, blocks: Sequence[int] = (3, 8, 36, 3), base_width: int = 64, in_channels: int = 3):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"ResNetEncoder takes dims 2 or 3, got {dims}")
        self.dims = dims
        conv, bn = _conv(dims), _bn(dims)
        if dims == 2:
            self.conv1 = conv(in_channels, base_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv(in_channels, base_width, kernel_size=(3, 7, 7), stride=(1, 2, 2),
                              padding=(1, 3, 3), bias=False)
            self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.bn1 = bn(base_width)
        self.relu = nn.ReLU(inplace=True)
        in_width = base_width
        for stage, count in enumerate(blocks):
            width = base_width * 2**stage
            stride = 1 if stage == 0 else 2
            layer = []
            for b in range(count):
                first = b == 0
                layer.append(Bottleneck(dims, in_width, width, stride if first else 1,
                                        downsample=first and (stride != 1 or in_width != width * EXPANSION)))
                in_width = width * EXPANSION
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.out_width = in_width

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return x


def centre_slice_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 2D state dict of a 3D one: every 5D kernel (O, I, kD, kH, kW) -> its centre slice (O, I, kH, kW)."""
    return {k: (v[:, :, v.shape[2] // 2].contiguous() if v.dim() == 5 else v) for k, v in state.items()}
