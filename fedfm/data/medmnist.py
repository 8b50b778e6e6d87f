"""MedMNIST ``.npz`` files (2D or 3D, any of them), read from ``data.path`` or downloaded by ``data.name``.

2D files hold (N, H, W) gray or (N, H, W, 3) RGB images; 3D files (e.g. organmnist3d,
nodulemnist3d, and their ``_64`` variants) hold (N, D, H, W) gray volumes with D = H = W (28 or
64). Which one a file is comes from its ``train_images`` shape by
:func:`fedfm.data.resize.raw_spatial_dims`; ``data.spatial_dims``, if set, must agree with it
(and is needed only for non-cubic volumes). Volumes come out (N, 1, S, S, S), S = data.image_size.

The official train/val/test splits are kept: each is partitioned across sites on its own, so a
site's train examples come only from ``train_images`` and so on. With ``data.partition=natural``
the file must carry ``train_sites``/``val_sites``/``test_sites`` (an int site id per image) and
may carry ``site_names``; ``data.num_sites`` must equal the number of distinct site ids.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
import zlib
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.npz import not_readable
from fedfm.data.partition import natural_partition, partition_indices
from fedfm.data.resize import prepare_images, raw_spatial_dims
from fedfm.data.sites import SPLITS, site_from_splits
from fedfm.data.types import SiteData
from fedfm.protocol import site_name

_SIZES = ("64", "128", "224")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MedmnistMissing(DataError):
    """data.name needs the medmnist package (its table of download URLs), which is not installed."""


def medmnist_info() -> dict[str, Any]:
    """The ``medmnist`` package's INFO table (name -> url, MD5, ...)."""
    try:
        from medmnist.info import INFO
    except ImportError:
        raise MedmnistMissing(
            "data.name needs the medmnist package to look up the download: pip install --no-deps medmnist, "
            "or give data.path (a MedMNIST .npz)"
        ) from None
    return INFO


def _known_names(info: dict[str, Any]) -> str:
    """The downloadable names, 2D and 3D, each group with the ``_<size>`` variants it offers."""
    groups = []
    for label, is_3d in (("2D", False), ("3D", True)):
        names = sorted(k for k in info if k.endswith("3d") == is_3d)
        if not names:
            continue
        sizes = [s for s in _SIZES if any(f"url_{s}" in info[k] for k in names)]
        variants = f" (or add {'/'.join('_' + s for s in sizes)})" if sizes else ""
        groups.append(f"{label}: {', '.join(names)}{variants}")
    return "; ".join(groups)


def _url_and_md5(name: str) -> tuple[str, str]:
    info = medmnist_info()
    base, _, size = name.rpartition("_")
    if size in _SIZES and base in info:
        entry, url_key, md5_key = info[base], f"url_{size}", f"MD5_{size}"
    else:
        entry, url_key, md5_key = info.get(name), "url", "MD5"
    if entry is None or url_key not in entry:
        raise DataError(f"data.name '{name}' is not a MedMNIST dataset: use one of {_known_names(info)}")
    return entry[url_key], entry[md5_key]


def download_npz(name: str, download_dir: str) -> Path:
    """``<download_dir>/<name>.npz``, downloaded and MD5-checked unless already there and intact."""
    url, md5 = _url_and_md5(name)
    folder = Path(download_dir).expanduser()
    target = folder / f"{name}.npz"
    if target.is_file() and md5sum(target) == md5:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".npz.part")
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"data.name '{name}': download from {url} failed ({err}): check the network or give data.path"
        ) from None
    got = md5sum(partial)
    if got != md5:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"data.name '{name}': downloaded file has MD5 {got}, expected {md5}: retry, or download it "
            f"yourself and give data.path"
        )
    os.replace(partial, target)
    return target


