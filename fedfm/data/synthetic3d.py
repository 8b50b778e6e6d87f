"""Synthetic chest-CT-like volumes, the 3D counterpart of ``synthetic.py`` (no download).

Each volume is a soft body ellipsoid with two darker lung ellipsoids, a heart shadow, smooth 3D
texture, small faint "vessel" spots and voxel noise. As in 2D the label is structural: class c
has c lesions (Gaussian balls, larger and brighter than the vessel spots, of random contrast)
inside the lungs. Axes are (D, H, W) = (z: head-foot, y: back-front, x: left-right).

Every shape is separable along the axes (ellipsoid radii and Gaussians are sums or products of
one term per axis), so a few hundred 28^3 volumes take a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.data.resize import resize_images

MAX_RENDER_SIZE = 32  # render at most this size, then upsample
_CHUNK = 128
_VESSELS = 4


def _axis_coords(g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in [-1, 1], shaped to broadcast as (1, z, 1, 1), (1, 1, y, 1), (1, 1, 1, x)."""
    c = (np.arange(g, dtype=np.float32) + 0.5) / g * 2.0 - 1.0
    return c[None, :, None, None], c[None, None, :, None], c[None, None, None, :]


def _soft_ellipsoid(zyx, centre, axes, edge: float) -> np.ndarray:
    """1 inside the ellipsoid, 0 outside, with a linear ramp of width ``edge``; centre/axes are (n, 3)."""
    r2 = sum(((c - centre[:, i, None, None, None]) / axes[:, i, None, None, None]) ** 2 for i, c in enumerate(zyx))
    return np.clip((1.0 - np.sqrt(r2)) / edge + 0.5, 0.0, 1.0)


def _blob(zyx, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Unit-height Gaussian ball per volume, as a product of one 1D Gaussian per axis; centre (n, 3)."""
    out = None
    for i, c in enumerate(zyx):
        term = np.exp(-((c - centre[:, i, None, None, None]) ** 2) / (2.0 * sigma[:, None, None, None] ** 2))
        out = term if out is None else out * term
    return out


def render_volumes(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (N, 1, size, size, size) volumes in [0, 1] whose lesion count equals ``labels``."""
    labels = np.asarray(labels, np.int64)
    n = labels.size
    g = min(size, MAX_RENDER_SIZE)
    max_lesions = int(labels.max()) if n else 0

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, *shape)).astype(np.float32)

    # Per-volume anatomy, drawn up front so chunking never changes the result.
    body_c = np.stack([u(-0.05, 0.05), u(-0.06, 0.06), u(-0.06, 0.06)], axis=1)
    body_a = np.stack([u(0.85, 0.97), u(0.6, 0.75), u(0.78, 0.92)], axis=1)
    lung_dx, lung_a = u(0.3, 0.38), np.stack([u(0.55, 0.7), u(0.35, 0.45), u(0.2, 0.26)], axis=1)
    body_level, lung_depth = u(0.5, 0.65), u(0.2, 0.32)
    heart_off = np.stack([u(-0.25, -0.1), u(0.05, 0.2), u(-0.12, -0.02)], axis=1)
    heart_s, heart_a = u(0.14, 0.2), u(0.1, 0.2)
    texture = rng.standard_normal((n, 1, 4, 4, 4)).astype(np.float32) * u(0.03, 0.06)[:, None, None, None, None]
    # Lesions (only the first `label` slots are drawn) and vessel spots (in every volume), placed
    # uniformly in a ball of 0.75 of the chosen lung's semi-axes.
    slots = max_lesions + _VESSELS
    side = rng.integers(0, 2, size=(n, slots)) * 2 - 1
    direction = rng.standard_normal((n, slots, 3)).astype(np.float32)
    direction /= np.maximum(np.linalg.norm(direction, axis=2, keepdims=True), 1e-6)
    offset = direction * (0.75 * np.cbrt(u(0.0, 1.0, slots)))[..., None]
    sigma = np.concatenate([u(0.1, 0.16, max_lesions), u(0.04, 0.06, _VESSELS)], axis=1)
    amp = np.concatenate([u(0.25, 0.5, max_lesions), u(0.05, 0.15, _VESSELS)], axis=1)
    active = np.concatenate([np.arange(max_lesions)[None, :] < labels[:, None], np.ones((n, _VESSELS), bool)], axis=1)
    noise_std = u(0.015, 0.035)

    zyx = _axis_coords(g)
    out = np.empty((n, 1, g, g, g), np.float32)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        m = sl.stop - sl.start
        body = _soft_ellipsoid(zyx, body_c[sl], body_a[sl], 0.08)
        lung_centres = []
        lungs = np.zeros_like(body)
        for s in (-1, 1):
            centre = body_c[sl] + np.stack([np.zeros(m), np.full(m, -0.05), s * lung_dx[sl]], axis=1).astype(np.float32)
            lung_centres.append(centre)
            lungs = np.maximum(lungs, _soft_ellipsoid(zyx, centre, lung_a[sl], 0.25))
        tex = F.interpolate(torch.from_numpy(texture[sl]), size=(g, g, g), mode="trilinear", align_corners=False)
        img = 0.04 + body * (body_level[sl, None, None, None] + tex[:, 0].numpy())
        img -= lungs * lung_depth[sl, None, None, None]
        img += heart_a[sl, None, None, None] * _blob(zyx, body_c[sl] + heart_off[sl], heart_s[sl]) * body
        for j in range(slots):
            centre = np.where(side[sl, j, None] < 0, lung_centres[0], lung_centres[1]) + offset[sl, j] * lung_a[sl]
            a = np.where(active[sl, j], amp[sl, j], 0.0).astype(np.float32)
            img += a[:, None, None, None] * _blob(zyx, centre, sigma[sl, j])
        img += noise_std[sl, None, None, None] * rng.standard_normal(img.shape, dtype=np.float32)
        out[sl, 0] = np.clip(img, 0.0, 1.0)
    return resize_images(out, size) if g != size else out
