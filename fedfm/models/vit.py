"""``vit-tiny``: a small MONAI ViT, randomly initialised (no pretrained weights exist for it).

``model.pretrained`` has no effect here; ``model.weights_path`` loads a state dict of the MONAI ViT
(its classification head is skipped, a new one is drawn for ``num_classes``).
"""

from __future__ import annotations

import torch
from monai.networks.nets import ViT
from torch import nn

from fedfm.config import ConfigError, ModelConfig
from fedfm.models.inputs import ImageInput
from fedfm.models.registry import Backbone, register_backbone
from fedfm.models.stages import Stage
from fedfm.models.weights import check_weights_file, load_weights

VIT_TINY = {"hidden_size": 192, "mlp_dim": 768, "num_layers": 6, "num_heads": 3, "patch_size": 4}
VIT_LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.linear[12])"


class MonaiViTClassifier(nn.Module):
    """MONAI ViT that returns plain logits (MONAI returns ``(logits, hidden_states)``)."""

    def __init__(self, net: ViT, in_channels: int) -> None:
        super().__init__()
        self.inputs = ImageInput(in_channels, in_channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(x))[0]

    def stages(self) -> list[Stage]:
        """Patch embedding (+ CLS token), each transformer block, final norm + head on the CLS token."""
        net = self.net
        cls = (net.cls_token,) if hasattr(net, "cls_token") else ()
        out = [Stage("embed", (self.inputs, net.patch_embedding), self._embed, tensors=cls)]
        out += [Stage(f"blocks.{i}", (block,), block) for i, block in enumerate(net.blocks)]
        out.append(Stage("head", (net.norm, net.classification_head), lambda x: net.classification_head(net.norm(x)[:, 0])))
        return out

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.patch_embedding(self.inputs(x))
        if hasattr(self.net, "cls_token"):
            x = torch.cat((self.net.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x


@register_backbone("vit-tiny", check=check_weights_file)
def build_vit_tiny(model_cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Backbone:
    """6 layers, hidden 192, 3 heads, patch 4, learnable position embeddings, linear head."""
    if image_size % VIT_TINY["patch_size"]:
        raise ConfigError(f"vit-tiny needs data.image_size divisible by {VIT_TINY['patch_size']}, got {image_size}")
    net = ViT(
        in_channels=in_channels,
        img_size=image_size,
        spatial_dims=2,
        classification=True,
        num_classes=num_classes,
        post_activation=None,  # MONAI's default Tanh would squash the logits into [-1, 1]
        **VIT_TINY,
    )
    if model_cfg.weights_path:
        load_weights(net, model_cfg.weights_path, skip_prefixes=("classification_head.",))
    return Backbone(
        model=MonaiViTClassifier(net, in_channels),
        name="vit-tiny",
        image_size=image_size,
        lora_targets=VIT_LORA_TARGETS,
        head=["net.classification_head"],
    )
