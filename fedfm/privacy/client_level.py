"""Client-level DP accounting: one Gaussian release per round over the sites' clipped updates.

Each round the server releases the average of the sampled sites' updates, each clipped to L2
norm C, plus Gaussian noise of standard deviation ``z C / m`` (m sites, equal weights): a Gaussian
mechanism of noise multiplier z on the sum, with a whole site as the unit of privacy. The server
chooses the sites, so there is no amplification by sampling; releases compose by RDP on
dp-accounting's default order grid (the accountant Flower's ``RdpAccountant`` wraps).
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import rdp

DP_ACCOUNTING_RDP = "dp-accounting-rdp"  # the ledger's name of this accountant


class ClientLevelAccountant:
    """The composed epsilon of a run's client-level releases."""

    def __init__(self, delta: float):
        self.delta = delta
        self.noise_multipliers: list[float] = []
        self._rdp = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)

    def compose(self, noise_multiplier: float) -> None:
        if noise_multiplier <= 0:
            raise ValueError(f"a client-level release needs a positive noise multiplier, not {noise_multiplier}")
        self._rdp.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
        self.noise_multipliers.append(noise_multiplier)

    @property
    def releases(self) -> int:
        return len(self.noise_multipliers)

    def epsilon(self) -> float:
        return float(self._rdp.get_epsilon(self.delta)) if self.noise_multipliers else 0.0
