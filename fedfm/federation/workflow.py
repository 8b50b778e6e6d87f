"""A whole federated run on the server, over any :class:`~fedfm.federation.link.Link`:
wait for the sites, the rounds (checkpointed), then the final adapter on every site's
validation split (calibration fitted there) and, once, on its test split."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.config import ExperimentConfig
from fedfm.eval.calibration import Calibration, calibration_config, fit_calibration, sum_statistics
from fedfm.federation.aggregate import Adapter
from fedfm.federation.coordinator import Coordinator, build_coordinator
from fedfm.federation.link import EVALUATE, TRAIN, Link, Outgoing
from fedfm.federation.replies import Reply
from fedfm.global_model import run_method
from fedfm.models import adapter_state_dict, full_model_bytes
from fedfm.privacy.anchors import AnchorLog
from fedfm.protocol import CALIBRATION_STATS, RETURN_PREDICTIONS, SPLIT, decode_eval_reply, round_metrics
from fedfm.results import RunRecorder, SiteEvaluation
from fedfm.transport import encode

log = logging.getLogger("fedfm")

NODE_POLL_S = 1.0  # while fewer sites are connected than a round needs


@dataclass
class RunRequest:
    """What the coordinator was asked to do (from the run config)."""

    run_dir: Path
    run_id: str = ""
    resume: bool = False
    until_round: int = 0  # stop (paused) after this round; 0: run every round
    anchor_dir: str = ""  # deployment: the sites' ledger heads live next to the SuperLink's state
    ledger_dir: str = ""  # simulation: the sites' ledger folder (results.json reads their spent epsilon there)


def serve(link: Link, config: ExperimentConfig, request: RunRequest) -> dict[str, Any] | None:
    """Run (or resume) the federation; returns results.json's content, None when paused."""
    run_dir = request.run_dir
    method = run_method(config)
    model = method.global_model()
    initial = adapter_state_dict(model)
    recorder = RunRecorder(config, run_dir, model, full_model_bytes(model), method=method,
                           ledger_dir=Path(request.ledger_dir) if request.ledger_dir else None)
    fed = config.federation
    done = 0
    if request.resume:
        done, initial = recorder.resume()
    last = min(int(request.until_round or fed.rounds), fed.rounds)
    anchors = AnchorLog(request.anchor_dir or run_dir / "ledger-federation")
    coordinator = build_coordinator(config, recorder, list(initial), anchors, request.run_id)
    wait_for_sites(link, config.data.num_sites, fed.site_wait_s)

    def checkpoint(server_round: int, adapter: Adapter) -> None:
        if server_round > 0 and (config.output.checkpoint_every_round or server_round + done == last):
            recorder.checkpoint(server_round, adapter)

    deferred: list[LastValidation] = []
    final = run_rounds(link, coordinator, initial, max(0, last - done), fed.round_timeout_s, checkpoint, deferred)
    if last < fed.rounds:
        recorder.write_results(status="paused")
        print(f"[fedfm] paused after round {last}: continue with fedfm simulate --resume {run_dir}", flush=True)
        return None
    sent = encode(final, fed.transport)
    calibration = validate_final(link, sent, config, recorder, coordinator, deferred[0] if deferred else None)
    test_config = calibration_config(calibration) if calibration is not None else {}
    evaluations = (evaluate_split(link, sent, "test", config.eval.share_predictions, fed.round_timeout_s, test_config)
                   if config.eval.test else {})  # eval.test=false: a search on validation never reads test
    recorder.record_transfer(link.wire_bytes(sent), len(evaluations))
    results = recorder.finalize(final, evaluations)
    if config.eval.test:
        print(f"[fedfm] done: pooled test AUROC {results['pooled'].get('auroc')}, results in {run_dir}", flush=True)
    else:
        print(f"[fedfm] done (validation only): validation AUROC {recorder.validation.get('auroc')} "
              f"({recorder.validation.get('auroc_kind')}), results in {run_dir}", flush=True)
    return results


