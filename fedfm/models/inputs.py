"""Input adaptation inside the model: channel repeat (gray -> RGB) and mean/std normalisation.

Works on images (N, C, H, W) and volumes (N, C, D, H, W) alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageInput(nn.Module):
    """Turn [0,1] images with ``in_channels`` into what a backbone wants (``out_channels``, normalised)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if in_channels != out_channels and in_channels != 1:
            raise ValueError(
                f"images have {in_channels} channels but the backbone takes {out_channels}; "
                "only 1 -> N channel repeat is supported (convert the data)"
            )
        self.repeat = out_channels if in_channels != out_channels else 1
        self.normalize = mean is not None
        if mean is not None:
            std = std if std is not None else (1.0,)
            self.register_buffer("mean", _as_channels(mean, out_channels), persistent=False)
            self.register_buffer("std", _as_channels(std, out_channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat > 1:
            x = x.repeat(1, self.repeat, *([1] * (x.dim() - 2)))
        if self.normalize:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        return x


def _as_channels(values: Sequence[float], channels: int) -> torch.Tensor:
    t = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"normalisation has {t.numel()} values for {channels} channels")
    return t
