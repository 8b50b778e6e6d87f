"""ClientApp: one hospital site. Messages in, calls on the site (``fedfm.site_calls``), messages out.

In deployment (``FEDFM_SITE_WORKER=1``, set by ``python -m runtime.supernode``) every message is a
fresh process, so this one forwards the call to the site's long-lived worker
(``fedfm.deploy.worker_client``) and imports nothing heavy itself; in simulation (a long-lived
Ray actor) it makes the call in process.
"""

from __future__ import annotations

import os
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm.deploy import worker_client
from fedfm.packed import pack, unpack
from fedfm.protocol import (ARRAYS, CONFIG, LAYOUT, LEDGER_HEAD, METRICS, PROCESS_AGE, REFUSAL, REFUSAL_CODE, REFUSAL_REASON,
                            SITE_CALL_SECONDS, SITE_WORKER_FAILED)

app = ClientApp()

_SITES: dict[str, object] = {}  # in process: the last run's site, like the worker keeps it


def process_age() -> float:
    """Seconds since this process started. In deployment Flower 1.42 starts one ClientApp process per
    message, so at the top of a handler this is its start-up (FAB install, imports). In simulation
    the process is a long-lived Ray actor and the number is its age. On Linux it is read against the
    uptime clock (to 10 ms; ``psutil``'s start time adds the boot time, kept in whole seconds)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


def in_process(request: dict) -> dict:
    from fedfm import site_calls

    started = time.monotonic()
    key = repr((request["run_config"], request["node_config"], request["run_id"]))
    site = _SITES.get(key)
    if site is None:
        _SITES.clear()
        site = _SITES[key] = site_calls.build_site(request["run_config"], request["node_config"], request["run_id"])
    outcome = site_calls.CALLS[request["call"]](site, request["arrays"], request["config"])
    return {"metrics": outcome.metrics, "arrays": outcome.arrays, "head": outcome.head, "error": outcome.error,
            "seconds": time.monotonic() - started}


def handle(call: str, msg: Message, context: Context) -> Message:
    age = process_age()
    config = dict(msg.content[CONFIG])
    arrays = unpack({name: array.numpy() for name, array in msg.content[ARRAYS].items()}, str(config.pop(LAYOUT)))
    request = {
        "call": call, "run_config": dict(context.run_config), "node_config": dict(context.node_config),
        "run_id": str(context.run_id), "config": config, "arrays": arrays,
    }
    if worker_client.enabled():
        try:
            answer = worker_client.call(request, context.node_config, os.getppid())
        except worker_client.WorkerFailed as failed:
            return Message(error=Error(code=SITE_WORKER_FAILED, reason=str(failed)), reply_to=msg)
        if "failed" in answer:
            raise RuntimeError(f"the site worker raised:\n{answer['failed']}")
    else:
        answer = in_process(request)
    if answer["error"] is not None and not answer["metrics"]:
        code, reason = answer["error"]
        return Message(error=Error(code=code, reason=reason), reply_to=msg)
    return Message(content=reply_content(call, answer, age), reply_to=msg)


def reply_content(call: str, answer: dict, age: float) -> RecordDict:
    """The records of a site's answer: its metrics, its update and layout, its signed ledger head; a
    refusal that carries metrics (the validation a train message asked for first) also its code and
    reason, as a Flower error reply holds no content."""
    metrics = dict(answer["metrics"])
    content = RecordDict()
    if answer["error"] is not None:
        code, reason = answer["error"]
        content[REFUSAL] = ConfigRecord({REFUSAL_CODE: int(code), REFUSAL_REASON: str(reason)})
    elif call == "train":
        metrics[PROCESS_AGE] = age
        metrics[SITE_CALL_SECONDS] = answer["seconds"]
    if answer["arrays"] is not None:  # one array per dtype and its layout (fedfm.packed)
        packed, layout = pack(answer["arrays"])
        content[ARRAYS] = ArrayRecord({name: Array(value) for name, value in packed.items()})
        content[LAYOUT] = ConfigRecord({LAYOUT: layout})
    content[METRICS] = MetricRecord(metrics)
    if answer["head"] is not None:  # the coordinator anchors it (fedfm.privacy.anchors)
        content[LEDGER_HEAD] = ConfigRecord(answer["head"])
    return content


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle("evaluate", msg, context)
