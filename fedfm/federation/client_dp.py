"""Client-level DP-FedAvg: each hospital's whole contribution is protected, the server is trusted.

Every sampled site's update is clipped to ``privacy.client.clipping_norm``, the sites are averaged
with equal weights and Gaussian noise of standard deviation ``z C / m`` is added (McMahan et al.,
ICLR 2018). A round releases only when every sampled site answered (a missing site would change
the noise the guarantee assumes); each release is accounted (``fedfm.privacy.client_level``) and
written, hash-chained, to ``ledger-federation/client-level.jsonl`` so ``fedfm audit`` can
recompute it. A resumed run rebuilds its accountant from that ledger.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.federation.aggregate import Adapter, add_gaussian_noise, clip_update
from fedfm.models.method import weighted_average
from fedfm.federation.replies import Reply
from fedfm.privacy.client_level import DP_ACCOUNTING_RDP, ClientLevelAccountant
from fedfm.privacy.entries import NO_AMPLIFICATION, LedgerEntry
from fedfm.privacy.ledger import SiteLedger
from fedfm.protocol import CLIENT_WEIGHT

log = logging.getLogger("fedfm")

CLIENT_LEDGER = "client-level"
RECORDED = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sampled_sites", "population")


class ClientLevelDP:
    """Aggregator of a client-level DP run; ``guarantee`` is what results.json reports."""

    def __init__(self, noise_multiplier: float, clipping_norm: float, sampled: int, population: int, delta: float,
                 ledger_dir: str | Path, rng: np.random.Generator | None = None):
        if noise_multiplier <= 0 or clipping_norm <= 0 or sampled <= 0:
            raise ValueError("client-level DP needs a positive noise multiplier, clipping norm and number of sites")
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.sampled = sampled
        self.population = population
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = ClientLevelAccountant(delta)
        self.ledger = SiteLedger(ledger_dir, CLIENT_LEDGER)
        self.guarantee: dict[str, Any] | None = None
        for entry in self.ledger.verify():  # a resumed run continues the same accountant
            self.accountant.compose(entry["noise_multiplier"])

    @property
    def noise_std(self) -> float:
        return float(self.noise_multiplier * self.clipping_norm / self.sampled)

    def aggregate(self, server_round: int, current: Adapter, replies: list[Reply]) -> Adapter | None:
        if not replies:
            return None
        if len(replies) != self.sampled:
            log.warning("round %d: %d of %d sampled sites sent a usable update: no client-level release this round",
                        server_round, len(replies), self.sampled)
            return None
        weights = [float(r.metrics[CLIENT_WEIGHT]) for r in replies]
        if any(w != weights[0] or w <= 0 for w in weights):
            raise ValueError(f"client-level DP averages sites with equal positive weights, got {weights}")
        clipped = [clip_update(r.arrays, current, self.clipping_norm) for r in replies]
        released = add_gaussian_noise(weighted_average(clipped, weights), self.noise_std, self.rng)
        self.accountant.compose(self.noise_multiplier)
        self._record(server_round)
        return released

    def _record(self, server_round: int) -> None:
        entry = self.ledger.append(LedgerEntry(
            round=server_round, steps=1, noise_multiplier=self.noise_multiplier, sample_rate=1.0,
            sampling=NO_AMPLIFICATION, sampled_sites=self.sampled, population=self.population,
            max_grad_norm=self.clipping_norm, delta=self.accountant.delta, accountant=DP_ACCOUNTING_RDP,
            accountant_library=f"dp-accounting {version('dp-accounting')}", epsilon=self.accountant.epsilon(),
        ).to_record())
        self.guarantee = {**{k: entry[k] for k in RECORDED}, "rounds": self.accountant.releases}

