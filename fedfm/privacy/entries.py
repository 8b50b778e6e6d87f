"""One privacy-ledger entry: what every writer appends and every reader parses.

Three writers use it: a site's round of DP-SGD steps (Poisson-sampled Gaussian), a site's release
of its noisy label counts (a Gaussian mechanism, no sampling), and the server's client-level
release of a round (a Gaussian mechanism on the sites' clipped updates). On disk an entry is a
JSON object with the fields below that are set; the ledger adds the chain (``site``,
``prev_hash``, ``hash``, signature) and a site its run id and config hash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fedfm.privacy.accountant import StepBatch

LABEL_COUNTS = "label-counts"  # the kind of a site's noisy label-count release
KINDS = (None, LABEL_COUNTS)  # an entry without a kind is a round of DP-SGD steps (or a client-level round)
POISSON = "poisson"
NO_AMPLIFICATION = "no-amplification"


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str  # the accountant whose epsilon is reported (rdp, prv, dp-accounting-rdp)
    epsilon: float  # cumulative, after this entry
    # every writer sets the fields below that apply to it; an audit needs only the ones above
    sampling: str | None = None  # POISSON (DP-SGD steps) or NO_AMPLIFICATION (a Gaussian mechanism on all of it)
    accountant_library: str | None = None
    kind: str | None = None
    max_grad_norm: float | None = None
    budget_epsilon: float | None = None  # the budget the writer enforced
    n_train: int | None = None
    time: float | None = None
    sensitivity: float | None = None  # label-count release: L2 sensitivity of the histogram
    noisy_label_counts: list[float] | None = None
    class_weights: list[float] | None = None  # a DP-SGD round trained with a class-weighted loss
    sampled_sites: int | None = None  # client-level release: sites averaged, out of population
    population: int | None = None

    def to_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LedgerEntry:
        """The entry in a ledger line (chain, signature and run fields are not part of it)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    @property
    def batch(self) -> StepBatch:
        return StepBatch(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    @property
    def is_label_count_release(self) -> bool:
        return self.kind == LABEL_COUNTS
