"""Synthetic chest-X-ray-like sites, generated on the fly (no download).

Each image is a soft body ellipse with two darker lung fields, rib stripes, a heart shadow,
smooth texture, small bright "vessel" spots and pixel noise. The label is structural: class c
has c round lesions (bright Gaussian blobs, larger than the vessel spots, of random contrast)
inside the lungs, so class 0 is "normal" and, for two classes, class 1 is "lesion present".
Faint lesions look like vessel spots, which keeps the task learnable but not trivial.

A pool of ``num_sites * samples_per_site`` balanced examples is partitioned across sites
(iid or Dirichlet label skew), each site is split into train/val/test and given its own
acquisition shift. With ``data.spatial_dims=3`` the images are 3D volumes from
``synthetic3d.py`` (same labels, partition, splits and shift).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.config import DataConfig
from fedfm.data.partition import partition_indices
from fedfm.data.resize import resize_images
from fedfm.data.sites import build_site
from fedfm.data.synthetic3d import render_volumes
from fedfm.data.types import SiteData
from fedfm.protocol import site_name

MAX_RENDER_SIZE = 64  # render at most this size, then upsample
_CHUNK = 1024
_VESSELS = 3
SEED_SALT = 0x5EED  # the generator of a config's labels and images: default_rng([data.seed, SEED_SALT])


Array = np.ndarray


def _soft_ellipse(x: Array, y: Array, cx: Array, cy: Array, ax: Array, ay: Array, edge: float) -> Array:
    """1 inside the ellipse, 0 outside, with a linear ramp of width ``edge`` (broadcast over N)."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _blob(x: Array, y: Array, cx: Array, cy: Array, sigma: Array) -> Array:
    """Unit-height Gaussian bump centred at (cx, cy)."""
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * sigma**2))


def render_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (N, 1, size, size) images in [0, 1] whose lesion count equals ``labels``."""
    labels = np.asarray(labels, np.int64)
    n = labels.size
    g = min(size, MAX_RENDER_SIZE)
    max_lesions = int(labels.max()) if n else 0

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, *shape)).astype(np.float32)

    # Per-image anatomy, drawn up front so chunking never changes the result.
    body = dict(cx=u(-0.06, 0.06), cy=u(-0.02, 0.08), ax=u(0.72, 0.9), ay=u(0.82, 0.97))
    lung_dx, lung_ax, lung_ay = u(0.3, 0.38), u(0.2, 0.27), u(0.42, 0.55)
    body_level, lung_depth = u(0.5, 0.65), u(0.2, 0.32)
    rib_freq, rib_phase, rib_amp = u(9.0, 12.0), u(0.0, 2 * np.pi), u(0.03, 0.07)
    heart = dict(dx=u(0.02, 0.12), dy=u(0.15, 0.3), s=u(0.14, 0.2), a=u(0.12, 0.22))
    texture = rng.standard_normal((n, 1, 5, 5)).astype(np.float32) * u(0.03, 0.06)[:, None, None, None]
    # Lesions (only the first `label` slots are drawn) and vessel spots (in every image).
    slots = max_lesions + _VESSELS
    side = rng.integers(0, 2, size=(n, slots)) * 2 - 1
    rho, theta = np.sqrt(u(0.0, 1.0, slots)) * 0.75, u(0.0, 2 * np.pi, slots)
    sigma = np.concatenate([u(0.09, 0.15, max_lesions), u(0.03, 0.05, _VESSELS)], axis=1)
    amp = np.concatenate([u(0.25, 0.5, max_lesions), u(0.05, 0.15, _VESSELS)], axis=1)
    active = np.concatenate([np.arange(max_lesions)[None, :] < labels[:, None], np.ones((n, _VESSELS), bool)], axis=1)
    noise_std = u(0.015, 0.035)

    coords = (np.arange(g, dtype=np.float32) + 0.5) / g * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((n, 1, g, g), np.float32)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        x, y = xx[None], yy[None]

        def col(a: np.ndarray) -> np.ndarray:
            return a[sl, None, None]

        b = _soft_ellipse(x, y, col(body["cx"]), col(body["cy"]), col(body["ax"]), col(body["ay"]), 0.08)
        lcy = col(body["cy"]) - 0.08
        lungs = np.zeros_like(b)
        lung_centres = []
        for s in (-1, 1):
            lcx = col(body["cx"]) + s * col(lung_dx)
            lung_centres.append(lcx)
            lungs = np.maximum(lungs, _soft_ellipse(x, y, lcx, lcy, col(lung_ax), col(lung_ay), 0.25))
        ribs = col(rib_amp) * np.cos(col(rib_freq) * y + col(rib_phase)) ** 8
        tex = F.interpolate(torch.from_numpy(texture[sl]), size=(g, g), mode="bicubic", align_corners=False)
        img = 0.04 + b * (col(body_level) + tex[:, 0].numpy()) - lungs * col(lung_depth) + lungs * ribs
        hcx, hcy = col(body["cx"]) - col(heart["dx"]), col(body["cy"]) + col(heart["dy"])
        img += col(heart["a"]) * _blob(x, y, hcx, hcy, col(heart["s"])) * b
        for j in range(slots):
            cx = np.where(side[sl, j] < 0, lung_centres[0][:, 0, 0], lung_centres[1][:, 0, 0])
            px = cx + rho[sl, j] * np.cos(theta[sl, j]) * lung_ax[sl]
            py = lcy[:, 0, 0] + rho[sl, j] * np.sin(theta[sl, j]) * lung_ay[sl]
            a = np.where(active[sl, j], amp[sl, j], 0.0).astype(np.float32)
            img += a[:, None, None] * _blob(x, y, px[:, None, None], py[:, None, None], sigma[sl, j, None, None])
        img += col(noise_std) * rng.standard_normal(img.shape, dtype=np.float32)
        out[sl, 0] = np.clip(img, 0.0, 1.0)
    return resize_images(out, size) if g != size else out


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels with every class (nearly) equally often, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def load_synthetic_sites(cfg: DataConfig) -> list[SiteData]:
    """All synthetic sites for ``cfg`` (deterministic given ``cfg.seed``)."""
    rng = np.random.default_rng([cfg.seed, SEED_SALT])
    total = cfg.num_sites * cfg.samples_per_site
    labels = balanced_labels(total, cfg.num_classes, rng)
    render = render_volumes if cfg.spatial_dims == 3 else render_images
    images = render(labels, cfg.image_size, rng)
    parts = partition_indices(labels, cfg, num_classes=cfg.num_classes)
    return [
        build_site(cfg, site_id, site_name(site_id), images[idx], labels[idx], cfg.num_classes)
        for site_id, idx in enumerate(parts)
    ]
