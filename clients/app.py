"""ClientApp: one hospital site. Messages in, calls on ``fedfm.site.Site``, messages out."""

from __future__ import annotations

import time

import psutil

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm.appconfig import apply_node_config, experiment_from_run_config, ledger_dir, site_id_from_node_config
from fedfm.eval.calibration import calibrated_metrics, calibration_from, site_statistics
from fedfm.results import PERSONAL
from fedfm.privacy.heads import REPLY_KEY, LedgerRolledBack
from fedfm.site import BUDGET_REFUSED, HELD_OUT, LEDGER_ROLLED_BACK, BudgetExhausted, HeldOut, Site
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
    adapter = msg.content["arrays"].to_torch_state_dict()
    try:
        config = msg.content["config"]
        reply = site.train(adapter, int(config["server-round"]) + int(config.get("round-offset", 0)))
    except BudgetExhausted as refusal:
        return Message(error=Error(code=BUDGET_REFUSED, reason=str(refusal)), reply_to=msg)
    except HeldOut as refusal:
        return Message(error=Error(code=HELD_OUT, reason=str(refusal)), reply_to=msg)
    except LedgerRolledBack as refusal:
        return Message(error=Error(code=LEDGER_ROLLED_BACK, reason=str(refusal)), reply_to=msg)
    sent = encode(reply.adapter, site.config.federation.transport)
    content = RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord({**reply.metrics, "process-age-s": age})})
    if reply.head is not None:  # the coordinator anchors it (fedfm.privacy.anchors)
        content[REPLY_KEY] = ConfigRecord(reply.head.to_dict())
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    split = str(msg.content["config"].get("split", "val"))
    reply = site.evaluate(msg.content["arrays"].to_torch_state_dict(), split)
    sizes = site.sizes()
    metrics = {
        **{k: float(v) for k, v in reply.metrics.items() if k != "n"},
        "num-examples": int(reply.metrics.get("n", 0)),
        "site-id": site.site_id,
        "client-weight": 1,  # equal weights, as client-level DP averages sites
        "n-train": sizes["n_train"], "n-val": sizes["n_val"], "n-test": sizes["n_test"],
    }
    if split == "test":  # the report shows each site's size and label distribution
        metrics.update({f"label-counts-{k}": v for k, v in site.label_counts().items()})
    config = msg.content["config"]
    if bool(config.get("calibration-stats", False)) and len(reply.labels):
        metrics.update(site_statistics(reply.probs, reply.labels))
    if "temperature" in config and len(reply.labels):  # the calibration the server fitted on validation
        metrics.update(calibrated_metrics(reply.probs, reply.labels, calibration_from(config)))
    share = bool(config.get("return-predictions", False))
    if share:
        metrics["probs"] = [float(p) for p in reply.probs.reshape(-1)]
        metrics["labels"] = [int(y) for y in reply.labels]
    if split == "test" and site.personal.enabled:  # the site's personalized model beside the global one
        own = site.evaluate(msg.content["arrays"].to_torch_state_dict(), split, personal=True)
        metrics.update({f"{PERSONAL}{k}": float(v) for k, v in own.metrics.items() if k != "n"})
        if share:
            metrics[f"{PERSONAL}probs"] = [float(p) for p in own.probs.reshape(-1)]
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
