"""Turn raw image arrays of any size into float32 (N, C, S, S) in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 1024


def to_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8/uint16/float (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = np.moveaxis(images, -1, 1)
    else:
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        scale = float(np.iinfo(images.dtype).max) if images.dtype != np.uint8 else 255.0
        out = images.astype(np.float32) / np.float32(scale)
    else:
        out = images.astype(np.float32)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize float32 (N, C, H, W) to (N, C, size, size); antialiased when shrinking."""
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


def prepare_images(images: np.ndarray, size: int) -> np.ndarray:
    """Raw (N, H, W[, C]) array -> float32 (N, C, size, size) in [0, 1]."""
    return resize_images(to_float_nchw(images), size)
