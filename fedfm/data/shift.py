"""Per-site acquisition shift (scanner/protocol differences) built from MONAI intensity transforms.

A site's shift is a small dict of numbers drawn from (seed, site_id) and scaled by a strength:
a smooth multiplicative bias field, a gamma curve, a gain, an offset and additive Gaussian noise.
The bias field depends on the parameters only, so train/val/test of one site share it; the noise
depends on the per-call ``seed``.

Images may be 2D (N, C, H, W) or 3D volumes (N, C, D, H, W), with the same parameters per site.
Gamma, gain, offset and noise act on each pixel or voxel alone, so they mean the same in 3D. The
bias field is exp of a degree-2 Legendre polynomial with random coefficients; MONAI's 3D basis
has 10 terms instead of 6 (and other ones), so in 3D the coefficient range is scaled to give the
same mean squared log-field per voxel as a 2D field has per pixel: a site's field then varies
about as much across a volume as across an image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 2048  # 2D images per chunk; the noise depends on the chunking, so this is fixed
_CHUNK_VOXELS = 1 << 23  # 3D: voxels per chunk
_FIELD_DEGREE = 2
NEUTRAL: dict[str, float] = {"gamma": 1.0, "gain": 1.0, "offset": 0.0, "noise_std": 0.0, "bias_coeff": 0.0}


def site_shift_params(site_id: int, strength: float, seed: int) -> dict[str, float]:
    """Deterministic shift parameters for one site; ``strength`` 0 gives ``{}`` (no shift)."""
    if strength <= 0:
        return {}
    rng = np.random.default_rng([seed, site_id, 0x5A1F7])
    u = rng.uniform(-1.0, 1.0, size=4)
    return {
        "gamma": float(np.exp(0.4 * strength * u[0])),
        "gain": float(np.exp(0.25 * strength * u[1])),
        "offset": float(0.08 * strength * u[2]),
        "noise_std": float(strength * (0.005 + 0.035 * (u[3] + 1.0) / 2.0)),
        "bias_coeff": float(0.12 * strength),
        "bias_seed": float(rng.integers(0, 2**31 - 1)),
    }


def _to_numpy(x: Any) -> np.ndarray:
    from monai.utils import convert_to_numpy

    return np.asarray(convert_to_numpy(x), dtype=np.float32)


def _basis_energy(spatial_dims: int) -> float:
    """Mean over [-1, 1]^dims of the sum of squared Legendre products in RandBiasField's basis.

    MONAI's degree-d basis is P_i(y) P_j(x) for j <= i <= d in 2D (``np.tril_indices``) and
    P_i(z) P_j(y) P_k(x) for i + j + k <= d in 3D; the mean of P_n^2 over [-1, 1] is 1 / (2n + 1).
    """
    d = _FIELD_DEGREE
    if spatial_dims == 2:
        terms = [(i, j) for i in range(d + 1) for j in range(i + 1)]
    else:
        terms = [(i, j, k) for i in range(d + 1) for j in range(d + 1 - i) for k in range(d + 1 - i - j)]
    return float(sum(np.prod([1.0 / (2 * n + 1) for n in term]) for term in terms))


def field_coeff_scale(spatial_dims: int) -> float:
    """Factor on the bias-field coefficient range that gives a ``spatial_dims`` field a 2D one's log variance."""
    return float(np.sqrt(_basis_energy(2) / _basis_energy(spatial_dims)))


def bias_field(height: int, width: int, coeff: float, seed: int, depth: int | None = None) -> np.ndarray:
    """A smooth positive (H, W) field, or (D, H, W) with ``depth``, exp(Legendre polynomial of degree 2).

    From MONAI's RandBiasField; a 3D field's coefficient range is scaled by :func:`field_coeff_scale`.
    """
    from monai.transforms import RandBiasField

    spatial = (height, width) if depth is None else (depth, height, width)
    c = coeff if depth is None else coeff * field_coeff_scale(3)
    transform = RandBiasField(degree=_FIELD_DEGREE, coeff_range=(-c, c), prob=1.0)
    transform.set_random_state(seed=seed)
    return _to_numpy(transform(np.ones((1, *spatial), np.float32)))[0]


def apply_shift(images: np.ndarray, params: dict[str, float], seed: int) -> np.ndarray:
    """Apply ``params`` to float32 (N, C, H, W) images or (N, C, D, H, W) volumes in [0, 1].

    Returns a new array clipped to [0, 1].

    Order: gamma, bias field, gain (``ScaleIntensity``), offset (``ShiftIntensity``), noise
    (``RandGaussianNoise`` seeded by ``seed``). Works in chunks to bound memory.
    """
    images = np.asarray(images, dtype=np.float32)
    if not params or len(images) == 0:
        return images.copy()
    from monai.transforms import RandGaussianNoise, ScaleIntensity, ShiftIntensity

    p = {**NEUTRAL, **params}
    field = None
    if p["bias_coeff"] > 0:
        depth = int(images.shape[-3]) if images.ndim == 5 else None
        field = bias_field(images.shape[-2], images.shape[-1], p["bias_coeff"], int(p.get("bias_seed", 0)), depth)
    gain = ScaleIntensity(minv=None, maxv=None, factor=p["gain"] - 1.0)
    offset = ShiftIntensity(offset=p["offset"])
    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=p["noise_std"], sample_std=False)
    noise.set_random_state(seed=seed % (2**32))
    out = np.empty_like(images)
    chunk = _CHUNK if images.ndim == 4 else max(1, _CHUNK_VOXELS // int(np.prod(images.shape[1:])))
    for lo in range(0, len(images), chunk):
        x = np.power(np.clip(images[lo : lo + chunk], 0.0, 1.0), np.float32(p["gamma"]))
        if field is not None:
            x = x * field
        x = _to_numpy(offset(gain(x)))
        if p["noise_std"] > 0:
            x = _to_numpy(noise(x))
        out[lo : lo + chunk] = np.clip(x, 0.0, 1.0)
    return out
