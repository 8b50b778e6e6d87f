"""Frozen-prefix activation cache: a site computes the frozen start of the network once.

With LoRA on the late stages of a deep backbone, every stage before the first trainable
parameter is frozen; in fedfm's training mode (norm layers in eval mode) it is also
deterministic unless it draws random numbers (dropout, drop-connect). Such a prefix maps each
image to the same activation in every step of every round, so a site computes it once per image,
keeps it in a memory-mapped ``.npy`` file in its own folder (the activations never leave the
site), and trains and evaluates only the rest of the network (:class:`SuffixModel`) from it.

Exactness: the suffix runs the very modules the full model runs, on the values the prefix
produces, and consumes the same random numbers (the prefix consumes none), so logits,
per-sample gradients and a whole DP round equal those of the uncached model (float32 storage;
``train.activation_cache_dtype=float16`` halves the file at the cost of exactness).

A cache file is named by a fingerprint of everything its values depend on: the prefix's stage
names, module structure and weights (so a new backbone, weights file, image size or LoRA target
that moves the cut gives a new file) and the split's images. Files of an older fingerprint for
the same split are deleted when a new one is written, so a site's folder holds one per split.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfm.protocol import CACHE_BUILD_SECONDS, CACHE_BYTES
from fedfm.models.stages import Stage, model_stages, run_stages

FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class FeatureSplit:
    """A split whose ``images`` are prefix activations (N, ...) instead of images; same interface as Split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _stage_is_random(stage: Stage) -> bool:
    if stage.random_in_training:
        return True
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for s in stage.modules for m in s.modules())


def prefix_length(model: nn.Module) -> int:
    """How many leading stages of ``model`` are frozen and deterministic (0: nothing to cache)."""
    stages = model_stages(model)
    if not stages:
        return 0
    for i, stage in enumerate(stages):
        if stage.has_trainable() or _stage_is_random(stage):
            return i
    return 0  # nothing trains: there is no suffix to train


class SuffixModel(nn.Module):
    """The stages of ``model`` after the first ``start``: maps prefix activations to logits."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return run_stages(model_stages(self.model)[self.start:], features)


def prefix_fingerprint(model: nn.Module, length: int) -> str:
    """SHA-256 over the prefix's stage names, module structure and every parameter and buffer."""
    digest = hashlib.sha256(f"fedfm-activation-cache/{FORMAT_VERSION}/{length}".encode())
    for stage in model_stages(model)[:length]:
        digest.update(stage.name.encode())
        for tensor in stage.tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        for module in stage.modules:
            digest.update(repr(module).encode())
            for name, tensor in list(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(images: np.ndarray) -> str:
    digest = hashlib.sha256(f"{images.shape}/{images.dtype}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


@dataclass
class CacheStats:
    """What the cache cost and holds in this process (reported in the site's round metrics)."""

    build_seconds: float = 0.0
    bytes: int = 0
    built: list[str] = field(default_factory=list)


class ActivationCache:
    """One site's cached prefix activations, one memory-mapped file per split, in ``folder``."""

    def __init__(self, folder: str | Path, site: str, dtype: str = "float32", batch_size: int = 64) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"train.activation_cache_dtype={dtype!r}: use float32 or float16")
        self.folder = Path(folder)
        self.site = site
        self.dtype = dtype
        self.batch_size = batch_size
        self.stats = CacheStats()
        self._open: dict[Path, np.ndarray] = {}

    def features(self, model: nn.Module, length: int, split_name: str, images: np.ndarray) -> np.ndarray:
        """The prefix's activations of ``images`` (read-only memmap), computed and stored on first use."""
        key = hashlib.sha256(
            f"{prefix_fingerprint(model, length)}/{images_fingerprint(images)}/{self.dtype}".encode()
        ).hexdigest()[:20]
        path = self.folder / f"{split_name}-{key}.npy"
        if path not in self._open:
            if not _valid(path, len(images)):
                self._build(model, length, split_name, images, path)
            self._open[path] = np.load(path, mmap_mode="r")
        return self._open[path]

    def _build(self, model: nn.Module, length: int, split_name: str, images: np.ndarray, path: Path) -> None:
        started = time.perf_counter()
        stages = model_stages(model)[:length]
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.part")
        was_training = model.training
        model.eval()
        out = None
        try:
            with torch.no_grad():
                for start in range(0, len(images), self.batch_size):
                    batch = run_stages(stages, torch.tensor(images[start:start + self.batch_size]))
                    if out is None:
                        shape = (len(images), *batch.shape[1:])
                        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=_DTYPES[self.dtype], shape=shape)
                        _progress(f"{self.site}: caching the frozen prefix ({stages[0].name}..{stages[-1].name}) for "
                                  f"{len(images)} {split_name} images: {out.nbytes / 1e6:.1f} MB in {path.parent}")
                    out[start:start + len(batch)] = batch.numpy()
            if out is None:  # an empty split: store the activation shape of one dummy image
                with torch.no_grad():
                    probe = run_stages(stages, torch.zeros((1, *images.shape[1:]), dtype=torch.float32))
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=_DTYPES[self.dtype], shape=(0, *probe.shape[1:]))
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            model.train(was_training)
        for old in self.folder.glob(f"{split_name}-*.npy"):
            if old != path:
                old.unlink(missing_ok=True)
        self.stats.build_seconds += time.perf_counter() - started
        self.stats.bytes += path.stat().st_size
        self.stats.built.append(split_name)

    def feature_split(self, model: nn.Module, length: int, split_name: str, split) -> FeatureSplit:
        return FeatureSplit(self.features(model, length, split_name, split.images), split.labels)

    def describe(self) -> dict[str, float | int]:
        return {CACHE_BUILD_SECONDS: self.stats.build_seconds,
                CACHE_BYTES: sum(a.nbytes for a in self._open.values())}


def _valid(path: Path, n: int) -> bool:
    """The file exists and is a complete .npy of ``n`` rows (a crash mid-write leaves only a .part file)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape[0] == n


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
