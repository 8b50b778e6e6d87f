import numpy as np
import pytest

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.partition import (
    dirichlet_partition,
    iid_partition,
    natural_partition,
    partition_indices,
)


def assert_partition(parts: list[np.ndarray], n: int, num_sites: int) -> None:
    assert len(parts) == num_sites
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n, "indices must be disjoint and cover everything"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(p) > 0 for p in parts)


def labels_of(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def site_distributions(parts, labels, k):
    return np.stack([np.bincount(labels[p], minlength=k) / len(p) for p in parts])


def test_iid_disjoint_covering_deterministic():
    parts = iid_partition(103, 4, seed=1)
    assert_partition(parts, 103, 4)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    again = iid_partition(103, 4, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = iid_partition(103, 4, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    salted = iid_partition(103, 4, seed=1, salt=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, salted))


def test_iid_too_few_examples():
    with pytest.raises(DataError, match="data.num_sites=5"):
        iid_partition(3, 5, seed=0)


def test_dirichlet_disjoint_covering_deterministic():
    labels = labels_of(500, 3)
    parts = dirichlet_partition(labels, 4, alpha=0.5, seed=3, min_size=5)
    assert_partition(parts, 500, 4)
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(labels, 4, alpha=0.5, seed=3, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(labels, 4, alpha=0.5, seed=4, min_size=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_label_skew_depends_on_alpha():
    labels = labels_of(3000, 4)
    glob = np.bincount(labels, minlength=4) / len(labels)

    def skew(alpha: float) -> float:
        parts = dirichlet_partition(labels, 5, alpha=alpha, seed=0, min_size=2)
        dists = site_distributions(parts, labels, 4)
        return float(np.mean(0.5 * np.abs(dists - glob).sum(axis=1)))  # mean total variation

    assert skew(0.1) > 0.3
    assert skew(1000.0) < 0.05


def test_dirichlet_keeps_site_label_mix_across_salts():
    labels = labels_of(4000, 2)
    train = dirichlet_partition(labels[:3000], 3, alpha=0.3, seed=7, salt=0)
    test = dirichlet_partition(labels[3000:], 3, alpha=0.3, seed=7, salt=2)
    d_train = site_distributions(train, labels[:3000], 2)
    d_test = site_distributions(test, labels[3000:], 2)
    assert np.abs(d_train - d_test).max() < 0.1
    assert np.ptp(d_train[:, 0]) > 0.2  # and the mixes really differ between sites


def test_dirichlet_impossible_min_size_raises():
    labels = labels_of(12, 2)
    with pytest.raises(DataError, match="data.num_sites=5"):
        dirichlet_partition(labels, 5, alpha=0.5, seed=0, min_size=3)
    labels = labels_of(40, 2)
    with pytest.raises(DataError, match="data.alpha=0.001"):
        dirichlet_partition(labels, 8, alpha=0.001, seed=0, min_size=4)


def test_natural_partition_follows_ids():
    ids = np.array([2, 0, 1, 1, 0, 2, 2])
    parts = natural_partition(ids, 3)
    assert_partition(parts, 7, 3)
    for s, p in enumerate(parts):
        assert np.all(ids[p] == s)
    assert parts[2].tolist() == [0, 5, 6]


def test_natural_partition_errors_name_the_problem():
    with pytest.raises(DataError, match="site id 3 outside 0..2"):
        natural_partition(np.array([0, 1, 2, 3]), 3)
    with pytest.raises(DataError, match="site 1 has no examples"):
        natural_partition(np.array([0, 2, 2, 0]), 3)


def test_partition_indices_dispatch():
    labels = labels_of(300, 2)
    cfg = DataConfig(num_sites=3, partition="iid", seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(partition_indices(labels, cfg), iid_partition(300, 3, 5)))
    cfg = DataConfig(num_sites=3, partition="dirichlet", alpha=0.2, seed=5)
    assert_partition(partition_indices(labels, cfg), 300, 3)
    cfg = DataConfig(source="medmnist", path="x.npz", num_sites=2, partition="natural")
    ids = np.arange(300) % 2
    parts = partition_indices(labels, cfg, site_ids=ids)
    assert np.all(ids[parts[1]] == 1)
    with pytest.raises(DataError, match="data.partition=natural"):
        partition_indices(labels, cfg)
