"""ClientApp: one hospital site. Messages in, calls on ``fedfm.site.Site``, messages out."""

from __future__ import annotations

import time

import psutil

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm.appconfig import apply_node_config, experiment_from_run_config, ledger_dir, site_id_from_node_config
from fedfm.eval.calibration import calibrated_metrics, calibration_from, site_statistics
from fedfm.privacy.heads import LedgerRolledBack
from fedfm.protocol import (
    ARRAYS,
    BUDGET_REFUSED,
    CALIBRATION_STATS,
    CONFIG,
    HELD_OUT,
    LEDGER_HEAD,
    LEDGER_ROLLED_BACK,
    METRICS,
    PERSONAL,
    PROCESS_AGE,
    RETURN_PREDICTIONS,
    SPLIT,
    TEMPERATURE,
    eval_metrics,
    server_round,
    with_personal,
    with_predictions,
)
from fedfm.site import BudgetExhausted, HeldOut, Site
from fedfm.transport import encode

app = ClientApp()


def site_for(context: Context) -> Site:
    config = apply_node_config(experiment_from_run_config(context.run_config), context.node_config)
    site_id = site_id_from_node_config(context.node_config)
    node = context.node_config
    key = node.get("signing-key") or None  # deployment: the SuperNode's private key
    return Site(config, site_id, ledger_dir(context.run_config, node), signing_key=key, run_id=str(context.run_id),
                heads_dir=node.get("heads-dir") or None)


def process_age() -> float:
    """Seconds since this process started. In deployment Flower 1.42 starts one ClientApp process per
    message, so at the top of a handler this is its start-up: FAB install and imports (torch, peft, opacus).
    In simulation the process is a long-lived Ray actor and the number is its age."""
    return time.time() - psutil.Process().create_time()


@app.train()
def train(msg: Message, context: Context) -> Message:
    age = process_age()
    site = site_for(context)
    adapter = msg.content[ARRAYS].to_torch_state_dict()
    try:
        reply = site.train(adapter, server_round(msg.content[CONFIG]))
    except BudgetExhausted as refusal:
        return Message(error=Error(code=BUDGET_REFUSED, reason=str(refusal)), reply_to=msg)
    except HeldOut as refusal:
        return Message(error=Error(code=HELD_OUT, reason=str(refusal)), reply_to=msg)
    except LedgerRolledBack as refusal:
        return Message(error=Error(code=LEDGER_ROLLED_BACK, reason=str(refusal)), reply_to=msg)
    sent = encode(reply.adapter, site.config.federation.transport)
    content = RecordDict({ARRAYS: ArrayRecord(sent), METRICS: MetricRecord({**reply.metrics, PROCESS_AGE: age})})
    if reply.head is not None:  # the coordinator anchors it (fedfm.privacy.anchors)
        content[LEDGER_HEAD] = ConfigRecord(reply.head.to_dict())
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    config = msg.content[CONFIG]
    split = str(config.get(SPLIT, "val"))
    reply = site.evaluate(msg.content[ARRAYS].to_torch_state_dict(), split)
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
        own = site.evaluate(msg.content[ARRAYS].to_torch_state_dict(), split, personal=True)
        with_personal(metrics, own.metrics)
        if share:
            with_predictions(metrics, own.probs, None, prefix=PERSONAL)
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
