"""The facts of a MedMNIST .npz, from its array headers, labels and site ids (no image is loaded).

The checks are the loader's own (:mod:`fedfm.data.medmnist`), run on the headers, plus those only
a run as a whole can fail: at least two classes, every class in ``train_labels``, and the
partition across sites computed on the labels, so a split too small for the sites fails now.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.inspect import DataFacts
from fedfm.data.medmnist import (
    check_labels_fit,
    classes_found,
    natural_site_ids,
    require_keys,
    resolve_npz,
    site_names_of,
    spatial_dims_of,
    split_labels,
)
from fedfm.data.npz import ArrayHeader, read_arrays, read_headers
from fedfm.data.partition import natural_partition, partition_indices
from fedfm.data.sites import SPLITS


def medmnist_facts(cfg: DataConfig) -> DataFacts:
    npz = resolve_npz(cfg)
    headers = read_headers(npz)
    require_keys(headers, npz)
    small = [f"{s}_labels" for s in SPLITS]
    if cfg.partition == "natural":
        small += [f"{s}_sites" for s in SPLITS if f"{s}_sites" in headers]
        small += ["site_names"] if "site_names" in headers else []
    arrays: dict[str, np.ndarray | ArrayHeader] = {**headers, **read_arrays(npz, small)}
    labels = {s: split_labels(arrays, s, npz) for s in SPLITS}
    found = classes_found(labels, npz)
    check_labels_fit(cfg, found, npz)  # before the other class checks, as the loader does
    _check_classes(labels, found, npz)
    dims = spatial_dims_of(arrays, cfg, npz)
    channels = _channels(headers, dims, npz)
    site_ids = natural_site_ids(arrays, cfg, npz) if cfg.partition == "natural" else None
    names = site_names_of(arrays, cfg, npz)
    sizes: dict[str, dict[str, int]] = {name: {} for name in names}
    for salt, split in enumerate(SPLITS):
        if site_ids is not None:
            parts = natural_partition(site_ids[split], cfg.num_sites, what=f"{split}_sites of '{npz}'")
        else:
            parts = partition_indices(labels[split], cfg, salt=salt, num_classes=cfg.num_classes or found)
        for name, idx in zip(names, parts):
            sizes[name][split] = int(len(idx))
    stored = headers["train_images"].shape[1 : 1 + dims]
    return DataFacts(npz.stem, f"data.path '{npz}'", found, f"has labels up to {found - 1}", channels, dims,
                     cfg.image_size, tuple(stored), tuple(names), sizes)


def _check_classes(labels: dict[str, np.ndarray], found: int, npz: Path) -> None:
    if labels["train"].size == 0:
        raise DataError(f"data.path '{npz}' has no training images (train_labels is empty): give a file with a train split")
    if found < 2:
        raise DataError(
            f"data.path '{npz}' has one class only (every label is 0): a classification task needs at least 2; "
            "give a file with two or more classes"
        )
    missing = sorted(set(range(found)) - set(np.unique(labels["train"]).tolist()))
    if missing:
        raise DataError(
            f"data.path '{npz}' has labels up to {found - 1} but no train_labels of class "
            f"{', '.join(map(str, missing[:10]))}: the model cannot learn a class it never sees; "
            "give it training examples or renumber the classes 0..K-1 without gaps"
        )


def _channels(headers: dict[str, ArrayHeader], dims: int, npz: Path) -> int:
    """1 or 3: the trailing channel axis of (N, *spatial, C) arrays, 1 for (N, *spatial); the same in every split."""
    found = {s: (headers[f"{s}_images"].shape[1 + dims :] or (1,))[0] for s in SPLITS}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{s}_images {c}" for s, c in found.items())
        raise DataError(
            f"data.path '{npz}' mixes channels across splits ({listed}): store every split gray or every split RGB"
        )
    return int(found["train"])
