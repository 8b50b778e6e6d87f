"""Turn raw image arrays of any size into float32 (N, C, S, S) or (N, C, S, S, S) in [0, 1].

Raw arrays come channels-last, as MedMNIST stores them. Whether an (N, A, B, C) array is a
batch of 2D images with channels or of 3D gray volumes is decided by :func:`raw_spatial_dims`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 1024
_CHUNK_VOXELS = 1 << 24  # 3D: resize at most this many input voxels (64 MiB of float32) per batch


def raw_spatial_dims(shape: tuple[int, ...]) -> int | None:
    """2 or 3 for a raw (N, ...) image array's shape, or None when the shape does not say.

    The rule, for the shape after N:

    * (H, W): 2D gray.
    * (H, W, C) with C in (1, 3) and C smaller than H and W: 2D with channels last
      (gray with a channel axis, or RGB).
    * (D, H, W) with D == H == W > 3: a 3D gray volume (MedMNIST 3D: 28^3 or 64^3).
    * (D, H, W, C) with C in (1, 3) and C smaller than D, H and W: a 3D volume with channels last.

    Anything else, such as a non-cubic (D, H, W) whose last axis is not a channel axis, is None:
    the caller needs ``data.spatial_dims`` to tell.
    """
    dims = tuple(int(d) for d in shape[1:])
    if len(dims) == 2:
        return 2
    channels_last = len(dims) in (3, 4) and dims[-1] in (1, 3) and dims[-1] < min(dims[:-1])
    if len(dims) == 3:
        if channels_last:
            return 2
        if dims[0] == dims[1] == dims[2] > 3:
            return 3
        return None
    if len(dims) == 4 and channels_last:
        return 3
    return None


def to_float_channels_first(images: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """uint8/uint16/float (N, *spatial) or (N, *spatial, C) -> float32 (N, C, *spatial) in [0, 1]."""
    if images.ndim == spatial_dims + 1:
        images = images[:, None]
    elif images.ndim == spatial_dims + 2:
        images = np.moveaxis(images, -1, 1)
    else:
        what = "(N, H, W) or (N, H, W, C)" if spatial_dims == 2 else "(N, D, H, W) or (N, D, H, W, C)"
        raise ValueError(f"expected images of shape {what}, got {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        scale = float(np.iinfo(images.dtype).max) if images.dtype != np.uint8 else 255.0
        out = images.astype(np.float32) / np.float32(scale)
    else:
        out = images.astype(np.float32)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


def to_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8/uint16/float (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return to_float_channels_first(images, 2)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize float32 (N, C, H, W) to (N, C, size, size), or (N, C, D, H, W) to (N, C, size, size, size).

    2D is bilinear, antialiased when shrinking. 3D is trilinear, but torch has no antialiased
    trilinear, so axes longer than ``size`` are first shrunk by area averaging (each output voxel
    is the mean of the input voxels it covers, which does not alias fine detail), and only then is
    the volume interpolated trilinearly to ``size`` (which then only enlarges or keeps axes).
    """
    if images.ndim == 5:
        return _resize_volumes(images, size)
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(images, dtype=np.float32)
    antialias = h > size or w > size
    out = np.empty((n, c, size, size), np.float32)
    with torch.no_grad():
        for start in range(0, n, _CHUNK):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _CHUNK], dtype=np.float32))
            resized = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
            out[start : start + _CHUNK] = resized.clamp_(0.0, 1.0).numpy()
    return out


def _resize_volumes(images: np.ndarray, size: int) -> np.ndarray:
    n, c, *spatial = images.shape
    target = (size, size, size)
    if tuple(spatial) == target:
        return np.ascontiguousarray(images, dtype=np.float32)
    shrunk = tuple(min(d, size) for d in spatial)
    out = np.empty((n, c, *target), np.float32)
    chunk = max(1, _CHUNK_VOXELS // max(1, c * int(np.prod(spatial))))
    with torch.no_grad():
        for start in range(0, n, chunk):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk], dtype=np.float32))
            if shrunk != tuple(spatial):
                batch = F.interpolate(batch, size=shrunk, mode="area")
            if shrunk != target:
                batch = F.interpolate(batch, size=target, mode="trilinear", align_corners=False)
            out[start : start + chunk] = batch.clamp_(0.0, 1.0).numpy()
    return out


def prepare_images(images: np.ndarray, size: int, spatial_dims: int = 2) -> np.ndarray:
    """Raw (N, H, W[, C]) or, with ``spatial_dims=3``, (N, D, H, W[, C]) -> float32 (N, C, size, ...) in [0, 1]."""
    return resize_images(to_float_channels_first(images, spatial_dims), size)
