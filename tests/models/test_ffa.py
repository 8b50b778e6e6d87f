"""FFA-LoRA (lora.variant=ffa): A stays at the shared seeded init, only B + head train and travel.

Checks what trains and what is sent (exact byte counts from the layers' shapes), that averaging
the sites' B matrices averages their weight deltas exactly (and that with trained A it does
not), that A is bit-identical after a DP round, and that the saved adapter still holds A.
"""

import re

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from fedfm.config import ModelConfig, PrivacyConfig, TrainConfig
from fedfm.data.types import Split
from fedfm.models import (
    adapter_state_dict,
    build_backbone,
    count_parameters,
    load_adapter_state_dict,
    save_adapter,
    state_bytes,
    unwrap,
)
from fedfm.privacy.accountant import SiteAccountant
from fedfm.training.local import train_round

R = 4
SIZE = 32  # conftest's build() uses 32 px, 1 channel, 2 classes
TRAIN = TrainConfig(batch_size=8, max_physical_batch_size=8, lr=2e-3)
PRIVACY = PrivacyConfig(noise_multiplier=1.0, accountant="rdp")
SITE_EXAMPLES = [30, 20, 10]  # FedAvg weights


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, SIZE, SIZE), dtype=np.float32)
    return Split(images, rng.integers(0, 2, n).astype(np.int64))


def _dp_round(model: nn.Module, seed: int, n: int = 16, on_private_optimizer=None) -> None:
    outcome = train_round(model, _split(n, seed), TRAIN, PRIVACY, SiteAccountant("rdp"), 1.0, seed,
                          on_private_optimizer)
    assert outcome.steps == -(-n // TRAIN.batch_size)  # one epoch of Poisson batches


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-wrapped layer of the peft model, by module name."""
    return {n: m for n, m in unwrap(model).named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _delta(layer: nn.Module) -> torch.Tensor:
    """scale * B @ A of one LoRA layer (Linear, or 1x1 Conv2d as (out, in))."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dim() == 2 or a.shape[2:] == (1, 1), "the test's delta formula covers Linear and 1x1 convs"
    return layer.scaling["default"] * (b.flatten(1) @ a.flatten(1))


def _lora_a(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if ".lora_A." in n}


def _target_shapes(name: str) -> tuple[list[int], list[int], int]:
    """(fan-in of A per target, fan-out of B per target, head numel) read off the un-adapted backbone."""
    backbone = build_backbone(ModelConfig(backbone=name), 2, 1, SIZE)
    pattern = re.compile(backbone.lora_targets)
    fan_in, fan_out = [], []
    for module_name, module in backbone.model.named_modules():
        if pattern.fullmatch(module_name):
            if isinstance(module, nn.Conv2d):
                fan_in.append(module.in_channels * module.kernel_size[0] * module.kernel_size[1])
                fan_out.append(module.out_channels)
            else:
                fan_in.append(module.in_features)
                fan_out.append(module.out_features)
    head = sum(p.numel() for h in backbone.head for p in backbone.model.get_submodule(h).parameters())
    return fan_in, fan_out, head


@pytest.mark.parametrize("name", ["vit-tiny", "efficientnet-lite0"])
def test_only_b_and_head_train_and_travel_with_exact_bytes(name, build):
    ffa, _ = build(name, r=R, variant="ffa")
    lora, _ = build(name, r=R, variant="lora")
    trainable = [n for n, p in ffa.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n or ".modules_to_save." in n for n in trainable)
    assert not any(p.requires_grad for n, p in ffa.named_parameters() if ".lora_A." in n)

    sent = adapter_state_dict(ffa)
    assert not any("lora_A" in k for k in sent)
    assert set(sent) == {k for k in adapter_state_dict(lora) if "lora_A" not in k}
    assert sum(v.numel() for v in sent.values()) == count_parameters(ffa)[0]

    fan_in, fan_out, head = _target_shapes(name)
    assert sum("lora_B" in k for k in sent) == len(fan_out) > 0
    lora_part_ffa = 4 * R * sum(fan_out)  # B: (out, r) per target, fp32
    lora_part_lora = 4 * R * (sum(fan_in) + sum(fan_out))  # A: (r, in) and B
    assert state_bytes(sent) == lora_part_ffa + 4 * head
    assert state_bytes(adapter_state_dict(lora)) == lora_part_lora + 4 * head
    # about half at equal rank: exactly sum(out) / sum(in + out) of the LoRA part
    assert 0.45 < lora_part_ffa / lora_part_lora < 0.6


def _federated_round(build, variant: str) -> float:
    """3 sites each take one DP round from the same global model; returns the worst relative gap
    between the delta of the FedAvg'd adapter and the weighted average of the sites' deltas."""
    sites = []
    for seed in range(3):
        model, _ = build("efficientnet-lite0", r=R, variant=variant)
        _dp_round(model, seed=10 + seed, n=SITE_EXAMPLES[seed])
        sites.append(model)
    weights = [n / sum(SITE_EXAMPLES) for n in SITE_EXAMPLES]
    states = [adapter_state_dict(m) for m in sites]
    averaged = {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}
    merged, _ = build("efficientnet-lite0", r=R, variant=variant)
    load_adapter_state_dict(merged, averaged)

    site_layers = [_lora_layers(m) for m in sites]
    worst = 0.0
    with torch.no_grad():
        for name, layer in _lora_layers(merged).items():
            dense = sum(w * _delta(layers[name]) for w, layers in zip(weights, site_layers))
            assert dense.abs().max() > 0, f"{name}: the sites' deltas are zero, nothing is tested"
            worst = max(worst, float((_delta(layer) - dense).abs().max() / dense.abs().max()))
    return worst


def test_averaging_b_averages_the_weight_deltas_exactly_only_when_a_is_shared(build):
    assert _federated_round(build, "ffa") < 1e-5  # float rounding only
    assert _federated_round(build, "lora") > 1e-3  # avg(B) @ avg(A) != avg(B @ A) once A trains


def test_a_is_bit_identical_after_a_dp_round_and_opacus_skips_it(build):
    model, _ = build("efficientnet-lite0", r=R, variant="ffa")
    a_before = _lora_a(model)
    b_before = {k: v for k, v in adapter_state_dict(model).items() if "lora_B" in k}
    seen: dict[str, set[int]] = {}

    def record(optimizer, _sample_rate):
        seen["ids"] = {id(p) for p in optimizer.params}

    _dp_round(model, seed=1, on_private_optimizer=record)
    params = dict(unwrap(model).named_parameters())
    assert seen["ids"] == {id(p) for p in params.values() if p.requires_grad}
    assert not seen["ids"] & {id(params[n]) for n in a_before}
    for name, value in _lora_a(model).items():
        assert torch.equal(value, a_before[name]), f"{name} changed in a DP round"
        assert params[name].grad is None and getattr(params[name], "grad_sample", None) is None
    after = adapter_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in b_before.items()), "every B must move"


