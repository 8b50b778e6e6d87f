"""FedAvg over adapter weights only, with per-site bookkeeping and reply checks."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedfm.results import RunRecorder
from fedfm.site import BUDGET_REFUSED, site_name

log = logging.getLogger("fedfm")


class AdapterFedAvg(FedAvg):
    """FedAvg whose replies must carry exactly the adapter keys it sent, all finite.

    A reply that fails the checks is dropped for that round (named in the log and in
    results.json); a site that refuses a round (privacy budget) replies with an error,
    which is recorded as a refusal. Per-site metrics are kept, not only their average.
    """

    def __init__(self, recorder: RunRecorder, adapter_keys: list[str], **kwargs):
        super().__init__(**kwargs)
        self.recorder = recorder
        self.adapter_keys = list(adapter_keys)
        self._train: dict[str, dict[str, float]] = {}
        self._refused: dict[str, str] = {}
        self.out_of_budget: set[int] = set()  # nodes that refused a round for their privacy budget

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = set(grid.get_node_ids())
        if nodes and nodes <= self.out_of_budget:
            if self.recorder.stopped is None:
                self.recorder.stopped = f"round {server_round}: every site has spent its privacy budget"
                log.warning("%s; no further training", self.recorder.stopped)
            return []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.record_transfer(arrays.count_bytes(), len(messages))
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.recorder.stopped is not None:
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.recorder.record_transfer(arrays.count_bytes(), len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept: list[Message] = []
        self._train, self._refused = {}, {}
        for msg in replies:
            node = f"node {msg.metadata.src_node_id}"
            if msg.has_error():
                if msg.error.code == BUDGET_REFUSED:
                    self.out_of_budget.add(msg.metadata.src_node_id)
                self._refused[node] = msg.error.reason or f"error code {msg.error.code}"
                log.warning("round %d: %s did not train: %s", server_round, node, self._refused[node])
                continue
            problem = self.reply_problem(msg.content)
            if problem:
                self._refused[node] = f"rejected: {problem}"
                log.warning("round %d: reply of %s rejected: %s", server_round, node, problem)
                continue
            metrics = dict(msg.content["metrics"])
            self._train[site_name(int(metrics["site-id"]))] = metrics
            kept.append(msg)
        if kept:
            self.recorder.record_transfer(kept[0].content["arrays"].count_bytes(), len(kept))
        return super().aggregate_train(server_round, kept)

    def reply_problem(self, content: RecordDict) -> str | None:
        """Why the content of a train reply cannot be averaged, or None when it can."""
        arrays = [v for v in content.values() if isinstance(v, ArrayRecord)]
        if len(arrays) != 1 or "metrics" not in content:
            return "a train reply needs one ArrayRecord and one MetricRecord"
        keys = list(arrays[0].keys())
        if keys != self.adapter_keys:
            missing = sorted(set(self.adapter_keys) - set(keys))[:3]
            extra = sorted(set(keys) - set(self.adapter_keys))[:3]
            return f"adapter keys differ from the ones sent (missing {missing}, unexpected {extra})"
        for key, array in arrays[0].items():
            values = array.numpy()
            if not np.issubdtype(values.dtype, np.floating) or not np.all(np.isfinite(values)):
                return f"tensor '{key}' is not finite floating point"
        return None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self.recorder.stopped is not None and not self._train:
            return None
        evaluation = {
            site_name(int(msg.content["metrics"]["site-id"])): dict(msg.content["metrics"])
            for msg in replies
            if not msg.has_error()
        }
        aggregated = super().aggregate_evaluate(server_round, replies)
        entry = self.recorder.record_round(server_round, self._train, self._refused, evaluation)
        print(progress_line(entry, self.recorder.config.federation.rounds), flush=True)
        return aggregated


def progress_line(entry: dict, rounds: int) -> str:
    parts = [f"[fedfm] round {entry['round']}/{rounds}: {len(entry['participants'])} sites trained"]
    if entry["refused"]:
        parts.append(f"{len(entry['refused'])} refused/rejected")
    if entry["train_loss"] is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    if entry["max_epsilon"]:
        parts.append(f"max epsilon {entry['max_epsilon']:.3f}")
    if entry["val_auroc"] is not None:
        parts.append(f"val AUROC {entry['val_auroc']:.4f}")
    parts.append(f"{entry['elapsed_s']:.0f} s")
    return ", ".join(parts)
