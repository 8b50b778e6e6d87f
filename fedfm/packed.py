"""An adapter as it crosses the network: one flat array per dtype and a layout, not one array per tensor.

A transport that moves every tensor as its own object pays per object (Flower 1.42: a request
per object, signed under node authentication, on every hop between SuperLink, SuperNode and
ClientApp); a LoRA adapter has a tensor per adapted layer. Packed, a message carries one or two
arrays, whatever the adapter. ``layout`` (JSON) names each tensor with its dtype, shape and
offset; :func:`unpack` checks it against the arrays before it slices anything, so a malformed
or hostile layout is an error, not a wrong adapter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np


class LayoutError(ValueError):
    """A layout that does not describe the packed arrays."""


def pack(adapter: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """(one 1-D array per dtype, the layout) of ``adapter``, tensors in its order."""
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    layout = []
    for name, value in adapter.items():
        value = np.asarray(value)
        dtype = value.dtype.str
        offset = sizes.get(dtype, 0)
        layout.append([name, dtype, list(value.shape), offset])
        parts.setdefault(dtype, []).append(value.reshape(-1))
        sizes[dtype] = offset + value.size
    packed = {dtype: np.concatenate(chunks) for dtype, chunks in parts.items()}
    return packed, json.dumps(layout, separators=(",", ":"))


def unpack(packed: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """The adapter ``pack`` made ``packed`` and ``layout`` from (each tensor its own copy)."""
    try:
        entries = json.loads(layout)
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset in entries:
            flat = packed[dtype]
            size = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if name in out or min([offset, size, *shape], default=0) < 0 or offset + size > flat.size:
                raise LayoutError(f"tensor {name!r}: shape {shape} at offset {offset} does not fit the {dtype} array "
                                  f"of {flat.size} values")
            if flat.dtype.str != dtype:
                raise LayoutError(f"tensor {name!r}: the {dtype} array holds {flat.dtype.str}")
            out[str(name)] = flat[offset:offset + size].reshape(shape).copy()
    except LayoutError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise LayoutError(f"the adapter's layout is malformed ({type(err).__name__}: {err})") from err
    return out


def packed_bytes(packed: Mapping[str, np.ndarray], layout: str) -> int:
    """What the packed adapter takes on the wire: its arrays and its layout."""
    return sum(int(a.nbytes) for a in packed.values()) + len(layout.encode())
