"""A site's privacy accountant: one history of every DP release the site ever made.

The history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly what
Opacus accountants keep. It is rebuilt from the site's ledger, so the same accountant
continues across rounds, processes and restarts, and gives the epsilon of one continuous run.
Besides DP-SGD steps (sampled Gaussian mechanisms) it holds the site's release of its noisy
label counts: a Gaussian mechanism on a sensitivity-1 histogram, which is a sampled Gaussian
with sample rate 1 and one step, so the same accountant composes both.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier


def remember_rdp_per_step() -> bool:
    """Compute the RDP of one step of the sampled Gaussian mechanism once per (sample rate, noise,
    order) in this process.

    Opacus' RDP accountant, and its PRV accountant when it sizes its domain, evaluate that number
    at some 60 orders for every history; a site's history grows by the same (noise, rate) each
    round, so from the second round on every value is one it had computed before. Without this,
    one PRV epsilon took about 0.6 s of a deployment round's 1.5 s site call (2 cores), nearly all
    of it in Opacus' series for fractional orders; with it, about 0.05 s. The function is pure
    (floats in, a float or infinity out), so the results are the same to the bit
    (``tests/privacy/test_accountant.py``). Applied to the Opacus release pinned in pyproject.toml,
    where this private function exists; otherwise nothing changes. True when in place."""
    compute = getattr(opacus_rdp, "_compute_rdp", None)
    if compute is None or not callable(compute):
        return False
    if not hasattr(compute, "cache_info"):
        opacus_rdp._compute_rdp = functools.lru_cache(maxsize=4096)(compute)
    return True


remember_rdp_per_step()


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
        """Cumulative epsilon at ``delta``; 0 before any step. The same history gives the same
        number, so it is computed once per process (a round's budget check and its ledger entry
        ask for the same history)."""
        if not self.opacus.history:
            return 0.0
        return history_epsilon(self.mechanism, tuple(self.opacus.history), float(delta))

    def epsilon_after(self, batch: StepBatch | Iterable[StepBatch], delta: float) -> float:
        """Epsilon the site would reach after also taking ``batch`` (or each of several batches,
        in order); the history is unchanged."""
        trial = copy.deepcopy(self)
        for one in [batch] if isinstance(batch, StepBatch) else batch:
            trial.add(one)
        return trial.epsilon(delta)


@functools.lru_cache(maxsize=256)
def history_epsilon(mechanism: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon of an Opacus accountant of kind ``mechanism`` holding ``history``, at ``delta``."""
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # Opacus notes when the best RDP order is its largest, and its PRV takes log(0) at
        # sampling rate 1 (client-level releases); both results are still valid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))


EPSILON_TOLERANCE = 0.01  # how far below the target a calibrated sigma may leave epsilon (Opacus' default)
MAX_NOISE_MULTIPLIER = 1e6


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "prv",
    fixed: Sequence[StepBatch] = (),
) -> float:
    """Smallest noise multiplier that keeps ``steps`` steps within ``target_epsilon``.

    ``fixed`` are releases at a noise of their own that the same budget must also cover (a
    site's noisy label counts), composed before the steps as in the site's ledger. Without
    them this is Opacus' own search.
    """
    if not fixed:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
            ))
    floor = SiteAccountant(mechanism, list(fixed)).epsilon(delta)
    if floor >= target_epsilon:
        raise ValueError(
            f"the fixed releases alone reach epsilon {floor:.4f} >= the target {target_epsilon}: no noise "
            "multiplier leaves room for the steps (raise the label-count noise or the budget)"
        )

    def epsilon_at(sigma: float) -> float:
        return SiteAccountant(mechanism, [*fixed, StepBatch(sigma, sample_rate, steps)]).epsilon(delta)

    # Bracket: sigma_high within the target, sigma_low above it (0: no noise is never within).
    sigma_low, sigma_high = 0.0, 10.0
    eps_high = epsilon_at(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon}")
        eps_high = epsilon_at(sigma_high)
    # Halve the bracket until sigma_high spends the target to within the tolerance (or the
    # bracket is negligibly narrow); sigma_high always stays within the target.
    while target_epsilon - eps_high > EPSILON_TOLERANCE and sigma_high - sigma_low > 1e-9 * sigma_high:
        middle = (sigma_low + sigma_high) / 2
        eps = epsilon_at(middle)
        if eps <= target_epsilon:
            sigma_high, eps_high = middle, eps
        else:
            sigma_low = middle
    return sigma_high
