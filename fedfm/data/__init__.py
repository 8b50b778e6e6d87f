"""Federated medical imaging data: every source yields one ``SiteData`` per site.

Sources (``data.source``): ``synthetic`` (generated chest-X-ray-like images or chest-CT-like
volumes, label = number of lesions), ``medmnist`` (a MedMNIST 2D or 3D .npz by path or name,
official splits kept) and ``folder`` (``<root>/<site>/[<split>/]<class>/<image>``, 2D only).
Images come out float32 (N, C, S, S) in [0, 1], or (N, C, S, S, S) for 3D volumes
(``data.spatial_dims``; ``SiteData.spatial_dims`` says which), with S = data.image_size and
C = 1 (gray) or 3 (RGB); labels are int64. ``data.num_classes`` left out (None) is read from the
data. Before a run, :func:`fedfm.data.resolve.resolve_data` reads the data's facts
(:mod:`fedfm.data.inspect`), checks the config against them and fills in what it left out.
"""

from __future__ import annotations

import functools

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.types import DatasetInfo, SiteData, Split, label_counts
from fedfm.protocol import site_name

__all__ = [
    "DataError",
    "DatasetInfo",
    "SiteData",
    "Split",
    "dataset_info",
    "label_counts",
    "load_site",
    "load_sites",
]


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str) -> tuple[SiteData, ...]:
    cfg = DataConfig.model_validate_json(cfg_json)
    if cfg.source == "synthetic":
        from fedfm.data.synthetic import load_synthetic_sites as loader
    elif cfg.source == "medmnist":
        from fedfm.data.medmnist import load_medmnist_sites as loader
    else:
        from fedfm.data.folder import load_folder_sites as loader
    return tuple(loader(cfg))


def load_sites(cfg: DataConfig) -> list[SiteData]:
    """Every site's data for ``cfg``, deterministic; cached per process by the config's JSON.

    The arrays are shared with the cache and read-only: copy before changing them in place.
    """
    return list(_load_cached(cfg.model_dump_json()))


def load_site(cfg: DataConfig, site_id: int) -> SiteData:
    """One site's data (``0 <= site_id < data.num_sites``)."""
    if not 0 <= site_id < cfg.num_sites:
        raise DataError(f"site id {site_id} is outside 0..{cfg.num_sites - 1} for data.num_sites={cfg.num_sites}")
    return _load_cached(cfg.model_dump_json())[site_id]


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes, channels, image size, site names and spatial dims (synthetic: without generating anything)."""
    if cfg.source == "synthetic":
        names = tuple(site_name(s) for s in range(cfg.num_sites))
        return DatasetInfo(cfg.num_classes, 1, cfg.image_size, names, spatial_dims=cfg.spatial_dims or 2)
    sites = load_sites(cfg)
    first, names = sites[0], tuple(s.name for s in sites)
    return DatasetInfo(first.num_classes, first.channels, cfg.image_size, names, spatial_dims=first.spatial_dims)
