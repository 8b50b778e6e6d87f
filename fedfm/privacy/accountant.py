"""A site's privacy accountant: one history of every DP-SGD step the site ever took.

The history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly what
Opacus accountants keep. It is rebuilt from the site's ledger, so the same accountant
continues across rounds, processes and restarts, and gives the epsilon of one continuous run.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier


@dataclass(frozen=True)
class StepBatch:
    """``steps`` DP-SGD steps at one noise multiplier and one Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class SiteAccountant:
    """Wraps an Opacus accountant (``prv`` or ``rdp``) whose history persists across rounds."""

    def __init__(self, mechanism: str = "prv", history: list[StepBatch] | None = None):
        self.mechanism = mechanism
        self.opacus: IAccountant = create_accountant(mechanism=mechanism)
        for batch in history or []:
            self.add(batch)

    def add(self, batch: StepBatch) -> None:
        """Compose ``batch`` onto the history (merged like ``IAccountant.step`` merges)."""
        if batch.steps <= 0:
            return
        hist = self.opacus.history
        if hist and hist[-1][0] == batch.noise_multiplier and hist[-1][1] == batch.sample_rate:
            sigma, q, n = hist.pop()
            hist.append((sigma, q, n + batch.steps))
        else:
            hist.append((batch.noise_multiplier, batch.sample_rate, batch.steps))

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self.opacus.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``; 0 before any step."""
        if not self.opacus.history:
            return 0.0
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            # Opacus notes when the best RDP order is its largest, and its PRV takes log(0) at
            # sampling rate 1 (client-level releases); both results are still valid.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(self.opacus.get_epsilon(delta=delta))

    def epsilon_after(self, batch: StepBatch, delta: float) -> float:
        """Epsilon the site would reach after also taking ``batch`` (history unchanged)."""
        trial = copy.deepcopy(self)
        trial.add(batch)
        return trial.epsilon(delta)


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "prv"
) -> float:
    """Smallest noise multiplier (Opacus' search) that keeps ``steps`` steps within ``target_epsilon``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=mechanism,
        ))
