"""A folder of site folders of class folders of images (sites are natural by construction).

Layouts, per site (both may be mixed across sites)::

    <root>/<site>/<class>/*.png|jpg|jpeg|bmp|tif|tiff|npy          split by data.val_fraction/test_fraction
    <root>/<site>/{train,val,test}/<class>/*                      splits as given (val/test may be absent)

Sites are the sorted site folder names and ``data.num_sites`` must equal their count;
``data.partition`` and ``data.alpha`` are ignored. Classes are the sorted union of class folder
names over all sites and splits, with the same index everywhere. If any image is RGB, gray
images are repeated to 3 channels. PNG and .npy are read without Pillow; other formats need it.
Images are 2D only: ``data.spatial_dims=3`` is an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfm.config import DataConfig
from fedfm.data.errors import DataError
from fedfm.data.png import read_png
from fedfm.data.resize import resize_images
from fedfm.data.sites import SPLITS, build_site, site_from_splits
from fedfm.data.types import SiteData

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy"}


def subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path) -> np.ndarray:
    """float32 (C, H, W) in [0, 1] with C in {1, 3} from one image file (alpha dropped)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".png":
            arr = _read_with_pillow(path) if _has_pillow() else read_png(path)
        else:
            if not _has_pillow():
                raise DataError(
                    f"data.path: reading '{path}' ({suffix}) needs Pillow: pip install pillow, or convert to .png/.npy"
                )
            arr = _read_with_pillow(path)
    except (OSError, ValueError) as err:
        raise DataError(f"data.path: cannot read image '{path}' ({err}): fix or remove the file") from None
    return _to_chw(arr, path)


def _has_pillow() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "RGB", "I;16", "I;16B", "I;16L", "I", "F"):
            img = img.convert("L" if img.mode in ("1", "LA") else "RGB")
        return np.asarray(img)


