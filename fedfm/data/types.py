"""Plain containers for one site's data: float32 images in [0, 1] plus int64 labels.

Images are channels-first: (N, C, H, W) for 2D images or (N, C, D, H, W) for 3D volumes
(D = H = W = ``data.image_size`` once a loader has prepared them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    """One split of one site; arrays are made read-only because loaders cache them."""

    images: np.ndarray  # float32, (N, C, H, W) or (N, C, D, H, W), values in [0, 1], resized to cfg.image_size
    labels: np.ndarray  # int64, (N,)

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or self.images.dtype != np.float32:
            raise ValueError(
                f"Split.images must be float32 (N, C, H, W) or (N, C, D, H, W), got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise ValueError(f"Split.labels must be int64 (N,), got {self.labels.dtype} {self.labels.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")
        self.images.setflags(write=False)
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def spatial_dims(self) -> int:
        """2 for (N, C, H, W) images, 3 for (N, C, D, H, W) volumes."""
        return int(self.images.ndim - 2)


@dataclass(frozen=True)
class SiteData:
    """Everything one federated site holds: its train/val/test splits and how it was made."""

    site_id: int
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    channels: int  # C of the images (1 gray, 3 RGB)
    shift: dict[str, float] = field(default_factory=dict)  # acquisition shift applied (empty if none)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes (the same for every split of a site)."""
        return self.train.spatial_dims


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data before seeing it."""

    num_classes: int
    channels: int
    image_size: int
    site_names: tuple[str, ...]
    spatial_dims: int = 2  # 2: inputs (N, C, S, S); 3: inputs (N, C, S, S, S) with S = image_size


def label_counts(split: Split, num_classes: int) -> list[int]:
    """Number of examples of each class in ``split`` (length ``num_classes``)."""
    return np.bincount(split.labels, minlength=num_classes)[:num_classes].astype(int).tolist()
