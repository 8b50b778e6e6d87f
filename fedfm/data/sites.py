"""Assemble a SiteData from a site's images: split by fractions if needed, then shift each split."""

from __future__ import annotations

import numpy as np

from fedfm.config import DataConfig
from fedfm.data.shift import apply_shift, site_shift_params
from fedfm.data.splits import stratified_split
from fedfm.data.types import SiteData, Split

SPLITS = ("train", "val", "test")
_SPLIT_SALT = 0x5B117
_NOISE_SALT = 0x0153


def _split_seed(cfg: DataConfig, site_id: int, split_index: int) -> int:
    """A per-(site, split) seed for the shift's noise."""
    return int(np.random.default_rng([cfg.seed, site_id, split_index, _NOISE_SALT]).integers(0, 2**31 - 1))


def site_from_splits(
    cfg: DataConfig,
    site_id: int,
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> SiteData:
    """SiteData from ready (images, labels) per split name; applies the site's acquisition shift."""
    shift = site_shift_params(site_id, cfg.site_shift, cfg.seed)
    made: dict[str, Split] = {}
    for i, split in enumerate(SPLITS):
        images, labels = splits[split]
        if shift:
            images = apply_shift(images, shift, _split_seed(cfg, site_id, i))
        made[split] = Split(np.ascontiguousarray(images, np.float32), np.asarray(labels, np.int64).copy())
    channels = int(made["train"].images.shape[1])
    return SiteData(site_id, name, made["train"], made["val"], made["test"], num_classes, channels, shift)


def build_site(
    cfg: DataConfig, site_id: int, name: str, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> SiteData:
    """SiteData from one pool of a site's examples, split by ``cfg.val_fraction``/``cfg.test_fraction``."""
    rng = np.random.default_rng([cfg.seed, site_id, _SPLIT_SALT])
    parts = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, rng)
    splits = {split: (images[idx], labels[idx]) for split, idx in zip(SPLITS, parts)}
    return site_from_splits(cfg, site_id, name, splits, num_classes)
