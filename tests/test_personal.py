"""Personalization (lora.personal): a site keeps its own head or B from round to round."""

import pytest
import torch

from fedfm.config import load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict
from fedfm.personal import PersonalState, is_personal
from fedfm.site import Site

FAST = [
    "data.num_sites=2", "data.samples_per_site=90", "data.image_size=16", "federation.rounds=3",
    "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
]


@pytest.mark.parametrize("mode, marker", [("head", "classification_head."), ("lora_B", ".lora_B.")])
def test_a_site_starts_each_round_from_its_own_personal_tensors(tmp_path, mode, marker):
    config = load_config(None, [*FAST, f"lora.personal={mode}"])
    global_state = adapter_state_dict(build_global_model(config))
    site = Site(config, 0, tmp_path / "ledger")
    first = site.train(global_state, 1).adapter
    personal = [k for k in first if is_personal(k, mode)]
    assert personal and all(marker in k for k in personal)
    assert (tmp_path / "ledger" / "personal" / "site-0-round-0001.safetensors").is_file()

    # round 2 starts from the global adapter with this site's own personal tensors from round 1
    started = site.personal.apply(global_state, before=2)
    for key in global_state:
        expected = first[key] if key in personal else global_state[key]
        assert torch.equal(started[key], expected), key
    second = site.train(global_state, 2).adapter
    assert set(second) == set(global_state)  # the whole adapter still travels

    # a resumed round 2 reads the state after round 1, not the one round 2 wrote
    assert torch.equal(site.personal.latest(before=2)[personal[0]], first[personal[0]])
    assert torch.equal(site.personal.latest()[personal[0]], second[personal[0]])

    # the personalized evaluation uses the site's own tensors, the global one does not
    own = site.evaluate(global_state, "test", personal=True)
    plain = site.evaluate(global_state, "test")
    assert not torch.allclose(torch.as_tensor(own.probs), torch.as_tensor(plain.probs))


def test_without_personalization_nothing_is_kept(tmp_path):
    config = load_config(None, FAST)
    site = Site(config, 0, tmp_path / "ledger")
    site.train(adapter_state_dict(build_global_model(config)), 1)
    assert not (tmp_path / "ledger" / "personal").exists()


def test_personal_state_from_another_model_is_refused_with_the_fix(tmp_path):
    state = PersonalState(tmp_path, "site-0", "head")
    state.save(1, {"other.head.weight": torch.ones(2), "x.lora_A.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="move the folder away"):
        state.apply({"net.head.weight": torch.zeros(2)})
