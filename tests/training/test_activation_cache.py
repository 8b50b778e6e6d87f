"""The frozen-prefix activation cache is exact: logits, per-sample gradients and whole DP rounds
from cached activations equal those of the uncached model, on every backbone (and in 2D and 3D);
the base weights stay bit-identical; the cache lives in the site's folder and is rebuilt when what
it depends on changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedfm.config import LoraConfig, ModelConfig, PrivacyConfig, TrainConfig, load_config
from fedfm.data.types import Split
from fedfm.models import ModelSpec, apply_lora, build_model, train_mode
from fedfm.models.astra import LORA_TARGETS_LAST_STAGE, CTEncoderClassifier
from fedfm.models.registry import Backbone
from fedfm.models.resnet import ResNetEncoder
from fedfm.models.stages import model_stages
from fedfm.privacy.accountant import SiteAccountant
from fedfm.training.activation_cache import ActivationCache, FeatureSplit, SuffixModel, prefix_length
from fedfm.training.local import train_round
from fedfm.training.per_sample import per_sample_linear_layers

SIZE = 16
TRAIN = TrainConfig(batch_size=8, max_physical_batch_size=8, lr=5e-3)


def _tiny_ct(dims: int, feature_norm: str = "none", flip_average: str = "none") -> nn.Module:
    torch.manual_seed(0)
    encoder = ResNetEncoder(dims, blocks=(1, 1, 2, 1), base_width=8)
    gen = torch.Generator().manual_seed(1)
    for m in encoder.modules():  # non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    backbone = Backbone(CTEncoderClassifier(encoder, 1, 2, feature_norm, flip_average), "astra-ct-tiny", SIZE,
                        LORA_TARGETS_LAST_STAGE, ["head"], dims)
    return apply_lora(backbone, LoraConfig(r=2, variant="head" if flip_average != "none" else "lora"))


def _model(name: str) -> nn.Module:
    if name.startswith("ct"):
        flips = {"-flip": "horizontal", "-flip4": "horizontal_vertical"}
        model = _tiny_ct(int(name[2]), "layer" if name.endswith("-norm") else "none",
                         next((v for k, v in flips.items() if name.endswith(k)), "none"))
    else:
        model, _ = build_model(ModelSpec(ModelConfig(backbone=name, pretrained=False), LoraConfig(r=2), 2, 1, SIZE))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at init would leave A's gradients at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _dims(name: str) -> int:
    return 3 if name.startswith("ct3d") else 2


def _split(name: str, n: int = 24, seed: int = 3) -> Split:
    rng = np.random.default_rng(seed)
    shape = (n, 1) + (SIZE,) * _dims(name)
    return Split(rng.random(shape, dtype=np.float32), rng.integers(0, 2, n).astype(np.int64))


# -norm: model.feature_norm=layer; -flip / -flip4: model.flip_average=horizontal / horizontal_vertical
# (head only: the cache holds the averaged features)
BACKBONES = ["vit-tiny", "efficientnet-lite0", "ct2d", "ct3d", "ct2d-norm", "ct2d-flip", "ct3d-flip", "ct2d-flip4"]


def _cached(model: nn.Module, split: Split, folder) -> tuple[nn.Module, FeatureSplit, int]:
    length = prefix_length(model)
    cache = ActivationCache(folder, "site-0", batch_size=7)  # another batching than training uses
    return SuffixModel(model, length), cache.feature_split(model, length, "train", split), length


@pytest.mark.parametrize("name", BACKBONES)
def test_cached_logits_equal_the_full_model(name, tmp_path):
    model, split = _model(name), _split(name)
    suffix, features, length = _cached(model, split, tmp_path)
    stages = model_stages(model)
    assert 0 < length < len(stages) and not stages[length - 1].has_trainable() and stages[length].has_trainable()
    if name.startswith("ct"):  # all of the stem and layer1..3 are cached; with flip_average the whole encoder
        assert stages[length].name == ("head" if "-flip" in name else "layer4.0")
    model.eval()
    with torch.no_grad():
        full = model(torch.tensor(split.images))
        cached = suffix(torch.tensor(np.asarray(features.images)))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_cached_per_sample_gradients_equal_the_full_model(name, tmp_path):
    model, split = _model(name), _split(name, n=6)
    reference = copy.deepcopy(model)
    suffix, features, _ = _cached(model, split, tmp_path)
    y = torch.tensor(split.labels)
    with per_sample_linear_layers(model):
        F.cross_entropy(train_mode(suffix)(torch.tensor(np.asarray(features.images))), y).backward()
    with per_sample_linear_layers(reference):
        F.cross_entropy(train_mode(reference)(torch.tensor(split.images)), y).backward()
    pairs = [(n, p, q) for (n, p), q in zip(model.named_parameters(), reference.parameters()) if p.requires_grad]
    assert pairs
    for n, p, q in pairs:
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("sampler", ["fused", "opacus"])
@pytest.mark.parametrize("name", BACKBONES)
def test_a_cached_dp_round_gives_the_same_adapter(name, sampler, tmp_path):
    """Same seed: the same Poisson batches and noise, so the adapters are equal to float rounding."""
    model, split = _model(name), _split(name)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    uncached = copy.deepcopy(model)
    privacy = PrivacyConfig(noise_multiplier=1.0, accountant="rdp", grad_sampler=sampler)
    suffix, features, _ = _cached(model, split, tmp_path)
    acc_cached, acc_full = SiteAccountant("rdp"), SiteAccountant("rdp")
    a = train_round(suffix, features, TRAIN, privacy, acc_cached, 1.0, seed=5)
    b = train_round(uncached, split, TRAIN, privacy, acc_full, 1.0, seed=5)
    assert a.steps == b.steps == 3 and acc_cached.opacus.history == acc_full.opacus.history
    trained = 0
    for (n, p), q in zip(model.named_parameters(), uncached.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=n)
        trained += p.requires_grad
    assert trained > 0 and abs(a.mean_loss - b.mean_loss) < 1e-5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # base weights bit-identical


def test_a_prefix_stops_before_a_random_stage(tmp_path):
    model = _model("vit-tiny")
    assert prefix_length(model) == 1
    model.base_model.model.net.patch_embedding.dropout.p = 0.1  # random in training: not cacheable
    assert prefix_length(model) == 0


def test_cache_files_are_reused_and_invalidated(tmp_path):
    model, split = _model("ct2d"), _split("ct2d")
    length = prefix_length(model)
    cache = ActivationCache(tmp_path, "site-0")
    first = np.asarray(cache.features(model, length, "train", split.images)).copy()
    assert cache.stats.built == ["train"] and len(list(tmp_path.glob("train-*.npy"))) == 1
    again = ActivationCache(tmp_path, "site-0")  # a new process (or round) finds the file
    np.testing.assert_array_equal(again.features(model, length, "train", split.images), first)
    assert again.stats.built == []
    # other images (data changed) -> another file, the old one removed
    other = _split("ct2d", seed=4)
    again.features(model, length, "train", other.images)
    assert again.stats.built == ["train"] and len(list(tmp_path.glob("train-*.npy"))) == 1
    # other prefix weights (backbone or weights file changed) -> rebuilt
    with torch.no_grad():
        model.base_model.model.encoder.conv1.weight.mul_(1.01)
    third = ActivationCache(tmp_path, "site-0")
    third.features(model, length, "train", other.images)
    assert third.stats.built == ["train"]
    # another cut (LoRA targets moved into layer3) -> another prefix length and a new file
    deeper = apply_lora(Backbone(CTEncoderClassifier(ResNetEncoder(2, (1, 1, 2, 1), 8), 1, 2), "t", SIZE,
                                 r"encoder\.layer(3|4)\.\d+\.(conv1|conv3|downsample\.0)", ["head"]), LoraConfig(r=2))
    assert prefix_length(deeper) < length
    fourth = ActivationCache(tmp_path, "site-0")
    fourth.features(deeper, prefix_length(deeper), "train", other.images)
    assert fourth.stats.built == ["train"]


def test_a_site_kept_across_rounds_reports_each_training_calls_own_build_seconds(tmp_path):
    """Simulation and the deployment worker keep one Site per run: round 1 builds the train file, a
    later round (whose call first validates, building the val file) reports 0: it trained from round 1's file."""
    from fedfm import site_calls
    from fedfm.models import adapter_state_dict
    from fedfm.protocol import SERVER_ROUND, VALIDATE
    from fedfm.site import Site

    config = load_config(None, ["data.num_sites=2", "data.samples_per_site=40", "data.image_size=16",
                                "model.backbone=vit-tiny", "train.batch_size=8", "privacy.noise_multiplier=1.0"])
    site = Site(config, 0, tmp_path)
    arrays = site_calls.as_numpy(adapter_state_dict(build_model(ModelSpec(config.model, config.lora, 2, 1, 16))[0]))
    first = site_calls.train(site, arrays, {SERVER_ROUND: 1}).metrics
    assert first["cache-build-seconds"] > 0 and first["cache-bytes"] > 0
    second = site_calls.train(site, arrays, {SERVER_ROUND: 2, VALIDATE: True}).metrics
    assert sorted(site.cache.stats.built) == ["train", "val"]  # the validation built its file in this call
    assert second["cache-build-seconds"] == 0 and second["cache-bytes"] > first["cache-bytes"]


