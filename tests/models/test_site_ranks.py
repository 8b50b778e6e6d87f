"""Per-site LoRA ranks (lora.site_ranks): stacking the sites' factors equals the dense average."""

import pytest
import torch

from fedfm.config import ConfigError, load_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, load_adapter_state_dict
from fedfm.models.spec import ModelSpec
from fedfm.models.stacking import compress, dense_delta, global_model, layer_ranks, site_model, stack
from fedfm.site import Site

RANKS = {"site-0": 4, "site-1": 8, "site-2": 16}
FAST = [
    "data.num_sites=3", "data.samples_per_site=90", "data.image_size=16", "federation.rounds=2",
    "train.batch_size=16", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
    "lora.site_ranks={site-0: 4, site-1: 8, site-2: 16}",
]


def _merged_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in model.merge_and_unload().state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "vit-tiny"])
def test_stacked_aggregate_of_ranks_4_8_16_equals_the_dense_average_of_the_sites_models(tmp_path, backbone):
    config = load_config(None, [*FAST, f"model.backbone={backbone}", "model.pretrained=false"])
    global_state = adapter_state_dict(build_global_model(config))
    sites = [Site(config, i, tmp_path / "ledger") for i in range(3)]
    replies = [site.train(global_state, 1) for site in sites]
    for site, reply in zip(sites, replies):  # each site trained its own rank
        assert set(layer_ranks(reply.adapter).values()) == {RANKS[site.name]}
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in reply.adapter.items())

    weights = [float(r.metrics["num-examples"]) for r in replies]
    stacked = stack(global_state, [(r.adapter, w) for r, w in zip(replies, weights)], config.lora.alpha)

    # dense: merge each site's trained adapter into its own copy of the model, then average the weights
    spec = ModelSpec(config.model, config.lora, 2, 1, config.data.image_size)
    dense: dict[str, torch.Tensor] = {}
    for site, reply, w in zip(sites, replies, weights):
        model = site_model(spec, RANKS[site.name], global_state)
        load_adapter_state_dict(model, reply.adapter)
        for key, value in _merged_weights(model).items():
            dense[key] = dense.get(key, 0) + value * (w / sum(weights))
    aggregated = _merged_weights(global_model(spec, stacked))
    assert set(aggregated) == set(dense)
    for key in dense:
        torch.testing.assert_close(aggregated[key], dense[key], rtol=0, atol=1e-6, msg=key)
    # and the sites start round 2 from exactly that model
    start = site_model(spec, 4, stacked)
    for key, value in _merged_weights(start).items():
        torch.testing.assert_close(value, dense[key], rtol=0, atol=1e-6, msg=key)


def test_compress_keeps_the_product_and_bounds_the_rank():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, 1, 1, generator=gen)  # conv 1x1 factors: rank 40 > min(out 24, in 12)
    b = torch.randn(24, 40, 1, 1, generator=gen)
    new_a, new_b = compress(a, b)
    assert new_a.shape == (12, 12, 1, 1) and new_b.shape == (24, 12, 1, 1)
    before = b.reshape(24, 40).double() @ a.reshape(40, 12).double()
    after = new_b.reshape(24, 12).double() @ new_a.reshape(12, 12).double()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4 * before.abs().max().item())
    small_a, small_b = torch.randn(3, 12, generator=gen), torch.randn(24, 3, generator=gen)
    same_a, same_b = compress(small_a, small_b)
    assert torch.equal(same_a, small_a) and torch.equal(same_b, small_b)


def test_stack_max_rank_keeps_the_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 20, generator=gen), torch.randn(30, 10, generator=gen)
    new_a, new_b = compress(a, b, max_rank=4)
    assert new_a.shape == (4, 20) and new_b.shape == (30, 4)
    product = (b.double() @ a.double())
    singular = torch.linalg.svdvals(product)
    error = torch.linalg.matrix_norm(product - new_b.double() @ new_a.double())
    # Eckart-Young: the Frobenius error of the best rank-4 approximation is the norm of the dropped values
    torch.testing.assert_close(error, singular[4:].norm(), rtol=1e-4, atol=1e-6)


def test_stack_weights_each_site_by_its_share_and_its_scale():
    a1, b1 = torch.randn(2, 5), torch.randn(3, 2)
    a2, b2 = torch.randn(4, 5), torch.randn(3, 4)
    key = "base_model.model.layer"
    zero = {f"{key}.lora_A.weight": torch.zeros(1, 5), f"{key}.lora_B.weight": torch.zeros(3, 1), "head": torch.zeros(2)}
    out = stack(zero, [({f"{key}.lora_A.weight": a1, f"{key}.lora_B.weight": b1, "head": torch.ones(2)}, 1.0),
                       ({f"{key}.lora_A.weight": a2, f"{key}.lora_B.weight": b2, "head": torch.full((2,), 4.0)}, 3.0)],
                alpha=8.0)
    expected = 0.25 * (8 / 2) * b1 @ a1 + 0.75 * (8 / 4) * b2 @ a2
    torch.testing.assert_close(dense_delta(out)["layer"], expected.double(), rtol=0, atol=1e-5)
    assert out[f"{key}.lora_A.weight"].shape == (3, 5)  # ranks 2 + 4 = 6 > min(out 3, in 5): recompressed to 3
    torch.testing.assert_close(out["head"], torch.full((2,), 3.25))


@pytest.mark.parametrize("items, words", [
    (["lora.site_ranks={site-0: 4}", "lora.variant=ffa"], "lora.variant=lora"),
    (["lora.site_ranks={hospital-a: 4}"], "site-0, site-1"),
    (["lora.site_ranks={site-0: 0}"], "positive integer"),
    (["lora.site_ranks={site-7: 4}"], "data.num_sites=3"),
    (["lora.site_ranks={site-0: 4}", "privacy.level=client"], "privacy.level=sample"),
    (["lora.site_ranks={site-0: 4}", "lora.personal=lora_B"], "lora.personal=head"),
    (["lora.stack_max_rank=8"], "only applies with lora.site_ranks"),
])
def test_site_ranks_config_errors_name_the_field_and_the_fix(items, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("?", r"\?")):
        load_config(None, items)


def test_a_site_training_alone_with_its_own_rank_stacks_its_rounds(tmp_path):
    """The local-only baseline under lora.site_ranks: a federation of one, stacked like the server does."""
    from fedfm.baselines import evaluate_on, train_alone

    config = load_config(None, [*FAST, "model.pretrained=false"])
    site = Site(config, 1, tmp_path / "ledger")  # rank 8
    adapter, history, stopped = train_alone(site, rounds=2)
    assert stopped is None and [h["round"] for h in history] == [1, 2]
    ranks = layer_ranks(adapter)
    assert max(ranks.values()) == 2 * 8  # two rounds of rank 8, stacked at scale 1
    evaluation = evaluate_on(site, adapter, site.data)
    assert 0.0 <= evaluation.metrics["auroc"] <= 1.0 and len(evaluation.probs) == len(site.data.test)
