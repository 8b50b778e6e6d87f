"""Empirical privacy lower bounds from one training run (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

``m`` canaries are each included in training with probability 1/2. After training an auditor
guesses "included" for the ``k_pos`` highest-scoring canaries and "excluded" for the ``k_neg``
lowest. If training is (eps, delta)-DP, the number ``v`` of correct guesses out of
``r = k_pos + k_neg`` is stochastically dominated, up to a delta term, by Bin(r, e^eps / (1 + e^eps)).
The p-value of observing ``v`` under an eps claim gives a lower bound on the true epsilon:
the largest eps whose p-value is still below the significance level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom


def p_value(eps: float, m: int, guesses: int, correct: int, delta: float) -> float:
    """P-value of ``correct`` right guesses out of ``guesses`` under an (eps, delta) claim, m canaries."""
    q = float(expit(eps))
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Bin(r, q) >= v]
    if delta == 0 or correct == 0:
        return tail
    i = np.arange(1, correct + 1)
    window = binom.sf(correct - i - 1, guesses, q) - tail  # P[v - i <= Bin(r, q) < v]
    return min(1.0, tail + 2 * m * delta * float(np.max(window / i)))


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, significance: float = 0.05) -> float:
    """sup{eps : p_value(eps) < significance}, by bisection; 0 when no eps >= 0 is rejected."""
    if guesses == 0 or p_value(0.0, m, guesses, correct, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi, m, guesses, correct, delta) < significance:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        if p_value(mid, m, guesses, correct, delta) < significance:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-7:
            break
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    significance: float
    delta: float


def audit_scores(
    scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int, delta: float, significance: float = 0.05
) -> OneRunAudit:
    """Guess the ``k_pos`` highest scores as included and the ``k_neg`` lowest as excluded.

    ``k_pos`` and ``k_neg`` must be fixed before the scores are seen (choosing them after needs
    a correction); ``included`` is the true membership of each canary.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if k_pos + k_neg > scores.size:
        raise ValueError(f"k_pos + k_neg = {k_pos + k_neg} guesses exceed the {scores.size} canaries")
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[scores.size - k_pos:]].sum()) if k_pos else 0
    correct += int((~included[order[:k_neg]]).sum())
    bound = epsilon_lower_bound(scores.size, k_pos + k_neg, correct, delta, significance)
    return OneRunAudit(int(scores.size), k_pos + k_neg, correct, bound, significance, delta)