def resolve_npz(cfg: DataConfig) -> Path:
    """The .npz to read: ``data.path`` if it exists, else a download of ``data.name``."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            raise DataError(f"data.path '{cfg.path}' is a folder: give the path of a MedMNIST .npz file "
                            "(a folder of site folders is data.source=folder)")
        if not cfg.name:
            raise DataError(
                f"data.path '{cfg.path}' does not exist: give the path of a MedMNIST .npz or set data.name to "
                "download it"
            )
        try:  # the shipped configs name a shared file and download by name where it is absent
            return download_npz(cfg.name, cfg.download_dir)
        except MedmnistMissing:
            raise DataError(
                f"data.path '{cfg.path}' does not exist, and downloading data.name '{cfg.name}' instead needs the "
                "medmnist package: point data.path at the .npz, or pip install --no-deps medmnist to download it"
            ) from None
        except DataError as err:  # no network, a bad download: say first that data.path is missing
            raise DataError(f"data.path '{cfg.path}' does not exist (so data.name is downloaded instead): {err}") from None
    assert cfg.name  # DataConfig guarantees path or name
    return download_npz(cfg.name, cfg.download_dir)


def require_keys(keys: Container[str], npz: Path) -> None:
    """Every split's ``_images`` and ``_labels`` are in the file."""
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in keys]
    if missing:
        raise DataError(
            f"data.path '{npz}' lacks {', '.join(missing)}: give a MedMNIST .npz "
            "(train/val/test _images and _labels)"
        )


def _read(npz: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise not_readable(npz, err) from None
    require_keys(arrays, npz)
    return arrays


def split_labels(arrays: Mapping[str, Any], split: str, npz: Path) -> np.ndarray:
    """``<split>_labels`` as int64 (N,): one integer class index per image of ``<split>_images``."""
    labels = np.asarray(arrays[f"{split}_labels"])
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(
            f"data.path '{npz}' has multi-label {split}_labels {labels.shape} (e.g. ChestMNIST): only "
            "single-label (binary or multi-class) datasets are supported; pick another data.name"
        )
    if labels.ndim not in (1, 2):
        raise DataError(f"data.path '{npz}': {split}_labels has shape {labels.shape}; expected (N,) or (N, 1)")
    labels = labels.reshape(-1)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels) & (np.mod(labels, 1) == 0)):
            raise DataError(
                f"data.path '{npz}': {split}_labels holds values that are not class indices ({labels.dtype}): "
                "labels must be integers 0..num_classes-1"
            )
    if len(labels) != len(arrays[f"{split}_images"]):
        raise DataError(f"data.path '{npz}': {split}_labels and {split}_images differ in length")
    return labels.astype(np.int64)


def classes_found(labels: Mapping[str, np.ndarray], npz: Path) -> int:
    """1 + the largest label of any split (0 for no labels); a negative label is an error."""
    for split, values in labels.items():
        if values.size and values.min() < 0:
            raise DataError(
                f"data.path '{npz}': {split}_labels holds label {int(values.min())}: labels must be class "
                "indices 0..num_classes-1; renumber them from 0"
            )
    return max((int(v.max()) + 1 for v in labels.values() if v.size), default=0)


def _split_dims(images: Any, split: str, cfg: DataConfig, npz: Path) -> int:
    found = raw_spatial_dims(images.shape)
    if found is None and cfg.spatial_dims == 3 and images.ndim == 4:
        found = 3  # a non-cubic (N, D, H, W) gray volume, as data.spatial_dims says
    if found is None:
        raise DataError(
            f"data.path '{npz}': {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3) "
            "images or (N, D, H, W) volumes (set data.spatial_dims=3 if these are non-cubic volumes)"
        )
    return found


def check_labels_fit(cfg: DataConfig, found: int, npz: Path) -> None:
    """Labels up to ``found - 1`` fit data.num_classes (when set)."""
    if cfg.num_classes is not None and found > cfg.num_classes:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but data.path '{npz}' has labels up to {found - 1}: "
            f"set data.num_classes={found} or leave it out"
        )


