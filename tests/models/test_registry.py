import pytest
import torch

from fedfm.config import ConfigError, ModelConfig
from fedfm.models import (
    Backbone,
    available_backbones,
    build_backbone,
    register_backbone,
)
from fedfm.models.registry import _FACTORIES


def test_builtins_are_listed():
    names = available_backbones()
    assert {"vit-tiny", "efficientnet-lite0"} <= set(names)
    assert "hf:<hub-id-or-dir>" in names


def test_unknown_backbone_names_the_key_value_and_choices():
    with pytest.raises(ValueError, match=r"model\.backbone='resnet-9000'.*vit-tiny") as info:
        build_backbone(ModelConfig(backbone="resnet-9000"), 2, 1, 32)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


def test_registered_factory_is_built_with_seeded_rng():
    @register_backbone("test-linear")
    def _linear(cfg, num_classes, in_channels, image_size):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))
        return Backbone(net, "test-linear", image_size, r".*1", ["1"])

    try:
        state = torch.get_rng_state()
        a = build_backbone(ModelConfig(backbone="test-linear"), 3, 1, 8)
        b = build_backbone(ModelConfig(backbone="test-linear"), 3, 1, 8)
        assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
        assert torch.equal(a.model[1].weight, b.model[1].weight)  # same base on every site
        assert a.model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    finally:
        _FACTORIES.pop("test-linear")


@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0"])
def test_builtin_backbones_give_plain_logits(name):
    backbone = build_backbone(ModelConfig(backbone=name), 3, 1, 32)
    out = backbone.model.eval()(torch.rand(2, 1, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert backbone.image_size == 32
    for head in backbone.head:
        backbone.model.get_submodule(head)


def test_vit_head_has_no_tanh():
    backbone = build_backbone(ModelConfig(backbone="vit-tiny"), 2, 1, 32)
    assert isinstance(backbone.model.get_submodule(backbone.head[0]), torch.nn.Linear)


def test_vit_weights_path_is_loaded(tmp_path):
    src = build_backbone(ModelConfig(backbone="vit-tiny"), 2, 1, 32).model.net
    with torch.no_grad():
        src.blocks[0].attn.qkv.weight.add_(1.0)
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    loaded = build_backbone(ModelConfig(backbone="vit-tiny", weights_path=str(tmp_path / "vit.pt")), 5, 1, 32).model.net
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match=r"model\.weights_path"):
        build_backbone(ModelConfig(backbone="vit-tiny", weights_path=str(tmp_path / "nope.pt")), 2, 1, 32)
