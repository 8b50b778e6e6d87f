"""A site's two calls, without a transport: train on the global adapter, or evaluate it.

The ClientApp (``clients/app.py``) makes them in its own process (simulation: a long-lived Ray
actor) or forwards them to the site's long-lived worker (deployment: ``fedfm/deploy/site_worker.py``);
either way the same function runs and returns the same :class:`Outcome`: plain dicts and numpy
arrays, which the glue turns into a Flower message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfm.appconfig import (
    NODE_HEADS_DIR,
    NODE_SIGNING_KEY,
    apply_node_config,
    experiment_from_run_config,
    ledger_dir,
    site_id_from_node_config,
)
from fedfm.eval.calibration import calibrated_metrics, calibration_from, site_statistics
from fedfm.privacy.heads import LedgerRolledBack
from fedfm.protocol import (
    BUDGET_REFUSED,
    CALIBRATION_STATS,
    HELD_OUT,
    LEDGER_ROLLED_BACK,
    PERSONAL,
    RETURN_PREDICTIONS,
    SPLIT,
    TEMPERATURE,
    VALIDATE,
    eval_metrics,
    server_round,
    with_personal,
    with_predictions,
    with_validation,
)
from fedfm.site import BudgetExhausted, HeldOut, Site
from fedfm.transport import encode

REFUSALS = ((BudgetExhausted, BUDGET_REFUSED), (HeldOut, HELD_OUT), (LedgerRolledBack, LEDGER_ROLLED_BACK))


@dataclass
class Outcome:
    """A site's answer: ``metrics`` (and ``arrays``, ``head`` for training), or a refusal ``error``."""

    metrics: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] | None = None  # the update as it goes on the wire
    head: dict[str, Any] | None = None  # a DP-SGD site's signed ledger head
    error: tuple[int, str] | None = None  # (protocol code, reason)


def build_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: str) -> Site:
    """The site a SuperNode's node config names, for the run its run config describes."""
    config = apply_node_config(experiment_from_run_config(run_config), node_config)
    key = node_config.get(NODE_SIGNING_KEY) or None  # deployment: the SuperNode's private key
    return Site(config, site_id_from_node_config(node_config), ledger_dir(run_config, node_config),
                signing_key=key, run_id=str(run_id), heads_dir=node_config.get(NODE_HEADS_DIR) or None)


def as_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(value, copy=True)) for name, value in arrays.items()}


def as_numpy(adapter: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in adapter.items()}


def train(site: Site, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Outcome:
    """Train one round on the global adapter ``arrays``; a refusal (budget, held out, rolled-back
    ledger) comes back as the outcome's ``error``. With ``VALIDATE`` the site first evaluates
    ``arrays`` on its validation split (the server's last round) and sends those metrics along,
    with its update or with its refusal."""
    validation: dict[str, Any] = {}
    if config.get(VALIDATE):
        with_validation(validation, evaluate(site, arrays, {SPLIT: "val"}).metrics)
    try:
        reply = site.train(as_torch(arrays), server_round(config))
    except tuple(kind for kind, _ in REFUSALS) as refusal:
        code = next(code for kind, code in REFUSALS if isinstance(refusal, kind))
        return Outcome(validation, error=(code, str(refusal)))
    sent = as_numpy(encode(reply.adapter, site.config.federation.transport))
    head = reply.head.to_dict() if reply.head is not None else None  # the coordinator anchors it
    return Outcome({**reply.metrics, **validation}, sent, head)


def evaluate(site: Site, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Outcome:
    """Evaluate the global adapter on the split ``config`` names, with what the server asked for:
    calibration statistics, calibrated metrics, predictions, the personalized model beside it."""
    split = str(config.get(SPLIT, "val"))
    reply = site.evaluate(as_torch(arrays), split)
    # on test, the report shows each site's size and label distribution
    metrics = eval_metrics(site.site_id, reply.metrics, site.sizes(), site.label_counts() if split == "test" else None)
    if bool(config.get(CALIBRATION_STATS, False)) and len(reply.labels):
        metrics.update(site_statistics(reply.probs, reply.labels))
    if TEMPERATURE in config and len(reply.labels):  # the calibration the server fitted on validation
        metrics.update(calibrated_metrics(reply.probs, reply.labels, calibration_from(config)))
    share = bool(config.get(RETURN_PREDICTIONS, False))
    if share:
        with_predictions(metrics, reply.probs, reply.labels)
    if split == "test" and site.personal.enabled:  # the site's personalized model beside the global one
        own = site.evaluate(as_torch(arrays), split, personal=True)
        with_personal(metrics, own.metrics)
        if share:
            with_predictions(metrics, own.probs, None, prefix=PERSONAL)
    return Outcome(metrics)


CALLS = {"train": train, "evaluate": evaluate}
