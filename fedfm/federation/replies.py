"""What a site sends back, as the federation core sees it (no transport types), and the checks
that decide whether a train reply can be averaged.

The server glue turns each transport message into a :class:`Reply`; the checks here are the
whole screening protocol: an error reply is a refusal (out of budget, ledger rolled back) or a
held-out site; a reply that trained must anchor its signed ledger head (DP-SGD runs); its
adapter must have exactly the keys the server sent, every tensor finite floating point, and
whatever the adaptation method asks of that site's update (per-site ranks: its rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfm.protocol import HELD_OUT, REFUSALS_FOR_THE_RUN, reply_site


@dataclass
class Reply:
    """One site's answer to a message of the server."""

    node: int  # the transport's id of the sending node
    arrays: dict[str, torch.Tensor] | None = None  # the adapter as it crossed the network
    metrics: dict[str, Any] | None = None
    ledger_head: dict[str, Any] | None = None  # DP-SGD train replies: the site's signed ledger head
    error_code: int | None = None  # set when the site answered with an error instead of content
    error_reason: str = ""
    nbytes: int = 0  # what the adapter took on the wire
    malformed: str | None = None  # the glue's finding when the content is not one adapter + one metrics record
    load: Callable[[], dict[str, torch.Tensor]] | None = None  # decodes the adapter on demand (after the size check)

    def decode(self) -> dict[str, torch.Tensor] | None:
        """The adapter, decoded from the wire now if it was not yet."""
        if self.arrays is None and self.load is not None:
            self.arrays, self.load = self.load(), None
        return self.arrays

    @property
    def failed(self) -> bool:
        return self.error_code is not None

    @property
    def held_out(self) -> bool:
        return self.error_code == HELD_OUT

    @property
    def refused_for_the_run(self) -> bool:
        """Out of budget or a rolled-back ledger: the site will not train again in this run."""
        return self.error_code in REFUSALS_FOR_THE_RUN

    @property
    def site(self) -> str:
        return reply_site(self.metrics or {})

    @property
    def label(self) -> str:
        return f"node {self.node}"


def adapter_problem(arrays: dict[str, torch.Tensor], adapter_keys: list[str]) -> str | None:
    """Why an adapter cannot be averaged with the ones that have ``adapter_keys``, or None."""
    keys = list(arrays)
    if keys != adapter_keys:
        missing = sorted(set(adapter_keys) - set(keys))[:3]
        extra = sorted(set(keys) - set(adapter_keys))[:3]
        return f"adapter keys differ from the ones sent (missing {missing}, unexpected {extra})"
    for key, tensor in arrays.items():
        values = tensor.numpy()
        if not np.issubdtype(values.dtype, np.floating) or not np.all(np.isfinite(values)):
            return f"tensor '{key}' is not finite floating point"
    return None


@dataclass
class Screening:
    """A round's train replies sorted into the ones to average and the ones that did not count."""

    kept: list[Reply] = field(default_factory=list)  # sorted by site id
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its train metrics
    refused: dict[str, str] = field(default_factory=dict)  # node label -> why it did not count
    clipped: dict[str, float] = field(default_factory=dict)  # site -> its update's norm, when the server bound it
