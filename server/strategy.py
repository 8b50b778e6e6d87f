"""FedAvg over adapter weights only, with per-site bookkeeping and reply checks.

Two strategies share one bookkeeping mixin: :class:`AdapterFedAvg` (sample-level DP or none)
and :class:`ClientDPFedAvg`, Flower's server-side fixed-clipping DP wrapper with its RDP
accountant (client-level DP: each hospital's whole contribution is protected).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

# flwr.serverapp exports PrivacyConfig but not the two enums it takes (flwr 1.42).
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from fedfm.config import ExperimentConfig
from fedfm.models.stacking import LORA_A, LORA_B, stack
from fedfm.privacy.anchors import AnchorLog, AnchorRejected
from fedfm.privacy.audit import DP_ACCOUNTING_RDP
from fedfm.privacy.heads import LedgerHead
from fedfm.privacy.ledger import SiteLedger
from fedfm.protocol import (
    ARRAYS,
    CLIENT_WEIGHT,
    HELD_OUT,
    LEDGER_HEAD,
    METRICS,
    REFUSALS_FOR_THE_RUN,
    SITE_ID,
    reply_site,
)
from fedfm.results import RunRecorder
from fedfm.transport import decode, encode

log = logging.getLogger("fedfm")

CLIENT_LEDGER = "client-level"


class Bookkeeping:
    """Reply checks, refusals, per-site metrics and byte counts for any FedAvg-shaped strategy.

    A train reply must carry exactly the adapter keys the server sent, all finite; one that
    does not is dropped for that round (named in the log and in results.json). A site that
    refuses a round for its privacy budget replies with an error, recorded as a refusal;
    when every site has refused, training stops cleanly. Under DP-SGD each reply also carries
    the site's signed ledger head, which goes into the coordinator's anchor log; a reply whose
    head is missing, or behind the head anchored for that site before, is rejected.
    """

    recorder: RunRecorder
    adapter_keys: list[str]

    def init_bookkeeping(self, recorder: RunRecorder, adapter_keys: list[str], anchors: AnchorLog | None = None,
                         run_id: str = "") -> None:
        self.recorder = recorder
        self.adapter_keys = list(adapter_keys)
        self.anchors = anchors
        self.run_id = run_id
        self._train: dict[str, dict[str, float]] = {}
        self._refused: dict[str, str] = {}
        self.out_of_budget: set[int] = set()  # nodes that refused a round for their privacy budget
        self.held_out: set[int] = set()  # nodes of held-out sites: never asked to train again

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = set(grid.get_node_ids()) - self.held_out
        if nodes and nodes <= self.out_of_budget:
            if self.recorder.stopped is None:
                self.recorder.stopped = (
                    f"round {server_round + self.recorder.round_offset}: every site has spent its privacy budget"
                )
                log.warning("%s; no further training", self.recorder.stopped)
            return []
        messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in self.held_out]
        return self.outgoing(messages)

    def outgoing(self, messages: list[Message]) -> list[Message]:
        """Put each message's adapter in the wire format (federation.transport) and count its bytes."""
        transport = self.recorder.config.federation.transport
        for message in messages:
            arrays = message.content[ARRAYS]
            if transport != "fp32":
                arrays = ArrayRecord(encode(arrays.to_torch_state_dict(), transport))
                message.content[ARRAYS] = arrays
            self.recorder.record_transfer(arrays.count_bytes(), 1)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.recorder.stopped is not None:
            return []
        return self.outgoing(list(super().configure_evaluate(server_round, arrays, config, grid)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._train, self._refused = {}, {}
        if self.recorder.stopped is not None:
            return None, None
        kept = self.screen(server_round, replies)
        for msg in kept:  # count what crossed the network, then average in fp32
            self.recorder.record_transfer(msg.content[ARRAYS].count_bytes(), 1, upload=True)
            msg.content[ARRAYS] = ArrayRecord(decode(msg.content[ARRAYS].to_torch_state_dict()))
        return super().aggregate_train(server_round, kept)

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that can be averaged; refusals and rejections are recorded."""
        kept: list[Message] = []
        for msg in replies:
            node = f"node {msg.metadata.src_node_id}"
            if msg.has_error():
                if msg.error.code == HELD_OUT:
                    self.held_out.add(msg.metadata.src_node_id)
                    continue  # not a refusal: the site is there to be evaluated as unseen
                if msg.error.code in REFUSALS_FOR_THE_RUN:  # out of budget, or a ledger rolled back
                    self.out_of_budget.add(msg.metadata.src_node_id)
                self._refused[node] = msg.error.reason or f"error code {msg.error.code}"
                log.warning("round %d: %s did not train: %s", server_round, node, self._refused[node])
                continue
            anchored = self.anchor(server_round, msg.content)  # a site that trained spent privacy, even if its update is rejected
            problem = self.reply_problem(msg.content) or anchored
            if problem:
                self._refused[node] = f"rejected: {problem}"
                log.warning("round %d: reply of %s rejected: %s", server_round, node, problem)
                continue
            metrics = dict(msg.content[METRICS])
            self._train[reply_site(metrics)] = metrics
            kept.append(msg)
        # A fixed order makes the floating-point average independent of arrival order.
        return sorted(kept, key=lambda m: int(m.content[METRICS][SITE_ID]))

    def anchor(self, server_round: int, content: RecordDict) -> str | None:
        """Anchor the reply's ledger head (and take it out of the content); why not, or None."""
        head = content.pop(LEDGER_HEAD, None)
        if self.anchors is None:
            return None
        if head is None:
            return "a DP-SGD site's train reply must carry its signed ledger head"
        try:
            head = LedgerHead.from_dict(dict(head))
            self.anchors.append(head, server_round + self.recorder.round_offset, self.run_id)
        except AnchorRejected as err:
            return str(err)
        except (KeyError, TypeError, ValueError) as err:
            return f"its ledger head is malformed ({err})"
        return None

    def reply_problem(self, content: RecordDict) -> str | None:
        """Why the content of a train reply cannot be averaged, or None when it can."""
        arrays = [v for v in content.values() if isinstance(v, ArrayRecord)]
        if len(arrays) != 1 or METRICS not in content:
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
            reply_site(msg.content[METRICS]): dict(msg.content[METRICS])
            for msg in replies
            if not msg.has_error()
        }
        aggregated = super().aggregate_evaluate(server_round, replies)
        entry = self.recorder.record_round(server_round, self._train, self._refused, evaluation)
        print(progress_line(entry, self.recorder.config.federation.rounds), flush=True)
        return aggregated


class AdapterFedAvg(Bookkeeping, FedAvg):
    """FedAvg weighted by each site's number of training images."""

    def __init__(self, recorder: RunRecorder, adapter_keys: list[str], anchors: AnchorLog | None = None,
                 run_id: str = "", **kwargs):
        super().__init__(**kwargs)
        self.init_bookkeeping(recorder, adapter_keys, anchors, run_id)


class _StackFactors:
    """Replaces FedAvg's array average by the exact stacking of per-site LoRA factors."""

    alpha: float
    max_rank: int | None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()  # fp32: Bookkeeping encodes for the wire after this
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        updates = [(c[ARRAYS].to_torch_state_dict(), float(c[METRICS][self.weighted_by_key])) for c in contents]
        arrays = ArrayRecord(stack(self._global, updates, self.alpha, self.max_rank))
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class StackedLoraFedAvg(Bookkeeping, _StackFactors, FedAvg):
    """Per-site LoRA ranks (lora.site_ranks): FLoRA stacking, exact whatever the ranks."""

    def __init__(self, recorder: RunRecorder, adapter_keys: list[str], anchors: AnchorLog | None = None,
                 run_id: str = "", **kwargs):
        super().__init__(**kwargs)
        self.init_bookkeeping(recorder, adapter_keys, anchors, run_id)
        self.alpha = recorder.config.lora.alpha
        self.max_rank = recorder.config.lora.stack_max_rank

    def reply_problem(self, content: RecordDict) -> str | None:
        problem = super().reply_problem(content)
        if problem:
            return problem
        site = reply_site(content[METRICS])
        rank = self.recorder.config.lora.rank_for(site)
        arrays = content[ARRAYS]
        for key in arrays:
            if key.endswith(LORA_A):
                a, b = arrays[key].shape, arrays[key[: -len(LORA_A)] + LORA_B].shape
                if a[0] != rank or b[1] != rank:
                    return f"{key} has rank {a[0]} (B: {b[1]}), but lora.site_ranks gives {site} rank {rank}"
        return None


class ClientDPFedAvg(Bookkeeping, DifferentialPrivacyServerSideFixedClipping):
    """Client-level DP: clip each site's update, average with equal weights, add Gaussian noise.

    Flower's RDP accountant composes one release per round (no amplification from site
    sampling, which the server controls). Each release is also written, hash-chained, to
    ``ledger-federation/client-level.jsonl`` so ``fedfm audit`` can recompute it.
    """

    def __init__(self, recorder: RunRecorder, adapter_keys: list[str], config: ExperimentConfig, sampled: int,
                 anchors: AnchorLog | None = None, run_id: str = "", **fedavg):
        client = config.privacy.client
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=client.delta, population_size=config.data.num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))
        inner = FedAvg(weighted_by_key=CLIENT_WEIGHT, **fedavg)
        super().__init__(inner, client.noise_multiplier, client.clipping_norm, sampled, accountant=accountant)
        self.init_bookkeeping(recorder, adapter_keys, anchors, run_id)
        self.ledger = SiteLedger(recorder.run_dir / "ledger-federation", CLIENT_LEDGER)
        for entry in self.ledger.verify():  # a resumed run continues the same accountant
            self.accountant.compose(GaussianPrivacyEvent(
                noise_multiplier=entry["noise_multiplier"], sample_size=entry["sampled_sites"],
                population_size=entry["population"]))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        releases = self.accountant.num_releases
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.accountant.num_releases > releases:
            spent = self.accountant.get_privacy_spent()
            client = self.recorder.config.privacy.client
            entry = self.ledger.append({
                "round": server_round + self.recorder.round_offset, "steps": 1, "noise_multiplier": self.noise_multiplier,
                "sample_rate": 1.0, "sampling": "no-amplification", "sampled_sites": self.num_sampled_clients,
                "population": self.recorder.config.data.num_sites, "max_grad_norm": self.clipping_norm,
                "delta": client.delta, "accountant": DP_ACCOUNTING_RDP, "accountant_library": "flwr RdpAccountant (dp-accounting)",
                "epsilon": spent.epsilon,
            })
            self.recorder.client_level = {k: entry[k] for k in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sampled_sites", "population")}
            self.recorder.client_level["rounds"] = self.accountant.num_releases
        return arrays, metrics


def build_strategy(config: ExperimentConfig, recorder: RunRecorder, adapter_keys: list[str],
                   anchors: AnchorLog | None = None, run_id: str = ""):
    """The run's strategy; ``anchors`` (DP-SGD runs) is the coordinator's log of the sites' ledger heads."""
    fed = config.federation
    fedavg = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate if config.eval.every_round else 0.0,
        min_train_nodes=fed.min_train_sites,
        min_evaluate_nodes=1,
        # rounds go on with the sites that are connected (a site that dies drops out); the ServerApp
        # waits for every site once, before the first round (federation.site_wait_s)
        min_available_nodes=fed.min_train_sites,
    )
    bookkeeping = {"anchors": anchors if config.privacy.sample_level else None, "run_id": run_id}
    if config.privacy.client_level:
        sampled = max(int(config.data.num_sites * fed.fraction_train), fed.min_train_sites)
        return ClientDPFedAvg(recorder, adapter_keys, config, sampled, **bookkeeping, **fedavg)
    if config.lora.stacked:
        return StackedLoraFedAvg(recorder, adapter_keys, **bookkeeping, **fedavg)
    return AdapterFedAvg(recorder, adapter_keys, **bookkeeping, **fedavg)


def progress_line(entry: dict, rounds: int) -> str:
    parts = [f"[fedfm] round {entry['round']}/{rounds}: {len(entry['participants'])} sites trained"]
    if entry["refused"]:
        parts.append(f"{len(entry['refused'])} refused/rejected")
    if entry["train_loss"] is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    if entry["max_epsilon"]:
        parts.append(f"max epsilon {entry['max_epsilon']:.3f}")
    if entry.get("client_epsilon"):
        parts.append(f"client-level epsilon {entry['client_epsilon']:.3f}")
    if entry["val_auroc"] is not None:
        parts.append(f"val AUROC {entry['val_auroc']:.4f}")
    parts.append(f"{entry['elapsed_s']:.0f} s")
    return ", ".join(parts)
