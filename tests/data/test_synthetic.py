import time

import numpy as np

from fedfm.config import DataConfig
from fedfm.data import label_counts
from fedfm.data.synthetic import balanced_labels, load_synthetic_sites, render_images


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    return float((ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_sites_shapes_sizes_and_balance():
    cfg = DataConfig(num_sites=3, samples_per_site=100, image_size=32, val_fraction=0.1, test_fraction=0.2)
    sites = load_synthetic_sites(cfg)
    assert [s.site_id for s in sites] == [0, 1, 2]
    for s in sites:
        assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
        assert s.train.images.shape == (70, 1, 32, 32) and s.train.images.dtype == np.float32
        assert s.train.labels.dtype == np.int64
        assert 0.0 <= s.train.images.min() and s.train.images.max() <= 1.0
        assert s.channels == 1 and s.num_classes == 2
        assert abs(label_counts(s.train, 2)[0] - 35) <= 6  # iid: balanced-ish
        assert abs(label_counts(s.test, 2)[0] - 10) <= 1  # stratified split


def test_deterministic_under_seed():
    cfg = DataConfig(num_sites=2, samples_per_site=40, seed=3)
    a, b = load_synthetic_sites(cfg), load_synthetic_sites(cfg)
    for x, y in zip(a, b):
        assert np.array_equal(x.train.images, y.train.images)
        assert np.array_equal(x.test.labels, y.test.labels)
        assert x.shift == y.shift
    c = load_synthetic_sites(cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(a[0].train.images, c[0].train.images)


def test_label_is_the_number_of_lesions():
    """Flipping labels with the same random stream only adds or removes lesion blobs."""
    for k in (2, 4):
        base = np.arange(64) % k
        flipped = (k - 1) - base  # same max, so the same random draws
        x0 = render_images(base, 32, np.random.default_rng(0))
        x1 = render_images(flipped, 32, np.random.default_rng(0))
        delta = (x1 - x0).reshape(64, -1).sum(axis=1)
        more = flipped > base
        assert np.all(delta[more] > 0.5)
        assert np.all(delta[~more & (flipped != base)] < -0.5)
        assert np.all(delta[flipped == base] == 0)
        # the difference is local (a blob), not a global brightness change
        changed = (np.abs(x1 - x0) > 0.02).reshape(64, -1).mean(axis=1)
        assert changed[flipped != base].max() < 0.3


def test_task_is_learnable_but_not_trivial_for_a_linear_probe():
    rng = np.random.default_rng(1)
    y = balanced_labels(3000, 2, rng)
    x = render_images(y, 32, rng).reshape(3000, -1).astype(np.float64)
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    mu = xtr.mean(axis=0)
    w = np.linalg.solve((xtr - mu).T @ (xtr - mu) + 10.0 * np.eye(x.shape[1]), (xtr - mu).T @ (ytr - ytr.mean()))
    score = auroc((xte - mu) @ w, yte)
    assert 0.6 < score < 0.9


def test_site_shift_makes_site_statistics_differ():
    shifted = load_synthetic_sites(DataConfig(num_sites=4, samples_per_site=100, site_shift=1.0))
    plain = load_synthetic_sites(DataConfig(num_sites=4, samples_per_site=100, site_shift=0.0))
    shifted_means = [s.train.images.mean() for s in shifted]
    plain_means = [s.train.images.mean() for s in plain]
    assert np.ptp(shifted_means) > 0.05
    assert np.ptp(plain_means) < 0.02
    assert all(s.shift == {} for s in plain)
    assert len({tuple(sorted(s.shift.items())) for s in shifted}) == 4


def test_dirichlet_gives_label_skew():
    cfg = DataConfig(num_sites=4, samples_per_site=150, partition="dirichlet", alpha=0.1, num_classes=3)
    sites = load_synthetic_sites(cfg)
    assert sum(len(s.train) + len(s.val) + len(s.test) for s in sites) == 600
    fractions = []
    for s in sites:
        counts = np.bincount(np.concatenate([s.train.labels, s.val.labels, s.test.labels]), minlength=3)
        fractions.append(counts / counts.sum())
    assert np.ptp(np.array(fractions), axis=0).max() > 0.5


def test_image_size_and_generation_speed():
    sites = load_synthetic_sites(DataConfig(num_sites=1, samples_per_site=20, image_size=96))
    assert sites[0].train.images.shape[1:] == (1, 96, 96)
    start = time.perf_counter()
    render_images(balanced_labels(3000, 2, np.random.default_rng(0)), 32, np.random.default_rng(0))
    assert time.perf_counter() - start < 1.5
