"""Per-site acquisition shift (scanner/protocol differences) built from MONAI intensity transforms.

A site's shift is a small dict of numbers drawn from (seed, site_id) and scaled by a strength:
a smooth multiplicative bias field, a gamma curve, a gain, an offset and additive Gaussian noise.
The bias field depends on the parameters only, so train/val/test of one site share it; the noise
depends on the per-call ``seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 2048
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


def bias_field(height: int, width: int, coeff: float, seed: int) -> np.ndarray:
    """A smooth positive (H, W) field exp(Legendre polynomial of degree 2) from MONAI's RandBiasField."""
    from monai.transforms import RandBiasField

    transform = RandBiasField(degree=2, coeff_range=(-coeff, coeff), prob=1.0)
    transform.set_random_state(seed=seed)
    return _to_numpy(transform(np.ones((1, height, width), np.float32)))[0]


def apply_shift(images: np.ndarray, params: dict[str, float], seed: int) -> np.ndarray:
    """Apply ``params`` to float32 (N, C, H, W) images in [0, 1]; returns a new array clipped to [0, 1].

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
        field = bias_field(images.shape[-2], images.shape[-1], p["bias_coeff"], int(p.get("bias_seed", 0)))
    gain = ScaleIntensity(minv=None, maxv=None, factor=p["gain"] - 1.0)
    offset = ShiftIntensity(offset=p["offset"])
    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=p["noise_std"], sample_std=False)
    noise.set_random_state(seed=seed % (2**32))
    out = np.empty_like(images)
    for lo in range(0, len(images), _CHUNK):
        x = np.power(np.clip(images[lo : lo + _CHUNK], 0.0, 1.0), np.float32(p["gamma"]))
        if field is not None:
            x = x * field
        x = _to_numpy(offset(gain(x)))
        if p["noise_std"] > 0:
            x = _to_numpy(noise(x))
        out[lo : lo + _CHUNK] = np.clip(x, 0.0, 1.0)
    return out
