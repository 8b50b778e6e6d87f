"""What rebuilds a model outside its run: backbone, LoRA settings, classes, input channels and size.

:func:`fedfm.models.build_model` attaches a :class:`ModelSpec` to every model it builds, and
:func:`fedfm.models.save_adapter` writes it next to the PEFT files as ``fedfm_model.json``, so
an adapter folder says which images it takes (the way model-zoo metadata records input format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedfm.config import ConfigError, LoraConfig, ModelConfig

SPEC_FILE = "fedfm_model.json"
SPEC_ATTR = "fedfm_spec"  # attribute of the peft model that holds its ModelSpec
FORMAT_VERSION = 1
# a merged export (fedfm export --merge): the backbone's weights with LoRA folded in, and their description
MERGED_WEIGHTS = "model.safetensors"
MERGED_SPEC = "model.json"
MERGED_FORMAT = "fedfm-merged"


@dataclass(frozen=True)
class ModelSpec:
    model: ModelConfig
    lora: LoraConfig
    num_classes: int
    channels: int  # C of the images the model takes (1 gray, 3 RGB), in [0, 1]
    image_size: int  # images are resized to image_size x image_size (volumes to image_size^3)
    spatial_dims: int = 2  # 2: images (N, C, S, S), 3: volumes (N, C, S, S, S)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.model_dump(),
            "lora": self.lora.model_dump(),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "spatial_dims": self.spatial_dims,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "model spec") -> "ModelSpec":
        try:
            return cls(
                model=ModelConfig.model_validate(raw["model"]),
                lora=LoraConfig.model_validate(raw["lora"]),
                num_classes=int(raw["num_classes"]),
                channels=int(raw["channels"]),
                image_size=int(raw["image_size"]),
                spatial_dims=int(raw.get("spatial_dims", 2)),  # files written before 3D support are 2D
            )
        except KeyError as err:
            raise ConfigError(f"{source} lacks the field {err}: rewrite it with fedfm export") from None
        except ValidationError as err:
            raise ConfigError(f"{source} is not a valid model spec ({err.errors()[0]['msg']})") from None

    def key(self) -> str:
        """What identifies the model this spec builds (the model cache's key)."""
        return json.dumps([self.model.model_dump(), self.lora.model_dump(), self.num_classes, self.channels,
                           self.image_size, self.spatial_dims])

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_spec(folder: str | Path) -> ModelSpec | None:
    """The spec in ``folder/fedfm_model.json``, or None when the folder has none."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): rewrite it with fedfm export") from None
    return ModelSpec.from_dict(raw, str(path))


def merged_description(spec: ModelSpec) -> dict:
    """What ``model.json`` holds: the backbone to build and the input it takes."""
    return {
        "format": MERGED_FORMAT,
        "weights": MERGED_WEIGHTS,
        "backbone": spec.model.backbone,
        "num_classes": spec.num_classes,
        "channels": spec.channels,
        "image_size": spec.image_size,
        "spatial_dims": spec.spatial_dims,
        "input": f"float32 (N, {spec.channels}, {', '.join([str(spec.image_size)] * spec.spatial_dims)}) in [0, 1]; "
                 "the model normalises internally",
        "output": f"logits (N, {spec.num_classes})",
        "lora_merged": spec.lora.model_dump(),
    }
