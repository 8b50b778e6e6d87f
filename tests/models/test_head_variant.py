"""``lora.variant: head``: a linear probe of the frozen backbone through the same pipeline.

Only the new head trains and travels; the adapter layers stay exactly the base layers (B = 0,
frozen); the activation cache then covers every stage but the head.
"""

import numpy as np
import torch

from fedfm.config import ConfigError, LoraConfig, ModelConfig, PrivacyConfig, TrainConfig, load_config
from fedfm.data.types import Split
from fedfm.models import ModelSpec, adapter_state_dict, build_model
from fedfm.models.stages import model_stages
from fedfm.privacy.accountant import SiteAccountant
from fedfm.training.activation_cache import prefix_length
from fedfm.training.local import train_round

import pytest


def _model(variant: str):
    return build_model(ModelSpec(ModelConfig(backbone="vit-tiny", pretrained=False), LoraConfig(r=2, variant=variant), 2, 1, 16))[0]


def test_only_the_head_trains_and_is_exchanged():
    model = _model("head")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("classification_head" in n and "modules_to_save" in n for n in trainable)
    keys = list(adapter_state_dict(model))
    assert keys and not any("lora_" in k for k in keys)
    assert len(keys) < len(adapter_state_dict(_model("lora")))


def test_the_cache_covers_every_stage_but_the_head():
    model = _model("head")
    stages = model_stages(model)
    assert prefix_length(model) == len(stages) - 1 and stages[-1].name == "head"


def test_a_dp_round_moves_the_head_only():
    model = _model("head")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    split = Split(rng.random((24, 1, 16, 16), dtype=np.float32), rng.integers(0, 2, 24).astype(np.int64))
    train_round(model, split, TrainConfig(batch_size=8, lr=1e-2), PrivacyConfig(noise_multiplier=1.0, accountant="rdp"),
                SiteAccountant("rdp"), 1.0, seed=0)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n


def test_head_variant_refuses_personal_lora_b_and_site_ranks():
    with pytest.raises(ConfigError, match="lora.personal=lora_B needs an adapter that trains"):
        load_config(None, ["lora.variant=head", "lora.personal=lora_B"])
    with pytest.raises(ConfigError, match="lora.site_ranks needs lora.variant=lora"):
        load_config(None, ["lora.variant=head", "lora.site_ranks={site-0: 4}"])