def spatial_dims_of(arrays: Mapping[str, Any], cfg: DataConfig, npz: Path) -> int:
    """2 or 3 from the ``train_images`` shape (or ``data.spatial_dims`` where the shape cannot say).

    Every split must hold the same kind (images or volumes) as ``train_images``.
    """
    shape = arrays["train_images"].shape
    found = _split_dims(arrays["train_images"], "train", cfg, npz)
    if cfg.spatial_dims is not None and cfg.spatial_dims != found:
        raise DataError(
            f"data.spatial_dims={cfg.spatial_dims} but data.path '{npz}' holds {found}D "
            f"{'volumes' if found == 3 else 'images'} (train_images {shape}): set data.spatial_dims={found} "
            "or null (read from the file)"
        )
    for split in SPLITS[1:]:
        images = arrays[f"{split}_images"]
        if _split_dims(images, split, cfg, npz) != found:
            raise DataError(
                f"data.path '{npz}': {split}_images has shape {images.shape} but train_images {shape}: "
                "every split must hold the same kind of images (2D or 3D)"
            )
    return found


def site_names_of(arrays: Mapping[str, Any], cfg: DataConfig, npz: Path) -> list[str]:
    """The file's ``site_names`` (partition natural; one distinct name per site id), else site-0, site-1, ..."""
    if cfg.partition != "natural" or "site_names" not in arrays:
        return [site_name(s) for s in range(cfg.num_sites)]
    names = [str(n) for n in np.asarray(arrays["site_names"]).reshape(-1)]
    if len(names) != cfg.num_sites:
        listed = ", ".join(names[:10]) or "none"
        raise DataError(
            f"data.path '{npz}' lists {len(names)} site_names ({listed}) for {cfg.num_sites} sites "
            f"(site ids 0..{cfg.num_sites - 1}, data.num_sites={cfg.num_sites}): give site_names one name per "
            f"site id, or remove site_names (sites are then {site_name(0)}, {site_name(1)}, ...)"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or not all(n.strip() for n in names):
        what = f"repeats {', '.join(repeated)}" if repeated else "has an empty name"
        raise DataError(
            f"data.path '{npz}': site_names {what}: give every site id its own non-empty name"
        )
    return names


def natural_site_ids(arrays: Mapping[str, Any], cfg: DataConfig, npz: Path) -> dict[str, np.ndarray]:
    missing = [f"{s}_sites" for s in SPLITS if f"{s}_sites" not in arrays]
    if missing:
        raise DataError(
            f"data.partition=natural needs {', '.join(missing)} (a site id per image) in data.path '{npz}': "
            "add them or use data.partition=iid or dirichlet"
        )
    ids = {s: arrays[f"{s}_sites"].reshape(-1).astype(np.int64) for s in SPLITS}
    distinct = np.unique(np.concatenate(list(ids.values())))
    if len(distinct) != cfg.num_sites:
        raise DataError(
            f"data.num_sites={cfg.num_sites} but data.path '{npz}' has {len(distinct)} distinct site ids "
            f"({distinct.tolist()[:10]}): set data.num_sites={len(distinct)}"
        )
    for s in SPLITS:
        if len(ids[s]) != len(arrays[f"{s}_images"]):
            raise DataError(f"data.path '{npz}': {s}_sites and {s}_images differ in length")
    return ids


def load_medmnist_sites(cfg: DataConfig) -> list[SiteData]:
    """All sites of a MedMNIST .npz under ``cfg``; each official split is partitioned separately."""
    npz = resolve_npz(cfg)
    arrays = _read(npz)
    labels = {s: split_labels(arrays, s, npz) for s in SPLITS}
    found = classes_found(labels, npz)
    check_labels_fit(cfg, found, npz)
    num_classes = cfg.num_classes or found  # None: the labels say
    site_ids = natural_site_ids(arrays, cfg, npz) if cfg.partition == "natural" else None
    names = site_names_of(arrays, cfg, npz)
    dims = spatial_dims_of(arrays, cfg, npz)
    per_site: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(cfg.num_sites)]
    for salt, split in enumerate(SPLITS):
        images = arrays[f"{split}_images"]
        if site_ids is not None:
            parts = natural_partition(site_ids[split], cfg.num_sites, what=f"{split}_sites of '{npz}'")
        else:
            parts = partition_indices(labels[split], cfg, salt=salt, num_classes=num_classes)
        for s, idx in enumerate(parts):
            per_site[s][split] = (prepare_images(images[idx], cfg.image_size, dims), labels[split][idx])
    return [site_from_splits(cfg, s, names[s], per_site[s], num_classes) for s in range(cfg.num_sites)]
