import numpy as np
import pytest

from fedfm.config import DataConfig
from fedfm.data import DataError, Split, dataset_info, label_counts, load_site, load_sites
from fedfm.data.resize import prepare_images, resize_images


def test_load_sites_is_cached_and_read_only():
    cfg = DataConfig(num_sites=2, samples_per_site=30, seed=123)
    first = load_sites(cfg)
    again = load_sites(DataConfig(num_sites=2, samples_per_site=30, seed=123))
    assert first[0] is again[0]
    assert load_site(cfg, 1) is first[1]
    with pytest.raises(ValueError):
        first[0].train.images[0, 0, 0, 0] = 1.0
    other = load_sites(DataConfig(num_sites=2, samples_per_site=30, seed=124))
    assert other[0] is not first[0]


def test_load_site_out_of_range():
    with pytest.raises(DataError, match="data.num_sites=2"):
        load_site(DataConfig(num_sites=2, samples_per_site=30), 2)


def test_dataset_info_synthetic():
    info = dataset_info(DataConfig(num_sites=3, num_classes=4, image_size=48))
    assert (info.num_classes, info.channels, info.image_size) == (4, 1, 48)
    assert info.site_names == ("site-0", "site-1", "site-2")


def test_split_and_label_counts():
    split = Split(np.zeros((5, 1, 8, 8), np.float32), np.array([0, 2, 2, 1, 2], np.int64))
    assert len(split) == 5
    assert label_counts(split, 4) == [1, 1, 3, 0]
    with pytest.raises(ValueError):
        Split(np.zeros((5, 1, 8, 8), np.float32), np.zeros(4, np.int64))


def test_resize_constant_and_antialias():
    up = prepare_images(np.full((2, 8, 8), 51, np.uint8), 32)
    assert up.shape == (2, 1, 32, 32) and np.allclose(up, 0.2)
    stripes = np.zeros((1, 1, 48, 48), np.float32)
    stripes[..., ::2, :] = 1.0
    down = resize_images(stripes, 16)  # plain bilinear would give alternating 0/1 rows here
    assert np.allclose(down, 0.5, atol=0.1), "antialiasing averages fine stripes instead of aliasing them"
    rgb = prepare_images(np.zeros((3, 10, 10, 3), np.uint8), 16)
    assert rgb.shape == (3, 3, 16, 16)
