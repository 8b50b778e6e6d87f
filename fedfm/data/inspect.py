"""The data's own facts, read before a run starts: classes, channels, image size, sites, split sizes, name.

:func:`inspect_data` opens the data a config points at (a MedMNIST .npz's headers and labels, a
folder's tree and image headers; synthetic data is described by its config) and checks it the way
the loaders will, so a problem is one :class:`DataError` line before anything is started or
written. No image is decoded. The facts say what the data holds; :mod:`fedfm.data.resolve`
compares them with what the config declares.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfm.config import DataConfig
from fedfm.data.types import DatasetInfo

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class DataFacts:
    """What the data holds, as read from it (synthetic: as the config generates it)."""

    dataset: str  # what reports call it: the .npz file's stem, the folder's name, or "synthetic"
    where: str  # the data in a message: "data.path '/x/breastmnist.npz'"
    num_classes: int
    classes_from: str  # how the data shows its classes, for a message: "has labels up to 4"
    channels: int  # 1 gray, 3 RGB
    spatial_dims: int  # 2 images, 3 volumes
    image_size: int  # what the model sees (data.image_size; the data is resized to it)
    stored_shape: tuple[int, ...] | None  # one stored image or volume, without channels (None: sizes vary)
    site_names: tuple[str, ...]
    split_sizes: dict[str, dict[str, int]]  # site name -> {"train": n, "val": n, "test": n}

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(self.num_classes, self.channels, self.image_size, self.site_names, self.spatial_dims)

    def summary(self) -> str:
        """One line for the console: name, classes, channels, sizes and each site's split sizes."""
        stored = "x".join(map(str, self.stored_shape)) if self.stored_shape else "various sizes"
        size = f"{self.image_size}^3" if self.spatial_dims == 3 else f"{self.image_size} px"
        sites = ", ".join(f"{name} {n['train']}/{n['val']}/{n['test']}" for name, n in self.split_sizes.items())
        return (f"data {self.dataset}: {self.num_classes} classes, {self.channels} channel(s), {stored} -> {size}; "
                f"train/val/test {sites}")


def inspect_data(cfg: DataConfig) -> DataFacts:
    """The facts of the data ``cfg`` points at, checked; one :class:`DataError` line for a problem."""
    if cfg.source == "synthetic":
        return synthetic_facts(cfg)
    if cfg.source == "medmnist":
        from fedfm.data.inspect_medmnist import medmnist_facts

        return medmnist_facts(cfg)
    from fedfm.data.inspect_folder import folder_facts

    return folder_facts(cfg)


def synthetic_facts(cfg: DataConfig) -> DataFacts:
    """Synthetic data is what its config says; the split sizes come from the same partition as the loader's."""
    import numpy as np

    from fedfm.data.partition import partition_indices
    from fedfm.data.splits import split_counts
    from fedfm.data.synthetic import SEED_SALT, balanced_labels
    from fedfm.protocol import site_name

    num_classes = int(cfg.num_classes or 2)
    labels = balanced_labels(cfg.num_sites * cfg.samples_per_site, num_classes, np.random.default_rng([cfg.seed, SEED_SALT]))
    parts = partition_indices(labels, cfg, num_classes=num_classes)
    names = tuple(site_name(s) for s in range(cfg.num_sites))
    sizes = {}
    for name, idx in zip(names, parts):
        train, val, test = split_counts(len(idx), cfg.val_fraction, cfg.test_fraction)
        sizes[name] = {"train": train, "val": val, "test": test}
    dims = cfg.spatial_dims or 2
    return DataFacts(SYNTHETIC, "synthetic data (data.source=synthetic)", num_classes, "generates them", 1, dims,
                     cfg.image_size, (cfg.image_size,) * dims, names, sizes)