def image_channels(path: Path) -> int:
    """C of the (C, H, W) :func:`read_image` makes of ``path``, from the file's header (no pixels decoded)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _shape_channels(np.load(path, mmap_mode="r", allow_pickle=False).shape, path)
        if _has_pillow():
            from PIL import Image

            with Image.open(path) as img:
                return 1 if img.mode in _PILLOW_GRAY else 3  # as _read_with_pillow converts it
        if suffix == ".png":
            return _png_channels(path)
    except (OSError, ValueError) as err:
        raise DataError(f"data.path: cannot read image '{path}' ({err}): fix or remove the file") from None
    raise DataError(f"data.path: reading '{path}' ({suffix}) needs Pillow: pip install pillow, or convert to .png/.npy")


_PILLOW_GRAY = ("L", "I;16", "I;16B", "I;16L", "I", "F", "1", "LA")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}  # colour type -> channels after read_png, alpha dropped


def _png_channels(path: Path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    if head[25] not in _PNG_CHANNELS:
        raise ValueError(f"PNG colour type {head[25]} is not supported without Pillow: pip install pillow")
    return _PNG_CHANNELS[head[25]]


def _shape_channels(shape: tuple[int, ...], path: Path) -> int:
    """C of an image array of ``shape`` once channels-first and without alpha (1 gray, 3 RGB)."""
    if len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        channels = shape[-1]
    elif len(shape) == 2:
        channels = 1
    elif len(shape) == 3 and shape[0] in (1, 3):
        channels = shape[0]
    else:
        raise DataError(f"data.path: image '{path}' has shape {shape}; expected (H, W), (H, W, C) or (C, H, W)")
    return {2: 1, 4: 3}.get(channels, channels)


def _to_chw(arr: np.ndarray, path: Path) -> np.ndarray:
    _shape_channels(arr.shape, path)  # an array that is no image is an error
    if arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] in (2, 4):  # drop alpha
        arr = arr[:-1]
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    else:
        out = arr.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:  # e.g. raw intensities in a .npy: min-max scale this image
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    return out


def _is_split_layout(site: Path) -> bool:
    names = {p.name for p in subfolders(site)}
    return "train" in names and names <= set(SPLITS)


def scan_tree(root: Path, sites: list[Path]) -> tuple[list[str], dict[tuple[str, str], list[tuple[Path, str]]]]:
    """Class names and, per (site, split or ''), the (file, class name) pairs."""
    files: dict[tuple[str, str], list[tuple[Path, str]]] = {}
    classes: set[str] = set()
    for site in sites:
        groups = [(s, site / s) for s in SPLITS if (site / s).is_dir()] if _is_split_layout(site) else [("", site)]
        for split, folder in groups:
            entries = files.setdefault((site.name, split), [])
            for cls in subfolders(folder):
                classes.add(cls.name)
                entries.extend((f, cls.name) for f in _image_files(cls))
        if not any(files.get((site.name, s)) for s in ("", "train")):
            raise DataError(
                f"data.path '{root}': site folder '{site.name}' has no images in <class>/ (or train/<class>/) "
                "folders: add images or remove the folder"
            )
    return sorted(classes), files


def _load(entries: list[tuple[Path, str]], index: dict[str, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = [resize_images(read_image(f)[None], size)[0] for f, _ in entries]
    labels = np.array([index[c] for _, c in entries], np.int64)
    if not images:
        return np.zeros((0, 1, size, size), np.float32), labels
    channels = max(img.shape[0] for img in images)
    return np.stack([np.repeat(img, channels // img.shape[0], axis=0) for img in images]), labels


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    return images if images.shape[1] == channels else np.repeat(images, channels // images.shape[1], axis=1)


def site_folders(cfg: DataConfig) -> tuple[Path, list[Path]]:
    """The root folder and its site folders (sorted), checked against data.spatial_dims and data.num_sites."""
    assert cfg.path  # DataConfig guarantees it for source=folder
    if cfg.spatial_dims == 3:
        raise DataError(
            "data.spatial_dims=3 is not supported for data.source=folder (2D images only): set "
            "data.spatial_dims=2 or null, or store the volumes as a MedMNIST-style .npz (data.source=medmnist)"
        )
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path '{cfg.path}' is not a folder: give a folder of site folders of class folders")
    sites = subfolders(root)
    if not sites:
        raise DataError(
            f"data.path '{cfg.path}' has no site folders: give a folder of site folders of class folders "
            "(<root>/<site>/<class>/*.png, or <root>/<site>/{train,val,test}/<class>/*)"
        )
    if len(sites) != cfg.num_sites:
        raise DataError(
            f"data.num_sites={cfg.num_sites} but data.path '{cfg.path}' has {len(sites)} site folders "
            f"({', '.join(p.name for p in sites[:10])}): set data.num_sites={len(sites)}"
        )
    return root, sites


def check_classes_fit(cfg: DataConfig, classes: list[str]) -> None:
    """The class folders fit data.num_classes (when set)."""
    if cfg.num_classes is not None and len(classes) > cfg.num_classes:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but data.path '{cfg.path}' has {len(classes)} class folders "
            f"({', '.join(classes[:10])}): set data.num_classes={len(classes)} or leave it out"
        )


def load_folder_sites(cfg: DataConfig) -> list[SiteData]:
    """All sites under ``cfg.path`` (one per site folder, sorted by name)."""
    root, sites = site_folders(cfg)
    classes, files = scan_tree(root, sites)
    check_classes_fit(cfg, classes)
    num_classes = cfg.num_classes or len(classes)  # None: the class folders say
    index = {c: i for i, c in enumerate(classes)}
    loaded = {key: _load(entries, index, cfg.image_size) for key, entries in files.items()}
    channels = max((imgs.shape[1] for imgs, _ in loaded.values() if len(imgs)), default=1)
    out: list[SiteData] = []
    for site_id, site in enumerate(sites):
        if (site.name, "") in loaded:
            images, labels = loaded[(site.name, "")]
            out.append(build_site(cfg, site_id, site.name, _to_channels(images, channels), labels, num_classes))
            continue
        empty = (np.zeros((0, channels, cfg.image_size, cfg.image_size), np.float32), np.zeros(0, np.int64))
        splits = {}
        for split in SPLITS:
            images, labels = loaded.get((site.name, split), empty)
            splits[split] = (_to_channels(images, channels), labels)
        out.append(site_from_splits(cfg, site_id, site.name, splits, num_classes))
    return out
