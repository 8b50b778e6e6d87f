"""Empirical lower bound on a site's epsilon: replay its DP-SGD history with gradient canaries.

The site's training is re-run from the run's initial adapter with the noise multiplier, sampling
rate and steps its ledger records, on its own data, with ``m`` gradient canaries planted
(:mod:`fedfm.audit.canaries`). The one-run test (:mod:`fedfm.audit.one_run`) turns the
canaries' scores into an epsilon lower bound at the stated confidence. A bound above the
claimed epsilon falsifies the claim: the implementation adds less noise than it accounts for.
It is a sanity check, not "the true epsilon": the bound is loose by design.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedfm.config import ExperimentConfig
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict
from fedfm.privacy.accountant import SiteAccountant
from fedfm.audit.canaries import GradientCanaries
from fedfm.audit.one_run import OneRunAudit, audit_scores
from fedfm.site import Site, round_seed
from fedfm.training.local import plan_steps, train_round


@dataclass(frozen=True)
class EmpiricalAudit:
    site: str
    claimed_epsilon: float
    result: OneRunAudit
    threat_model: str = "white box: the auditor sees the released adapter; Dirac gradient canaries"

    @property
    def falsified(self) -> bool:
        return self.result.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "falsified": self.falsified}


def replay_with_canaries(
    config: ExperimentConfig,
    site_id: int,
    entries: list[dict[str, Any]],
    canaries: int,
    seed: int = 0,
    guesses: int | None = None,
    significance: float = 0.05,
) -> EmpiricalAudit:
    """Re-run the site's recorded rounds with ``canaries`` planted and audit the result.

    ``guesses`` (fixed before scoring) is split evenly between "included" and "excluded"
    guesses; the default guesses on a fifth of the canaries.
    """
    entries = [e for e in entries if e.get("kind") != "label-counts"]  # replay the DP-SGD rounds only
    raw = config.model_dump()
    raw["train"]["max_physical_batch_size"] = 10**9  # one physical batch per step: canaries once per step
    cfg = ExperimentConfig.model_validate(raw)
    with tempfile.TemporaryDirectory() as scratch:
        site = Site(cfg, site_id, scratch)
        model = site.fresh_model(adapter_state_dict(build_global_model(cfg)))
        planted = GradientCanaries.plant(model, canaries, cfg.privacy.max_grad_norm, seed)
        before = _trainable(model)
        accountant = SiteAccountant(cfg.privacy.accountant)
        plan = plan_steps(len(site.data.train), cfg.train.batch_size, cfg.train.local_epochs)
        for entry in entries:
            if int(entry["steps"]) != plan.steps or abs(float(entry["sample_rate"]) - plan.sample_rate) > 1e-12:
                raise ValueError(
                    f"{site.name} round {entry['round']}: the ledger records {entry['steps']} steps at q="
                    f"{entry['sample_rate']}, the config gives {plan.steps} at q={plan.sample_rate}: "
                    "audit with the run's own config.yaml"
                )
            train_round(
                model, site.data.train, cfg.train, cfg.privacy, accountant, float(entry["noise_multiplier"]),
                round_seed(cfg.train.seed + 7919 * (seed + 1), site_id, int(entry["round"])),
                on_private_optimizer=planted.install,
            )
        scores = planted.scores(before, _trainable(model))
    k = max(1, (guesses if guesses is not None else canaries // 5) // 2)
    result = audit_scores(scores, planted.included, k, k, float(entries[-1]["delta"]), significance)
    return EmpiricalAudit(site.name, float(entries[-1]["epsilon"]), result)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
