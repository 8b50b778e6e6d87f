"""``hf:<hub-id-or-dir>``: a Hugging Face transformers vision encoder (ViT, DINOv2, ...) with a new linear head.

The model reads its input size and mean/std from ``preprocessor_config.json`` when present (else
``config.image_size`` and ImageNet statistics); ``Backbone.image_size`` is that native size, and the
model resizes its input (``data.image_size``) to it in its forward. ``model.pretrained=false`` builds the same architecture with random weights.
Attention runs in "eager" mode so Opacus sees plain ``nn.Linear`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedfm.config import ConfigError, ModelConfig
from fedfm.models.inputs import IMAGENET_MEAN, IMAGENET_STD, ImageInput
from fedfm.models.registry import HF_PREFIX, Backbone, register_backbone
from fedfm.models.stages import Stage

# Old (<5) and new transformers names: ViT ``layers.N.attention.{q,k,v,o}_proj``, DINOv2
# ``encoder.layer.N.attention.*``, ``attention.attention.{query,key,value}``, ``mlp.fc1/fc2``, ...
HF_LORA_TARGETS = (
    r".*\.layers?\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj|attention\.(query|key|value)|output\.dense)"
    r"|mlp\.(fc1|fc2|weights_in|weights_out)|intermediate\.dense|output\.dense)"
)


class HFClassifier(nn.Module):
    """HF encoder -> first (CLS) token of the last hidden state, or the pooled output -> linear head."""

    def __init__(self, net: nn.Module, inputs: ImageInput, feature_dim: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.inputs = inputs
        self.net = net
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # pretrained position embeddings fit the model's own input size: resize to it
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        out = self.net(pixel_values=self.inputs(x))
        hidden = out.last_hidden_state
        return hidden[:, 0] if hidden.dim() == 3 else out.pooler_output.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def stages(self) -> list[Stage]:
        """Two stages, the whole encoder and the head: transformers' layer calls differ across model
        types and versions, so the cache covers the encoder only when no adapter sits in it
        (``lora.variant: head``)."""
        return [Stage("encoder", (self.inputs, self.net), self.features,
                      random_in_training=any(getattr(self.net.config, k, 0) or 0 for k in
                                             ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"))),
                Stage("head", (self.classifier,), self.classifier)]


def _is_local(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists()


def _not_found(ref: str, why: str) -> ConfigError:
    return ConfigError(
        f"model.backbone='{HF_PREFIX}{ref}': could not find the model locally ({why}); "
        f"set model.backbone={HF_PREFIX}/path/to/dir (a save_pretrained folder) or connect to the Hugging Face hub"
    )


def load_hf_encoder(ref: str, pretrained: bool) -> tuple[nn.Module, bool]:
    """``AutoModel`` from a local folder, the HF cache, or the hub; returns (model, found_locally)."""
    from transformers import AutoConfig, AutoModel

    local = _is_local(ref)
    path = str(Path(ref).expanduser()) if local else ref
    if local and not Path(path).is_dir():
        raise _not_found(ref, f"{path} is not a folder")
    for local_only in ([True] if local else [True, False]):
        try:
            if not pretrained:
                config = AutoConfig.from_pretrained(path, local_files_only=local_only)
                return AutoModel.from_config(config, attn_implementation="eager"), local_only
            return AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=local_only), local_only
        except OSError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        except ValueError as err:  # a folder without a usable config.json
            raise ConfigError(f"model.backbone='{HF_PREFIX}{ref}' is not a transformers model: {err}") from None
    raise _not_found(ref, reason)


def read_preprocessor(ref: str, local_only: bool) -> dict[str, Any]:
    """``preprocessor_config.json`` of the model as a dict ({} when there is none)."""
    from transformers.utils import cached_file

    try:
        file = cached_file(
            str(Path(ref).expanduser()) if _is_local(ref) else ref, "preprocessor_config.json",
            local_files_only=local_only, _raise_exceptions_for_missing_entries=False,
        )
    except (OSError, ValueError):
        return {}
    return json.loads(Path(file).read_text()) if file else {}


def _size(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return value.get("height") or value.get("shortest_edge")
    return None


def input_spec(config: Any, processor: dict[str, Any]) -> tuple[int, list[float], list[float]]:
    """(image size, mean, std) the encoder was trained with."""
    size = None
    if processor.get("do_center_crop"):
        size = _size(processor.get("crop_size"))
    size = size or _size(processor.get("size")) or getattr(config, "image_size", None)
    if not isinstance(size, int):
        raise ConfigError("the HF model's config has no image_size and no preprocessor_config.json gives one")
    if processor.get("do_normalize", True) is False:
        return size, [0.0], [1.0]
    mean = processor.get("image_mean") or list(IMAGENET_MEAN)
    std = processor.get("image_std") or list(IMAGENET_STD)
    return size, list(mean), list(std)


def feature_dim(config: Any) -> int:
    """Width of the encoder's output features."""
    dim = getattr(config, "hidden_size", None)
    if dim is None and getattr(config, "hidden_sizes", None):
        dim = config.hidden_sizes[-1]
    if not isinstance(dim, int):
        raise ConfigError(f"cannot tell the feature width of HF model type {config.model_type!r}")
    return dim


def check_hf(model_cfg: ModelConfig) -> None:
    """Before a run: a model id after ``hf:``, no weights_path, and a local folder that exists when the
    id is a path (starts with /, . or ~). A hub id is looked up only when the model is built."""
    ref = model_cfg.backbone[len(HF_PREFIX):]
    if not ref:
        raise ConfigError(f"model.backbone='{HF_PREFIX}' needs a hub id or folder after '{HF_PREFIX}'")
    if model_cfg.weights_path:
        raise ConfigError("model.weights_path is not used for hf: backbones; put the model folder in model.backbone "
                          "and null model.weights_path")
    if ref.startswith(("/", ".", "~")):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise ConfigError(f"model.backbone='{HF_PREFIX}{ref}': {folder} {what}: give a folder written by "
                              "save_pretrained (config.json and the weights), or a Hugging Face hub id")


@register_backbone(HF_PREFIX, check=check_hf)
def build_hf(model_cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Backbone:
    """Load ``hf:<ref>`` and put a new linear head on its CLS/pooled features.

    Inputs of another size than the model's own (``data.image_size``) are resized inside the model.
    """
    ref = model_cfg.backbone[len(HF_PREFIX):]
    if not ref:
        raise ConfigError(f"model.backbone='{HF_PREFIX}' needs a hub id or folder after '{HF_PREFIX}'")
    if model_cfg.weights_path:
        raise ConfigError("model.weights_path is not used for hf: backbones; put the model folder in model.backbone")
    net, local_only = load_hf_encoder(ref, model_cfg.pretrained)
    size, mean, std = input_spec(net.config, read_preprocessor(ref, local_only))
    inputs = ImageInput(in_channels, getattr(net.config, "num_channels", 3), mean, std)
    return Backbone(
        model=HFClassifier(net, inputs, feature_dim(net.config), num_classes, size),
        name=f"{HF_PREFIX}{ref}",
        image_size=size,
        lora_targets=HF_LORA_TARGETS,
        head=["classifier"],
    )
