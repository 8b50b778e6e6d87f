"""The federation core computes what Flower's strategies computed before it replaced them:
FedAvg bit for bit, the client-level clipping, and the RDP epsilon of client-level releases."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from fedfm.federation.aggregate import clip_update
from fedfm.models.method import weighted_average
from fedfm.privacy.client_level import ClientLevelAccountant


def _adapters(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.lora_A.weight": torch.randn(8, 96, generator=g), "a.lora_B.weight": torch.randn(96, 8, generator=g) / 7,
             "head.weight": torch.randn(2, 96, generator=g)} for _ in range(n)]


def test_weighted_average_is_flowers_fedavg_bit_for_bit():
    adapters, weights = _adapters(5), [137, 61, 402, 9, 250]
    records = [RecordDict({"arrays": ArrayRecord(a), "metrics": MetricRecord({"num-examples": w})})
               for a, w in zip(adapters, weights)]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = weighted_average(adapters, [float(w) for w in weights])
    for key in flower:
        assert ours[key].dtype == flower[key].dtype and torch.equal(ours[key], flower[key])


def test_clipping_is_flowers_fixed_clipping():
    current, site = _adapters(2, seed=1)
    flower = [site[k].numpy().copy() for k in site]
    compute_clip_model_update(flower, [current[k].numpy() for k in current], 0.7)
    ours = clip_update(site, current, 0.7)
    for key, expected in zip(site, flower):
        assert np.array_equal(ours[key].numpy(), expected)


@pytest.mark.parametrize("z, releases", [(0.8, 3), (1.7, 20)])
def test_client_level_epsilon_is_flowers_rdp_accountant(z, releases):
    flower = RdpAccountant(PrivacyConfig(target_delta=1e-3, population_size=4,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.NO_AMPLIFICATION))
    ours = ClientLevelAccountant(1e-3)
    for _ in range(releases):
        flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=4, population_size=4))
        ours.compose(z)
    assert ours.epsilon() == flower.get_privacy_spent().epsilon