@dataclass
class LastValidation:
    """The run's last round, whose validation rides with the final validation (same adapter, same split)."""

    server_round: int
    nodes: list[int]


def run_rounds(link: Link, coordinator: Coordinator, initial: Adapter, num_rounds: int, timeout: float,
               after_round: Callable[[int, Adapter], None], deferred: list[LastValidation] | None = None) -> Adapter:
    """``num_rounds`` rounds of train + validation; the global adapter at the end.

    With ``federation.validate_with_next_train`` a round's validation (of its aggregate) is asked
    for in the next round's train messages, which carry that same adapter: one message per site
    per round. Sites not training next round get an evaluate message; a run paused after round k
    validates round k with the train messages of its resumption. The run's last round gets
    evaluate messages, unless ``deferred`` is given: then its validation is appended there, for
    :func:`validate_final` to take from the final validation's replies.
    """
    adapter = initial
    after_round(0, adapter)
    pending = coordinator.pending_validation(link)  # a resumed run: its last round's validation
    for server_round in range(1, num_rounds + 1):
        nodes = planned(lambda connected: coordinator.train_nodes(server_round, connected), link)
        ahead = pending if coordinator.config.federation.validate_with_next_train else None
        messages: list[Outgoing] = []
        if nodes or ahead:
            wire = coordinator.outgoing(adapter)
            messages = coordinator.train_messages(server_round, nodes, wire, ahead)
            coordinator.sent(link.wire_bytes(wire), len(messages))
        train, validation = coordinator.split_replies(link.exchange(messages, timeout) if messages else [])
        if ahead is not None:
            coordinator.receive_evaluate(server_round - 1, validation, timed=False)
        aggregated = coordinator.receive_train(server_round, train)
        if aggregated is not None:
            adapter = aggregated
        pending = planned(lambda connected: coordinator.evaluate_nodes(server_round, connected), link)
        if coordinator.config.federation.validate_with_next_train and coordinator.is_last(server_round) \
                and deferred is not None:
            deferred.append(LastValidation(server_round, pending))
            pending = []
        elif not coordinator.config.federation.validate_with_next_train or coordinator.is_last(server_round):
            validate_round(link, coordinator, server_round, adapter, pending, timeout)
            pending = []
        after_round(server_round, adapter)  # a paused run's resumption sends what is still pending
    if pending and coordinator.is_last(num_rounds):  # resumed after its last round, its validation to come
        validate_round(link, coordinator, num_rounds, adapter, pending, timeout)
    return adapter


def validate_round(link: Link, coordinator: Coordinator, server_round: int, adapter: Adapter, nodes: list[int],
                   timeout: float) -> None:
    """Round ``server_round``'s adapter on the validation split of ``nodes``, in evaluate messages."""
    replies = []
    if nodes:
        wire = encode(adapter, coordinator.config.federation.transport)
        coordinator.sent(link.wire_bytes(wire), len(nodes))
        config = coordinator.message_config(server_round, split="val")
        replies = link.exchange([Outgoing(n, EVALUATE, wire, config) for n in nodes], timeout)
    coordinator.receive_evaluate(server_round, replies)


def planned(plan: Callable[[list[int]], list[int] | None], link: Link) -> list[int]:
    """``plan``'s nodes, once enough nodes are connected for it."""
    waited = 0.0
    while (nodes := plan(link.nodes())) is None:
        if waited % 10 == 0:
            log.info("waiting for sites to connect (%d connected)", len(link.nodes()))
        time.sleep(NODE_POLL_S)
        waited += NODE_POLL_S
    return nodes


