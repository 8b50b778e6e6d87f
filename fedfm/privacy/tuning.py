"""The privacy cost of hyperparameter tuning: several DP-SGD trials on the same private data.

Two guarantees, for two different procedures:

* **Every trial is released, or the trials form a fixed grid** (every candidate runs, whatever
  the outcome): only composition applies. ``composed_epsilon`` composes every ledger entry of
  every trial; ``fixed_trials_epsilon`` composes ``k`` copies of one trial. Always valid.
* **Random search, best trial only** (Papernot & Steinke, "Hyperparameter Tuning with Renyi
  Differential Privacy", ICLR 2022, arXiv:2110.03620): the number of trials K is drawn at random
  from a truncated negative binomial or a Poisson distribution, *before* and independently of
  the data; each trial draws its candidate hyperparameters independently from one fixed
  distribution; and only the best trial's output (by a score the trials themselves compute
  privately) is released. Then the cost grows with log E[K] rather than with K. The bound does
  NOT apply to a fixed K, to a grid where every candidate runs, to candidates chosen adaptively
  from earlier trials, or when more than the best trial is released (e.g. every trial's
  adapters or scores): use composition there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_delta
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedfm.privacy.accountant import SiteAccountant
from fedfm.privacy.ledger import batch_of

# Opacus' grid (fractional 1.1-10.9, integers 12-63) and a few larger orders, which the
# log(E[K]) / (lam - 1) term of the tuning bounds favours.
ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, 80, 100, 128, 192, 256)


def composed_epsilon(histories: list[list[dict[str, Any]]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of running every trial on the same data: all entries of all trials composed.

    Valid whatever the tuning procedure (fixed grid, adaptive search, every trial released).
    Only each entry's sigma, q and steps are read; ``delta`` and ``accountant`` are the caller's.
    """
    return SiteAccountant(accountant, [batch_of(entry) for trial in histories for entry in trial]).epsilon(delta)


def expected_trials_tnb(eta: float, gamma: float) -> float:
    """E[K] for the truncated negative binomial D_{eta,gamma} (Definition 1 of the paper).

    eta = 0 is the logarithmic distribution, eta = 1 the geometric one (E[K] = 1 / gamma).
    """
    _check_tnb(eta, gamma)
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def ps_rdp_truncated_negative_binomial(
    rdp: float, lam: float, rdp_hat: float, lam_hat: float, eta: float, gamma: float
) -> float:
    """Theorem 2 of Papernot & Steinke: RDP at order ``lam`` of the best of K ~ D_{eta,gamma} trials.

    If one trial is (lam, rdp)-RDP and (lam_hat, rdp_hat)-RDP (lam > 1, lam_hat >= 1; two points
    of the same trial's RDP curve), the best of K trials is (lam, eps')-RDP with
    eps' = rdp + (1 + eta) (1 - 1/lam_hat) rdp_hat + (1 + eta) log(1/gamma) / lam_hat + log(E[K]) / (lam - 1).
    """
    if lam <= 1 or lam_hat < 1:
        raise ValueError(f"need lam > 1 and lam_hat >= 1, got {lam}, {lam_hat}")
    mean = expected_trials_tnb(eta, gamma)
    return (
        rdp
        + (1 + eta) * (1 - 1 / lam_hat) * rdp_hat
        + (1 + eta) * math.log(1 / gamma) / lam_hat
        + math.log(mean) / (lam - 1)
    )


def ps_rdp_poisson(rdp: float, lam: float, eps_hat: float, delta_hat: float, mu: float) -> float:
    """Theorem 6 of Papernot & Steinke: RDP at order ``lam`` of the best of K ~ Poisson(mu) trials.

    If one trial is (lam, rdp)-RDP and (eps_hat, delta_hat)-DP with exp(eps_hat) <= 1 + 1/(lam - 1),
    the best of K trials is (lam, rdp + mu * delta_hat + log(mu) / (lam - 1))-RDP. When the side
    condition fails the theorem gives nothing at this order: ``math.inf`` is returned.
    """
    if lam <= 1 or mu <= 0 or not 0 <= delta_hat <= 1 or eps_hat < 0:
        raise ValueError(
            f"need lam > 1, mu > 0, delta_hat in [0, 1], eps_hat >= 0; got {lam}, {mu}, {delta_hat}, {eps_hat}"
        )
    if eps_hat > math.log1p(1 / (lam - 1)):
        return math.inf
    return rdp + mu * delta_hat + math.log(mu) / (lam - 1)


@dataclass(frozen=True)
class TuningEpsilon:
    """(epsilon, delta) of the released best trial, the RDP order that gave it, and E[K]."""

    epsilon: float
    delta: float
    order: float
    expected_trials: float
    distribution: str


