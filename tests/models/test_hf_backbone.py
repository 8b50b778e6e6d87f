"""hf:<dir> backbones: tiny ViTModel / Dinov2Model saved with save_pretrained and loaded by path."""

import json

import pytest
import torch
from torch import nn

from fedfm.config import ConfigError, LoraConfig, ModelConfig
from fedfm.models import ModelSpec, adapter_state_dict, build_backbone, build_model


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_lora_targets_every_encoder_linear(kind, hf_dirs):
    cfg = ModelConfig(backbone=f"hf:{hf_dirs[kind]}")
    plain = build_backbone(cfg, 2, 1, 32)
    assert plain.image_size == 32 and plain.head == ["classifier"]
    assert plain.model.net.config._attn_implementation == "eager"
    encoder_linears = {
        n for n, m in plain.model.named_modules()
        if isinstance(m, nn.Linear) and ".layer" in n and not n.startswith("classifier")
    }
    assert len(encoder_linears) == 12
    model, _ = build_model(ModelSpec(cfg, LoraConfig(r=4), 2, 1, 32))
    wrapped = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for k in adapter_state_dict(model) if "lora_A" in k}
    assert wrapped == encoder_linears
    assert model(torch.rand(3, 1, 32, 32)).shape == (3, 2)


def test_preprocessor_config_sets_size_and_stats(hf_dirs, tmp_path):
    folder = tmp_path / "dino"
    folder.mkdir()
    for f in hf_dirs["dinov2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": 24, "width": 24}, "size": {"shortest_edge": 28},
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
    }))
    backbone = build_backbone(ModelConfig(backbone=f"hf:{folder}"), 2, 3, 32)
    assert backbone.image_size == 24
    assert torch.equal(backbone.model.inputs.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(backbone.model.inputs.std.flatten(), torch.full((3,), 0.25))
    assert backbone.model.eval()(torch.rand(2, 3, 24, 24)).shape == (2, 2)


def test_weights_are_loaded_unless_pretrained_false(hf_dirs):
    from safetensors.torch import load_file

    saved = load_file(str(hf_dirs["vit"] / "model.safetensors"))
    loaded = build_backbone(ModelConfig(backbone=f"hf:{hf_dirs['vit']}"), 2, 1, 32).model.net.state_dict()
    scratch = build_backbone(ModelConfig(backbone=f"hf:{hf_dirs['vit']}", pretrained=False), 2, 1, 32).model.net
    # transformers 5 may rename keys on load; compare the tensors as multisets of values
    def fingerprint(state):
        return sorted(round(float(v.double().sum()), 6) for k, v in state.items() if v.dim() == 2)

    assert fingerprint(loaded) == fingerprint(saved) != fingerprint(scratch.state_dict())


def test_missing_folder_is_a_clear_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"could not find the model locally.*model\.backbone=hf:/path/to/dir") as info:
        build_backbone(ModelConfig(backbone=f"hf:{tmp_path / 'missing'}"), 2, 1, 32)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone(ModelConfig(backbone=f"hf:{tmp_path / 'empty'}"), 2, 1, 32)
    with pytest.raises(ConfigError, match="model.weights_path"):
        build_backbone(ModelConfig(backbone=f"hf:{tmp_path}", weights_path="x.pt"), 2, 1, 32)


def test_hf_backbone_takes_data_of_another_size(tmp_path):
    """data.image_size need not equal the HF model's input size: the model resizes its input."""
    from transformers import ViTConfig, ViTModel

    from fedfm.config import ModelConfig
    from fedfm.models.registry import build_backbone

    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    backbone = build_backbone(ModelConfig(backbone=f"hf:{folder}"), num_classes=3, in_channels=1, image_size=16)
    assert backbone.image_size == 32
    assert backbone.model(torch.rand(2, 1, 16, 16)).shape == (2, 3)