def test_a_crash_mid_write_leaves_no_file_that_counts(tmp_path, monkeypatch):
    model, split = _model("ct2d"), _split("ct2d")
    length = prefix_length(model)
    cache = ActivationCache(tmp_path, "site-0", batch_size=8)
    stages = model_stages(model)
    calls = {"n": 0}
    original = stages[0].forward

    def dies_on_second_batch(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(x)

    import fedfm.training.activation_cache as module

    monkeypatch.setattr(module, "model_stages", lambda m: [type(stages[0])(stages[0].name, stages[0].modules,
                                                                              dies_on_second_batch)] + model_stages(m)[1:])
    with pytest.raises(KeyboardInterrupt):
        cache.features(model, length, "train", split.images)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.part"))


def test_sites_train_the_same_adapter_with_and_without_the_cache(tmp_path):
    from fedfm.site import Site

    overrides = ["data.num_sites=2", "data.samples_per_site=40", "data.image_size=16", "model.backbone=vit-tiny",
                 "train.batch_size=8", "federation.rounds=2", "privacy.noise_multiplier=1.0"]
    cached_cfg = load_config(None, overrides)
    plain_cfg = load_config(None, overrides + ["train.activation_cache=false"])
    cached, plain = Site(cached_cfg, 0, tmp_path / "a"), Site(plain_cfg, 0, tmp_path / "b")
    from fedfm.models import adapter_state_dict

    initial = adapter_state_dict(build_model(ModelSpec(cached_cfg.model, cached_cfg.lora, 2, 1, 16))[0])
    a, b = cached.train(initial, 1), plain.train(initial, 1)
    assert a.metrics["cache-bytes"] > 0 and "cache-bytes" not in b.metrics
    for k in a.adapter:
        torch.testing.assert_close(a.adapter[k], b.adapter[k], rtol=1e-5, atol=1e-6, msg=k)
    files = list((tmp_path / "a" / "activation-cache" / cached.name).glob("*.npy"))
    assert [f.name.split("-")[0] for f in files] == ["train"]
    ev_a, ev_b = cached.evaluate(a.adapter, "val"), plain.evaluate(a.adapter, "val")
    np.testing.assert_allclose(ev_a.probs, ev_b.probs, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "b").glob("activation-cache"))


def test_hf_encoders_are_cached_whole_for_a_linear_probe(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8, num_channels=3)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    model_cfg = ModelConfig(backbone=f"hf:{tmp_path / 'vit'}")
    adapted, _ = build_model(ModelSpec(model_cfg, LoraConfig(r=2), 2, 1, SIZE))
    assert prefix_length(adapted) == 0  # LoRA inside the encoder: nothing to cache
    probe, _ = build_model(ModelSpec(model_cfg, LoraConfig(r=2, variant="head"), 2, 1, SIZE))
    split = _split("vit-tiny", n=5)
    suffix, features, length = _cached(probe, split, tmp_path / "cache")
    assert length == 1 and features.images.shape == (5, 32)
    probe.eval()
    with torch.no_grad():
        torch.testing.assert_close(suffix(torch.tensor(np.asarray(features.images))),
                                   probe(torch.tensor(split.images)), rtol=1e-5, atol=1e-5)
