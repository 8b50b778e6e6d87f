"""One adaptation-method object: it builds the server's and a site's model, combines updates,
checks a site's update and names the spec the global adapter is saved with."""

import torch

from fedfm.config import LoraConfig, ModelConfig
from fedfm.models import ModelSpec, adapter_state_dict, build_model
from fedfm.models import cache
from fedfm.models.method import SharedAdapter, StackedRanks, adapter_method, weighted_average
from fedfm.models.stacking import global_lora_config, layer_ranks, stack

MODEL = ModelConfig(backbone="vit-tiny", pretrained=False)


def _spec(**lora):
    return ModelSpec(MODEL, LoraConfig(r=2, **lora), 2, 1, 16)


def _like(state, value):
    return {k: torch.full_like(v, value) for k, v in state.items()}


def test_the_spec_picks_the_method():
    assert isinstance(adapter_method(_spec()), SharedAdapter)
    assert isinstance(adapter_method(_spec(site_ranks={"site-0": 2, "site-1": 4})), StackedRanks)


def test_shared_adapter_builds_averages_and_saves_as_configured():
    spec = _spec()
    method = adapter_method(spec)
    initial = method.initial_state()
    reference, _ = build_model(spec)
    assert all(torch.equal(initial[k], v) for k, v in adapter_state_dict(reference).items())
    combined = method.combine(initial, [(_like(initial, 1.0), 30.0), (_like(initial, 3.0), 10.0)])
    assert all(torch.allclose(v, torch.full_like(v, 1.5)) for v in combined.values())
    one = _like(initial, 0.123)
    assert all(torch.equal(method.combine(initial, [(one, 1.0)])[k], one[k]) for k in one)  # a federation of one
    site = adapter_state_dict(method.site_model("site-0", combined))
    assert all(torch.equal(site[k], combined[k]) for k in combined)
    assert method.saved_spec == spec and method.update_problem("site-0", one) is None
    assert not method.update_size_varies


def test_stacked_ranks_give_each_site_its_rank_and_stack_exactly():
    spec = _spec(site_ranks={"site-0": 2, "site-1": 4})
    method = adapter_method(spec)
    initial = method.initial_state()
    assert set(layer_ranks(initial).values()) == {1}
    updates = []
    for site, rank in (("site-0", 2), ("site-1", 4)):
        trained = adapter_state_dict(method.site_model(site, initial))
        assert set(layer_ranks(trained).values()) == {rank}
        updates.append(({k: v + 0.01 for k, v in trained.items()}, 10.0 * rank))
    combined = method.combine(initial, updates)
    expected = stack(initial, updates, spec.lora.alpha, spec.lora.stack_max_rank)
    assert all(torch.equal(combined[k], expected[k]) for k in expected)
    assert "lora.site_ranks gives site-1 rank 4" in method.update_problem("site-1", updates[0][0])
    assert method.saved_spec.lora == global_lora_config(spec.lora) and method.update_size_varies
    model = method.global_model(combined)
    assert all(torch.equal(adapter_state_dict(model)[k], combined[k]) for k in combined)


def test_weighted_average_accumulates_in_the_adapters_dtype():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float32)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float32)}
    out = weighted_average([a, b], [1.0, 3.0])
    assert out["w"].dtype == torch.float32 and torch.allclose(out["w"], torch.tensor([2.5, 4.25]))


def test_one_cache_holds_backbones_and_adapted_models():
    cache.clear_model_cache()
    spec = _spec(site_ranks={"site-0": 2})
    adapter_method(spec).site_model("site-0", adapter_method(spec).initial_state())
    build_model(_spec())
    assert {kind for kind, _ in cache._PRISTINE} == {"backbone", "peft"}
    cache.clear_model_cache()
    assert cache._PRISTINE == {}
