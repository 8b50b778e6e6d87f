"""ServerApp: adapter-only FedAvg over the sites, checkpoints every round, results at the end."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfm.appconfig import experiment_from_run_config
from fedfm.eval.calibration import Calibration, calibration_config, fit_calibration, sum_statistics
from fedfm.global_model import build_global_model
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.privacy.anchors import AnchorLog
from fedfm.protocol import (
    ARRAYS,
    CALIBRATION_STATS,
    CONFIG,
    METRICS,
    RETURN_PREDICTIONS,
    ROUND_OFFSET,
    SPLIT,
    decode_eval_reply,
)
from fedfm.results import RunRecorder, SiteEvaluation
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
    # the sites' ledger heads: in the run folder, or (deployment) next to the SuperLink's state, across runs
    anchors = AnchorLog(str(context.run_config.get("anchor-dir") or run_dir / "ledger-federation"))
    strategy = build_strategy(config, recorder, list(initial), anchors, str(context.run_id))
    wait_for_sites(grid, config.data.num_sites, fed.site_wait_s)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0 and (config.output.checkpoint_every_round or server_round + done == last):
            recorder.checkpoint(server_round, arrays.to_torch_state_dict())

    offset = ConfigRecord({ROUND_OFFSET: done})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=max(0, last - done),
        timeout=fed.round_timeout_s,
        train_config=offset,
        evaluate_config=ConfigRecord({SPLIT: "val", ROUND_OFFSET: done}),
        evaluate_fn=checkpoint,
    )
    # no round aggregated (every site refused its first round): the initial adapter is the result
    final = result.arrays if result.arrays is not None and len(result.arrays) else ArrayRecord(initial)
    if last < fed.rounds:
        recorder.write_results(status="paused")
        print(f"[fedfm] paused after round {last}: continue with fedfm simulate --resume {run_dir}", flush=True)
        return
    sent = ArrayRecord(encode(final.to_torch_state_dict(), fed.transport))
    calibration = validate_final(grid, sent, config, recorder)
    test_config = calibration_config(calibration) if calibration is not None else {}
    evaluations = (evaluate_split(grid, sent, "test", config.eval.share_predictions, fed.round_timeout_s, test_config)
                   if config.eval.test else {})  # eval.test=false: a search on validation never reads test
    recorder.record_transfer(sent.count_bytes(), len(evaluations))
    results = recorder.finalize(final.to_torch_state_dict(), evaluations)
    if config.eval.test:
        print(f"[fedfm] done: pooled test AUROC {results['pooled'].get('auroc')}, results in {run_dir}", flush=True)
    else:
        print(f"[fedfm] done (validation only): validation AUROC {recorder.validation.get('auroc')} "
              f"({recorder.validation.get('auroc_kind')}), results in {run_dir}", flush=True)


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


def validate_final(grid: Grid, arrays: ArrayRecord, config, recorder: RunRecorder) -> Calibration | None:
    """The final adapter on every site's validation split: pooled validation metrics (what a search
    selects by) and, with eval.calibrate, the temperature and threshold fitted on the sites' summed
    statistics. Returns the calibration, or None."""
    stats: list[dict] = []
    evaluations = evaluate_split(grid, arrays, "val", config.eval.share_predictions, config.federation.round_timeout_s,
                                 {CALIBRATION_STATS: config.eval.calibrate}, stats)
    recorder.record_transfer(arrays.count_bytes(), len(evaluations))
    calibration = fit_calibration(sum_statistics(stats)) if config.eval.calibrate and stats else None
    recorder.record_validation(evaluations, calibration)
    if calibration is not None:
        threshold = "" if calibration.threshold is None else f", threshold {calibration.threshold:.3f}"
        print(f"[fedfm] calibrated on {len(stats)} sites' validation statistics: temperature "
              f"{calibration.temperature:.3f}{threshold}", flush=True)
    return calibration


def evaluate_split(grid: Grid, arrays: ArrayRecord, split: str, predictions: bool, timeout: float,
                   extra: dict | None = None, statistics: list[dict] | None = None) -> dict[str, SiteEvaluation]:
    """Ask every site to evaluate ``arrays`` on its own ``split``; calibration statistics the sites
    send go into ``statistics`` (one dict per site)."""
    config = ConfigRecord({SPLIT: split, RETURN_PREDICTIONS: predictions, **(extra or {})})
    messages = [
        Message(
            content=RecordDict({ARRAYS: arrays, CONFIG: config}),
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
        content = decode_eval_reply(reply.content[METRICS])
        if content.statistics and statistics is not None:
            statistics.append(content.statistics)
        own = None
        if content.personal:
            own_labels = content.labels if content.personal_probs is not None else None
            own = SiteEvaluation(content.personal, content.personal_probs, own_labels)
        out[content.site] = SiteEvaluation(content.metrics, content.probs, content.labels, own)
    return out
