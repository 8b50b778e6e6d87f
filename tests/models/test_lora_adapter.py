"""LoRA wrapping: what trains, what is exchanged, and that it round-trips exactly."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from peft import PeftModel
from torch import nn

from fedfm.config import ConfigError, LoraConfig, ModelConfig
from fedfm.models import (
    adapter_state_dict,
    apply_lora,
    build_backbone,
    clear_model_cache,
    count_parameters,
    full_model_bytes,
    load_adapter_state_dict,
    save_adapter,
    state_bytes,
    train_mode,
    unwrap,
)

# targeted modules per backbone: vit-tiny 6 blocks x (qkv, out_proj, linear1, linear2);
# efficientnet-lite0 15 expand + 16 project + head conv; tiny HF 2 layers x (q, k, v, o, fc1, fc2)
TARGETS = {"vit-tiny": 24, "efficientnet-lite0": 32, "hf-vit": 12, "hf-dinov2": 12}


def _is_adapter(key: str) -> bool:
    return "lora_" in key or ".modules_to_save." in key


def _x(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0", "hf-dinov2"])
def test_only_adapter_and_head_are_updated(name, build):
    model, backbone = build(name)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not _is_adapter(k)}
    adapter_before = adapter_state_dict(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _x(backbone.image_size, 8), torch.tensor([0, 1] * 4)
    for _ in range(3):
        train_mode(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    assert any("running_mean" in k for k in base_before) == (name == "efficientnet-lite0")
    for key, value in base_before.items():
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    for key, value in adapter_state_dict(model).items():
        assert not torch.equal(value, adapter_before[key]), f"adapter tensor {key} did not move"


@pytest.mark.parametrize("name", list(TARGETS))
def test_adapter_state_holds_only_lora_and_head(name, build):
    model, backbone = build(name)
    state = adapter_state_dict(model)
    assert len(state) == 2 * TARGETS[name] + 2  # lora_A + lora_B per target, head weight + bias
    assert sum("lora_A" in k for k in state) == sum("lora_B" in k for k in state) == TARGETS[name]
    heads = [k for k in state if "lora_" not in k]
    assert sorted(heads) == sorted(f"base_model.model.{h}.{p}" for h in backbone.head for p in ("bias", "weight"))
    assert list(state) == sorted(state)
    assert all(v.dtype == torch.float32 and v.is_contiguous() and not v.requires_grad for v in state.values())
    trainable, total = count_parameters(model)
    assert state_bytes(state) == 4 * sum(v.numel() for v in state.values()) == 4 * trainable
    assert trainable < total and state_bytes(state) < full_model_bytes(model)


def test_base_is_frozen_and_norms_stay_in_eval(build):
    model, _ = build("efficientnet-lite0")
    assert all(_is_adapter(n) for n, p in model.named_parameters() if p.requires_grad)
    train_mode(model)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for n, m in model.named_modules() if n.endswith("lora_A.default"))


@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0"])
def test_adapter_round_trip_gives_identical_outputs(name, build, randomize_lora_b):
    trained, backbone = build(name)
    randomize_lora_b(trained)
    with torch.no_grad():
        unwrap(trained).get_submodule(f"base_model.model.{backbone.head[0]}.modules_to_save.default").weight.mul_(3)
    fresh, _ = build(name)
    x = _x(backbone.image_size)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), trained(x))
        load_adapter_state_dict(fresh, adapter_state_dict(GradSampleModule(trained)))
        assert torch.equal(fresh(x), trained(x))


def test_mismatched_adapter_state_is_refused(build):
    model, _ = build("vit-tiny")
    state = adapter_state_dict(model)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing.*" + first.replace(".", r"\.")):
        load_adapter_state_dict(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        load_adapter_state_dict(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shapes"):
        load_adapter_state_dict(model, {**state, first: torch.zeros(1, 1)})
    other, _ = build("vit-tiny", r=2)
    with pytest.raises(ValueError, match="shapes"):
        load_adapter_state_dict(other, state)


def test_same_seed_builds_identical_adapter_and_keeps_global_rng():
    clear_model_cache()
    rng = torch.get_rng_state()
    cfg = ModelConfig(backbone="vit-tiny")
    a = adapter_state_dict(apply_lora(build_backbone(cfg, 2, 1, 32), LoraConfig(seed=7)))
    b = adapter_state_dict(apply_lora(build_backbone(cfg, 2, 1, 32), LoraConfig(seed=7)))
    c = adapter_state_dict(apply_lora(build_backbone(cfg, 2, 1, 32), LoraConfig(seed=8)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_a = [k for k in a if "lora_A" in k]
    assert all(not torch.equal(a[k], c[k]) for k in lora_a)


def test_build_model_returns_independent_copies(build):
    first, _ = build("vit-tiny")
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)
    second, backbone = build("vit-tiny")
    assert backbone.model is second.get_base_model()
    reference = apply_lora(build_backbone(ModelConfig(backbone="vit-tiny"), 2, 1, 32), LoraConfig(r=4))
    for (k, v), (_, w) in zip(second.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(v, w), k


def test_save_adapter_loads_with_peft_from_pretrained(build, randomize_lora_b, tmp_path):
    model, backbone = build("efficientnet-lite0")
    randomize_lora_b(model)
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    fresh = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 1, 32).model
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    x = _x(backbone.image_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_custom_target_regex_and_bad_regex(build):
    model, _ = build("vit-tiny", target_modules=r".*blocks\.\d+\.attn\.qkv")
    assert sum("lora_A" in k for k in adapter_state_dict(model)) == 6
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        build("vit-tiny", target_modules=r"nothing\.here")
