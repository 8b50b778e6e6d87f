"""How adapters cross the network: fp32 as trained, or fp16 (``federation.transport``) for half the bytes.

Only the wire format changes: sites train in fp32 and the server averages in fp32, so the cast is
applied on sending and undone on receipt. Under DP the cast happens after the noise (post-processing).
"""

from __future__ import annotations

import torch

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def encode(adapter: dict[str, torch.Tensor], transport: str) -> dict[str, torch.Tensor]:
    """The adapter as it is sent: every floating tensor in the transport's dtype."""
    dtype = WIRE_DTYPES[transport]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in adapter.items()}


def decode(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as it is used: fp32."""
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in adapter.items()}