def wait_for_sites(link: Link, expected: int, timeout: float) -> int:
    """Wait until every site is connected, or ``timeout`` seconds; returns how many are."""
    deadline = time.time() + timeout
    last_report = 0.0
    while True:
        connected = len(link.nodes())
        if connected >= expected or time.time() >= deadline:
            if connected < expected:
                print(f"[fedfm] {connected} of {expected} sites connected after {timeout:.0f} s: starting with them", flush=True)
            return connected
        if time.time() - last_report >= 10:
            print(f"[fedfm] waiting for sites: {connected} of {expected} connected", flush=True)
            last_report = time.time()
        time.sleep(1)


def validate_final(link: Link, adapter: Adapter, config: ExperimentConfig, recorder: RunRecorder,
                   coordinator: Coordinator | None = None, last: LastValidation | None = None) -> Calibration | None:
    """The final adapter on every site's validation split: pooled validation metrics (what a search
    selects by) and, with eval.calibrate, the temperature and threshold fitted on the sites' summed
    statistics. With ``last``, the same replies are the last round's validation (the final adapter
    is that round's): no second message per site. Returns the calibration, or None."""
    stats: list[dict] = []
    extra: dict[str, Any] = {CALIBRATION_STATS: config.eval.calibrate}
    if last is not None and coordinator is not None:
        extra.update(coordinator.message_config(last.server_round, split="val"))
    replies = exchange_split(link, adapter, "val", config.eval.share_predictions, config.federation.round_timeout_s,
                             extra)
    if last is not None and coordinator is not None:
        wanted = set(last.nodes)
        coordinator.receive_evaluate(last.server_round, [
            Reply(r.node, metrics=round_metrics(r.metrics), error_code=r.error_code, error_reason=r.error_reason)
            for r in replies if r.node in wanted], timed=False)  # the round ended with its training
    evaluations = site_evaluations(replies, "validation", stats)
    recorder.record_transfer(link.wire_bytes(adapter), len(evaluations))
    calibration = fit_calibration(sum_statistics(stats)) if config.eval.calibrate and stats else None
    recorder.record_validation(evaluations, calibration)
    if calibration is not None:
        threshold = "" if calibration.threshold is None else f", threshold {calibration.threshold:.3f}"
        print(f"[fedfm] calibrated on {len(stats)} sites' validation statistics: temperature "
              f"{calibration.temperature:.3f}{threshold}", flush=True)
    return calibration


def evaluate_split(link: Link, adapter: Adapter, split: str, predictions: bool, timeout: float,
                   extra: dict | None = None, statistics: list[dict] | None = None) -> dict[str, SiteEvaluation]:
    """Ask every site to evaluate ``adapter`` on its own ``split``; calibration statistics the sites
    send go into ``statistics`` (one dict per site)."""
    replies = exchange_split(link, adapter, split, predictions, timeout, extra)
    return site_evaluations(replies, "test" if split == "test" else "validation", statistics)


def exchange_split(link: Link, adapter: Adapter, split: str, predictions: bool, timeout: float,
                   extra: dict | None = None) -> list[Reply]:
    """One evaluate message of ``adapter`` on ``split`` to every connected site; their replies."""
    config = {SPLIT: split, RETURN_PREDICTIONS: predictions, **(extra or {})}
    return link.exchange([Outgoing(node, EVALUATE, adapter, config) for node in link.nodes()], timeout)


def site_evaluations(replies: list[Reply], what: str, statistics: list[dict] | None = None) -> dict[str, SiteEvaluation]:
    """Each answering site's evaluation, by site name; failed replies are reported and left out."""
    out: dict[str, SiteEvaluation] = {}
    for reply in replies:
        if reply.failed:
            print(f"[fedfm] node {reply.node} failed its {what} evaluation: {reply.error_reason}")
            continue
        content = decode_eval_reply(reply.metrics)
        if content.statistics and statistics is not None:
            statistics.append(content.statistics)
        own = None
        if content.personal:
            own_labels = content.labels if content.personal_probs is not None else None
            own = SiteEvaluation(content.personal, content.personal_probs, own_labels)
        out[content.site] = SiteEvaluation(content.metrics, content.probs, content.labels, own)
    return out
