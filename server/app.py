"""ServerApp: adapter-only FedAvg over the sites, checkpoints every round, results at the end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfm.appconfig import experiment_from_run_config
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.results import PERSONAL, RunRecorder, SiteEvaluation
from fedfm.site import site_name
from fedfm.transport import encode
from server.strategy import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = experiment_from_run_config(context.run_config)
    run_dir = Path(str(context.run_config.get("out-dir") or "runs/flwr"))
    model = build_global_model(config)
    initial = adapter_state_dict(model)
    recorder = RunRecorder(config, run_dir, model, full_model_bytes(model))
    fed = config.federation
    done = 0
    if context.run_config.get("resume", False):
        done, initial = recorder.resume()
    last = min(int(context.run_config.get("until-round", 0) or fed.rounds), fed.rounds)
    strategy = build_strategy(config, recorder, list(initial))
    wait_for_sites(grid, config.data.num_sites, fed.site_wait_s)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0 and (config.output.checkpoint_every_round or server_round + done == last):
            recorder.checkpoint(server_round, arrays.to_torch_state_dict())

    offset = ConfigRecord({"round-offset": done})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=max(0, last - done),
        timeout=fed.round_timeout_s,
        train_config=offset,
        evaluate_config=ConfigRecord({"split": "val", "round-offset": done}),
        evaluate_fn=checkpoint,
    )
    final = result.arrays if result.arrays is not None else ArrayRecord(initial)
    if last < fed.rounds:
        recorder.write_results(status="paused")
        print(f"[fedfm] paused after round {last}: continue with fedfm simulate --resume {run_dir}", flush=True)
        return
    sent = ArrayRecord(encode(final.to_torch_state_dict(), fed.transport))
    evaluations = (evaluate_on_test(grid, sent, config.eval.share_predictions, fed.round_timeout_s)
                   if config.eval.test else {})  # eval.test=false: a search on validation never reads test
    recorder.record_transfer(sent.count_bytes(), len(evaluations))
    results = recorder.finalize(final.to_torch_state_dict(), evaluations)
    pooled = results["pooled"].get("auroc")
    print(f"[fedfm] done: pooled test AUROC {pooled}, results in {run_dir}", flush=True)


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> int:
    """Wait until every site is connected, or ``timeout`` seconds; returns how many are."""
    deadline = time.time() + timeout
    last_report = 0.0
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected or time.time() >= deadline:
            if connected < expected:
                print(f"[fedfm] {connected} of {expected} sites connected after {timeout:.0f} s: starting with them", flush=True)
            return connected
        if time.time() - last_report >= 10:
            print(f"[fedfm] waiting for sites: {connected} of {expected} connected", flush=True)
            last_report = time.time()
        time.sleep(1)


def evaluate_on_test(grid: Grid, arrays: ArrayRecord, predictions: bool, timeout: float) -> dict[str, SiteEvaluation]:
    """Ask every site to evaluate the final adapter on its own test split."""
    config = ConfigRecord({"split": "test", "return-predictions": predictions})
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    out: dict[str, SiteEvaluation] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            print(f"[fedfm] node {reply.metadata.src_node_id} failed its test evaluation: {reply.error.reason}")
            continue
        metrics = dict(reply.content["metrics"])
        personal = {k[len(PERSONAL):]: metrics.pop(k) for k in list(metrics) if k.startswith(PERSONAL)}
        probs = labels = None
        if "probs" in metrics:
            labels = np.asarray(metrics.pop("labels"), dtype=np.int64)
            probs = np.asarray(metrics.pop("probs"), dtype=np.float64).reshape(len(labels), -1)
        own = None
        if personal:
            own_probs = personal.pop("probs", None)
            if own_probs is not None and labels is not None:
                own_probs = np.asarray(own_probs, dtype=np.float64).reshape(len(labels), -1)
            own = SiteEvaluation(personal, own_probs, labels if own_probs is not None else None)
        out[site_name(int(metrics.pop("site-id")))] = SiteEvaluation(metrics, probs, labels, own)
    return out
