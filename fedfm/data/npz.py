"""What a .npz holds, read without loading its images: every array's shape and dtype, and small arrays.

``np.load`` reads a whole array when it is touched; a MedMNIST 3D or 224 px file holds hundreds of
MB of images, while the checks before a run need only their shapes and the labels. A file that is
not a .npz (random bytes, a truncated download) is one :class:`DataError` line naming ``data.path``.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from fedfm.data.errors import DataError

_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class ArrayHeader:
    """One array of a .npz as its header describes it (the data stays in the file)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0


def not_readable(npz: Path, err: BaseException) -> DataError:
    """The one-line error for a file that cannot be read as a .npz."""
    reason = (str(err).splitlines() or [type(err).__name__])[0] or type(err).__name__
    return DataError(
        f"data.path '{npz}' is not a readable .npz ({reason}): give a MedMNIST .npz "
        "(train/val/test _images and _labels)"
    )


def _header(fh) -> tuple[tuple[int, ...], np.dtype]:
    major, _ = npy_format.read_magic(fh)
    read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(int(d) for d in shape), np.dtype(dtype)


def read_headers(npz: Path) -> dict[str, ArrayHeader]:
    """Shape and dtype of every array in ``npz``, by key (``train_images`` for ``train_images.npy``)."""
    headers: dict[str, ArrayHeader] = {}
    try:
        with zipfile.ZipFile(npz) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as fh:
                    shape, dtype = _header(fh)
                    start = fh.tell()
                expected = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if not dtype.hasobject and info.file_size != expected:
                    raise ValueError(f"{info.filename} holds {info.file_size} bytes, its header says {expected}")
                headers[info.filename[: -len(".npy")]] = ArrayHeader(shape, dtype)
    except _READ_ERRORS as err:
        raise not_readable(npz, err) from None
    pickled = [key for key, h in headers.items() if h.dtype.hasobject]
    if pickled:
        raise DataError(
            f"data.path '{npz}': {', '.join(pickled)} hold Python objects (pickled), which are not loaded: "
            "save them as plain arrays (e.g. site_names as np.array(names, dtype=str))"
        )
    return headers


def read_arrays(npz: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of ``npz``, loaded (meant for labels and site ids, not images)."""
    try:
        with np.load(npz, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except _READ_ERRORS as err:
        raise not_readable(npz, err) from None