def trial_rdp(sigma: float, q: float, steps: int, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP curve of one trial: ``steps`` Poisson-subsampled Gaussian steps (Opacus' analysis)."""
    return np.atleast_1d(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))).astype(float)


def ps_epsilon(
    sigma: float,
    q: float,
    steps: int,
    delta: float,
    distribution: str = "tnb",
    *,
    mu: float | None = None,
    eta: float | None = None,
    gamma: float | None = None,
    orders: Sequence[float] = ORDERS,
) -> TuningEpsilon:
    """Epsilon at ``delta`` of releasing the best of a random number K of DP-SGD trials.

    Each trial is ``steps`` steps at noise ``sigma`` and sampling rate ``q``. ``distribution``
    is ``"tnb"`` (K ~ D_{eta,gamma}, Theorem 2) or ``"poisson"`` (K ~ Poisson(mu), Theorem 6).
    Valid only under the conditions of the module docstring (random K, independent candidates,
    only the best trial released); otherwise use ``fixed_trials_epsilon`` / ``composed_epsilon``.

    Choices, at every order lam of ``orders``:
    * tnb: (lam_hat, rdp_hat) is the point of the trial's own RDP curve minimising the theorem's
      lam_hat terms (they do not depend on lam, so one lam_hat serves every order);
    * poisson: eps_hat = log(1 + 1/(lam - 1)), the largest the theorem allows, and delta_hat is
      the trial's delta at eps_hat from its RDP curve. delta_hat only grows as eps_hat shrinks,
      so no other (eps_hat, delta_hat) does better at that order; no share of ``delta`` is spent.
    RDP is non-decreasing in the order, so each bound also holds at every lower order; the
    resulting curve is converted to (eps, delta) with Opacus' conversion (Balle et al. 2020),
    minimised over the orders.
    """
    lams = np.sort(np.asarray(orders, dtype=float))
    return ps_epsilon_of_curve(trial_rdp(sigma, q, steps, lams), lams, delta, distribution, mu=mu, eta=eta, gamma=gamma)


def ps_epsilon_of_curve(
    rdp: np.ndarray,
    lams: np.ndarray,
    delta: float,
    distribution: str = "tnb",
    *,
    mu: float | None = None,
    eta: float | None = None,
    gamma: float | None = None,
    then: np.ndarray | None = None,
) -> TuningEpsilon:
    """:func:`ps_epsilon` for a trial given by its RDP curve ``rdp`` at the sorted orders ``lams``
    (e.g. the largest curve over candidates of different shapes, which bounds a trial whose
    candidate is drawn at random); ``then`` is the RDP curve of what runs after the search on the
    same data (e.g. the chosen candidate trained once more), composed with the bound."""
    if distribution == "tnb":
        if eta is None or gamma is None:
            raise ValueError("the truncated negative binomial needs eta and gamma")
        mean = expected_trials_tnb(eta, gamma)
        hat = int(np.argmin((1 - 1 / lams) * rdp + math.log(1 / gamma) / lams))
        bound = [
            ps_rdp_truncated_negative_binomial(r, lam, rdp[hat], lams[hat], eta, gamma) for r, lam in zip(rdp, lams)
        ]
    elif distribution == "poisson":
        if mu is None:
            raise ValueError("the Poisson distribution needs mu")
        mean = mu
        bound = []
        for r, lam in zip(rdp, lams):
            eps_hat = math.log1p(1 / (lam - 1))
            delta_hat, _ = compute_delta(lams, rdp, eps_hat)
            bound.append(ps_rdp_poisson(r, lam, eps_hat, delta_hat, mu))
    else:
        raise ValueError(f"distribution must be 'tnb' or 'poisson', got {distribution!r}")
    monotone = np.minimum.accumulate(np.asarray(bound)[::-1])[::-1]
    if then is not None:
        monotone = monotone + np.asarray(then, dtype=float)
    epsilon, order = _to_dp(lams, monotone, delta)
    return TuningEpsilon(epsilon, delta, order, mean, distribution)


def fixed_trials_epsilon(
    sigma: float, q: float, steps: int, k: int, delta: float, orders: Sequence[float] = ORDERS
) -> float:
    """Epsilon of ``k`` trials run on the same data by plain RDP composition (k-fold RDP).

    The guarantee for a fixed number of trials, a grid, or when every trial is released.
    """
    lams = np.asarray(orders, dtype=float)
    return _to_dp(lams, k * trial_rdp(sigma, q, steps, lams), delta)[0]


def _to_dp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        epsilon, order = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(epsilon), float(order)


def _check_tnb(eta: float, gamma: float) -> None:
    if not eta > -1 or not 0 < gamma < 1:
        raise ValueError(f"need eta > -1 and 0 < gamma < 1, got eta={eta}, gamma={gamma}")
