import pytest
import torch
from torch import nn

from fedfm.config import ConfigError, ModelConfig
from fedfm.models import build_backbone
from fedfm.models.efficientnet import load_efficientnet, packaged_weights_path
from fedfm.models.inputs import IMAGENET_MEAN, IMAGENET_STD


def _pointwise(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and tuple(m.stride) == (1, 1)
    }


def test_pointwise_replacement_is_exact():
    ours = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 1, 64).model.eval()
    ref = load_efficientnet(True, 2, 64).eval()
    ref._fc.load_state_dict(ours.net._fc.state_dict())
    pointwise = _pointwise(ours.net)
    assert len(pointwise) == 32  # 15 expand + 16 project + head conv
    assert all(type(m) is nn.Conv2d for m in pointwise.values())
    assert all(type(m) is not nn.Conv2d for m in _pointwise(ref).values())
    x = torch.rand(3, 1, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref((x.repeat(1, 3, 1, 1) - mean) / std)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)
        assert torch.allclose(ours.net.extract_features(ours.inputs(x)), ref.extract_features((x.repeat(1, 3, 1, 1) - mean) / std), atol=1e-5)


def test_imagenet_weights_are_loaded():
    checkpoint = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    net = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 1, 64).model.net
    assert torch.equal(net._blocks[3]._expand_conv.weight, checkpoint["_blocks.3._expand_conv.weight"])
    assert torch.equal(net._conv_stem.weight, checkpoint["_conv_stem.weight"])
    assert torch.equal(net._bn1.running_var, checkpoint["_bn1.running_var"])
    assert net._fc.out_features == 2
    scratch = build_backbone(ModelConfig(backbone="efficientnet-lite0", pretrained=False), 2, 1, 64).model.net
    assert not torch.equal(scratch._conv_stem.weight, checkpoint["_conv_stem.weight"])


def test_fresh_head_even_for_1000_classes():
    checkpoint = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    net = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 1000, 3, 32).model.net
    assert not torch.equal(net._fc.weight, checkpoint["_fc.weight"])


def test_weights_path_replaces_packaged_checkpoint(tmp_path):
    checkpoint = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    checkpoint["_conv_stem.weight"] = checkpoint["_conv_stem.weight"] * 2
    torch.save(checkpoint, tmp_path / "w.pth")
    net = build_backbone(ModelConfig(backbone="efficientnet-lite0", weights_path=str(tmp_path / "w.pth")), 2, 1, 32).model.net
    assert torch.equal(net._conv_stem.weight, checkpoint["_conv_stem.weight"])
    torch.save({"junk": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"model\.weights_path"):
        build_backbone(ModelConfig(backbone="efficientnet-lite0", weights_path=str(tmp_path / "bad.pth")), 2, 1, 32)


def test_rgb_input_is_not_repeated():
    model = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 3, 32).model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="channels"):
        build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 2, 32)