def test_standard_lora_moves_a_in_a_dp_round(build):
    """The counterpart of the test above: without ffa the same round does change A."""
    model, _ = build("efficientnet-lite0", r=R, variant="lora")
    a_before = _lora_a(model)
    _dp_round(model, seed=1)
    assert all(not torch.equal(v, a_before[k]) for k, v in _lora_a(model).items())


def test_saved_ffa_adapter_holds_a_and_rebuilds_the_trained_model(build, tmp_path):
    trained, backbone = build("efficientnet-lite0", r=R, variant="ffa")
    _dp_round(trained, seed=2)
    # the server's path: it receives B + head only, loads them into its own model, saves
    server, _ = build("efficientnet-lite0", r=R, variant="ffa")
    load_adapter_state_dict(server, adapter_state_dict(trained))
    out = save_adapter(server, tmp_path / "adapter")

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum("lora_A" in k for k in saved) == sum("lora_B" in k for k in saved) > 0
    fresh = build_backbone(ModelConfig(backbone="efficientnet-lite0"), 2, 1, SIZE).model
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    x = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.eval()(x))


def test_variants_do_not_mix(build):
    ffa, _ = build("vit-tiny", r=R, variant="ffa")
    lora, _ = build("vit-tiny", r=R, variant="lora")
    with pytest.raises(ValueError, match=r"unexpected .*lora_A.*lora\.variant=ffa"):
        load_adapter_state_dict(ffa, adapter_state_dict(lora))
    with pytest.raises(ValueError, match=r"missing .*lora_A.*lora\.variant=lora"):
        load_adapter_state_dict(lora, adapter_state_dict(ffa))
