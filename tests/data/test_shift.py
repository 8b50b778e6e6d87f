import time

import numpy as np

from fedfm.data.shift import apply_shift, site_shift_params


def images(n: int = 64, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.8, (n, 1, size, size)).astype(np.float32)


def test_zero_strength_is_identity():
    assert site_shift_params(1, 0.0, seed=0) == {}
    x = images()
    assert np.array_equal(apply_shift(x, {}, seed=3), x)


def test_params_deterministic_distinct_and_scaled():
    a = site_shift_params(1, 1.0, seed=0)
    assert a == site_shift_params(1, 1.0, seed=0)
    assert a != site_shift_params(2, 1.0, seed=0)
    assert a != site_shift_params(1, 1.0, seed=1)
    half = site_shift_params(1, 0.5, seed=0)
    assert np.isclose(np.log(half["gamma"]), 0.5 * np.log(a["gamma"]))
    assert np.isclose(half["offset"], 0.5 * a["offset"])
    assert half["noise_std"] < a["noise_std"]


def test_apply_shift_deterministic_clipped_and_changes_images():
    x = images()
    p = site_shift_params(0, 1.0, seed=0)
    y = apply_shift(x, p, seed=11)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.array_equal(y, apply_shift(x, p, seed=11))
    assert np.abs(y - x).mean() > 0.01
    z = apply_shift(x, p, seed=12)  # other noise, same bias field / gamma / gain
    assert not np.array_equal(y, z)
    assert abs(float(y.mean() - z.mean())) < 0.005


def test_sites_get_different_intensity_statistics():
    x = images(n=200)
    means = [apply_shift(x, site_shift_params(s, 1.0, seed=0), seed=s).mean() for s in range(4)]
    assert np.ptp(means) > 0.03
    weak = [apply_shift(x, site_shift_params(s, 0.1, seed=0), seed=s).mean() for s in range(4)]
    assert np.ptp(weak) < np.ptp(means)


def test_apply_shift_is_fast():
    x = images(n=2000, size=64)
    p = site_shift_params(2, 1.0, seed=0)
    apply_shift(x[:2], p, seed=0)  # warm up MONAI import
    start = time.perf_counter()
    apply_shift(x, p, seed=0)
    assert time.perf_counter() - start < 2.0
