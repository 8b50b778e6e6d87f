"""The server's side of a round, without a transport: which sites to ask, which replies count,
the aggregate, and what the run records.

A round is ``train_nodes`` -> ``train_messages`` (the glue sends them, collects :class:`Reply`
objects) -> ``split_replies`` -> ``receive_train`` (records the round) -> ``evaluate_nodes`` ->
``receive_evaluate`` (adds the round's validation, now or with the next round's train replies). Refusals and held-out sites
follow the protocol in ``fedfm.protocol``: a held-out site is never asked to train again; a site
out of budget (or with a rolled-back ledger) is not asked again, and when every site is, training
stops cleanly. Under DP-SGD every train reply's signed ledger head goes into the coordinator's
anchor log before its update is judged (a site that trained spent privacy, even if its update
is then rejected).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from fedfm.config import ExperimentConfig
from fedfm.federation.aggregate import Adapter, Aggregator, CombineByMethod
from fedfm.federation.client_dp import ClientLevelDP
from fedfm.federation.link import EVALUATE, TRAIN, Outgoing
from fedfm.federation.progress import progress_line
from fedfm.federation.replies import Reply, Screening, adapter_problem
from fedfm.federation.robust import RobustAggregate, bound_updates
from fedfm.models.method import AdapterMethod
from fedfm.privacy.anchors import AnchorLog, AnchorRejected
from fedfm.privacy.heads import LedgerHead
from fedfm.protocol import ROUND_OFFSET, SERVER_ROUND, SITE_ID, SPLIT, VALIDATE, site_order, split_validation
from fedfm.results import RunRecorder
from fedfm.transport import decode, encode

log = logging.getLogger("fedfm")


def sample_nodes(connected: list[int], fraction: float, minimum: int, min_available: int,
                 rng: random.Random) -> list[int] | None:
    """``max(int(n * fraction), minimum)`` of the ``n`` connected nodes, drawn at random; None
    while fewer than that (or than ``min_available``) are connected; [] for fraction 0."""
    if fraction == 0.0:
        return []
    size = max(int(len(connected) * fraction), minimum)
    if len(connected) < max(size, min_available):
        return None
    return rng.sample(connected, size)


class Coordinator:
    """One run's federation state across rounds (``recorder`` keeps what results.json says)."""

    def __init__(self, config: ExperimentConfig, recorder: RunRecorder, adapter_keys: list[str],
                 method: AdapterMethod, aggregator: Aggregator, anchors: AnchorLog | None = None, run_id: str = "",
                 rng: random.Random | None = None):
        self.config = config
        self.recorder = recorder
        self.adapter_keys = list(adapter_keys)
        self.method = method
        self.aggregator = aggregator
        self.anchors = anchors
        self.run_id = run_id
        self.rng = rng if rng is not None else random.Random()
        self.current: Adapter = {}  # the round's global adapter, fp32, as sent
        self.round = Screening()
        self.out_of_budget: set[int] = set()  # nodes that refused a round for the whole run
        self.held_out: set[int] = set()  # nodes of held-out sites: never asked to train again
        self.training: set[int] = set()  # the nodes sent a train message in the current exchange

    # --- numbering: Flower-style rounds 1..n of this process, plus the rounds before a resume ---
    def absolute(self, server_round: int) -> int:
        return server_round + self.recorder.round_offset

    def is_last(self, server_round: int) -> bool:
        """Round ``server_round`` of this process is the run's last planned round."""
        return self.absolute(server_round) >= self.config.federation.rounds

    def message_config(self, server_round: int, split: str | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {ROUND_OFFSET: self.recorder.round_offset, SERVER_ROUND: server_round}
        if split is not None:
            config[SPLIT] = split
        return config

    # --- train ---------------------------------------------------------------------------------
    def train_nodes(self, server_round: int, connected: list[int]) -> list[int] | None:
        """The nodes to train this round ([]: none, training has stopped; None: wait for more)."""
        available = set(connected) - self.held_out
        if available and available <= self.out_of_budget:
            reason = f"round {self.absolute(server_round)}: every site has spent its privacy budget"
            if self.recorder.stop(reason):
                log.warning("%s; no further training", reason)
            return []
        fed = self.config.federation
        nodes = sample_nodes(connected, fed.fraction_train, fed.min_train_sites, fed.min_train_sites, self.rng)
        return None if nodes is None else [n for n in nodes if n not in self.held_out]

    def outgoing(self, adapter: Adapter) -> Adapter:
        """The adapter as it goes on the wire (``federation.transport``); kept in fp32 as the round's global."""
        self.current = adapter
        return encode(adapter, self.config.federation.transport)

    def train_messages(self, server_round: int, nodes: list[int], wire: Adapter,
                       validate: list[int] | None = None) -> list[Outgoing]:
        """The round's train messages; with ``validate``, those nodes also evaluate ``wire`` (the
        previous round's adapter) on their validation split: in their train message when they
        train, else in an evaluate message."""
        config = self.message_config(server_round)
        wanted = set(validate or [])
        self.training = set(nodes)
        out = [Outgoing(n, TRAIN, wire, {**config, VALIDATE: True} if n in wanted else config) for n in nodes]
        evaluate = self.message_config(server_round - 1, split="val")
        return out + [Outgoing(n, EVALUATE, wire, evaluate) for n in validate or [] if n not in self.training]

    def split_replies(self, replies: Iterable[Reply]) -> tuple[list[Reply], list[Reply]]:
        """(train replies, validation replies) of an exchange of ``train_messages``: a train reply's
        validation metrics come out of it as a validation reply of their own."""
        train, validation = [], []
        for reply in replies:
            if reply.node not in self.training:
                validation.append(reply)
                continue
            if reply.metrics is not None:
                reply.metrics, carried = split_validation(reply.metrics)
                if carried is not None:
                    validation.append(Reply(reply.node, metrics=carried))
            train.append(reply)
        return train, validation

    def pending_validation(self, link) -> list[int] | None:
        """A resumed run whose last round's validation was to travel with the next train messages:
        the nodes to validate it (None: nothing pending)."""
        fed, last = self.config.federation, self.recorder.round_entry(0)
        if not (fed.validate_with_next_train and self.config.eval.every_round and last is not None and not last["val"]):
            return None
        return self.evaluate_nodes(0, list(link.nodes())) or None

    def sent(self, nbytes: int, messages: int) -> None:
        """Count ``messages`` adapters of ``nbytes`` each sent to sites."""
        self.recorder.record_transfer(nbytes, messages)

    def receive_train(self, server_round: int, replies: Iterable[Reply]) -> Adapter | None:
        """Screen the round's train replies and aggregate the ones that count; None: no new adapter."""
        self.round = Screening()
        if self.recorder.stopped is not None:
            return None
        self.round = self.screen(server_round, replies)
        for reply in self.round.kept:  # count what crossed the network, then average in fp32
            self.recorder.record_transfer(reply.nbytes, 1, upload=True)
            reply.arrays = decode(reply.arrays)
        bound = self.config.federation.update_clip_norm
        if bound is not None:
            self.round.clipped = bound_updates(self.round.kept, self.current, bound)
            for site, norm in self.round.clipped.items():
                log.warning("round %d: %s's update had norm %.4g; bounded to federation.update_clip_norm=%g",
                            server_round, site, norm, bound)
        adapter = self.aggregator.aggregate(self.absolute(server_round), self.current, self.round.kept)
        if isinstance(self.aggregator, ClientLevelDP):
            self.recorder.record_client_level(self.aggregator.guarantee)
        self.recorder.record_round(server_round, self.round.trained, self.round.refused, {}, self.round.clipped)
        return adapter

    def screen(self, server_round: int, replies: Iterable[Reply]) -> Screening:
        out = Screening()
        for reply in replies:
            if reply.failed:
                if reply.held_out:
                    self.held_out.add(reply.node)
                    continue  # not a refusal: the site is there to be evaluated as unseen
                if reply.refused_for_the_run:
                    self.out_of_budget.add(reply.node)
                out.refused[reply.label] = reply.error_reason or f"error code {reply.error_code}"
                log.warning("round %d: %s did not train: %s", server_round, reply.label, out.refused[reply.label])
                continue
            anchored = self.anchor(server_round, reply)
            problem = self.size_problem(reply) or self.reply_problem(reply) or anchored
            if problem:
                out.refused[reply.label] = f"rejected: {problem}"
                log.warning("round %d: reply of %s rejected: %s", server_round, reply.label, problem)
                continue
            out.trained[reply.site] = dict(reply.metrics)
            out.kept.append(reply)
        out.kept.sort(key=lambda r: int(r.metrics[SITE_ID]))  # the average must not depend on arrival order
        return out

    def anchor(self, server_round: int, reply: Reply) -> str | None:
        """Anchor the reply's ledger head (DP-SGD runs); why it cannot be, or None."""
        head, reply.ledger_head = reply.ledger_head, None
        if self.anchors is None:
            return None
        if head is None:
            return "a DP-SGD site's train reply must carry its signed ledger head"
        try:
            self.anchors.append(LedgerHead.from_dict(dict(head)), self.absolute(server_round), self.run_id)
        except AnchorRejected as err:
            return str(err)
        except (KeyError, TypeError, ValueError) as err:
            return f"its ledger head is malformed ({err})"
        return None

    def size_problem(self, reply: Reply) -> str | None:
        """Why a reply is too large to decode (``federation.max_update_bytes``), or None."""
        limit = self.config.federation.max_update_bytes
        if limit is None or reply.nbytes <= limit:
            return None
        who = reply.site if reply.metrics else reply.label
        return (f"{who}'s update is {reply.nbytes} bytes, above federation.max_update_bytes={limit}: "
                "refused before decoding")

    def reply_problem(self, reply: Reply) -> str | None:
        """Why a train reply cannot be averaged, or None when it can."""
        reply.decode()
        if reply.malformed or reply.arrays is None or reply.metrics is None:
            return reply.malformed or "a train reply needs one ArrayRecord and one MetricRecord"
        return adapter_problem(reply.arrays, self.adapter_keys) or self.method.update_problem(reply.site, reply.arrays)

    # --- evaluate ------------------------------------------------------------------------------
    def evaluate_nodes(self, server_round: int, connected: list[int]) -> list[int] | None:
        """The nodes to evaluate the round's adapter on their validation split (eval.every_round)."""
        if self.recorder.stopped is not None:
            return []
        fed = self.config.federation
        fraction = fed.fraction_evaluate if self.config.eval.every_round else 0.0
        return sample_nodes(connected, fraction, 1, fed.min_train_sites, self.rng)

    def receive_evaluate(self, server_round: int, replies: Iterable[Reply], timed: bool = True) -> dict[str, Any] | None:
        """Add the validation of round ``server_round``'s adapter to its record and print the
        round's progress line (None: the round trained nothing, so it has no record)."""
        evaluation = {r.site: dict(r.metrics) for r in replies if not r.failed and r.metrics is not None}
        evaluation = {site: evaluation[site] for site in sorted(evaluation, key=site_order)}
        entry = self.recorder.record_round_validation(server_round, evaluation, timed)
        if entry is not None:
            print(progress_line(entry, self.config.federation.rounds), flush=True)
        return entry


def build_aggregator(config: ExperimentConfig, method: AdapterMethod, run_dir) -> Aggregator:
    """Client-level DP-FedAvg, or what the adaptation method combines (FedAvg, FLoRA stacking)."""
    if config.privacy.client_level:
        client, fed = config.privacy.client, config.federation
        sampled = max(int(config.data.num_sites * fed.fraction_train), fed.min_train_sites)
        return ClientLevelDP(client.noise_multiplier, client.clipping_norm, sampled, config.data.num_sites,
                             client.delta, run_dir / "ledger-federation")
    if config.federation.aggregator != "fedavg":
        return RobustAggregate(config.federation.aggregator, config.federation.trim_fraction)
    return CombineByMethod(method)


def build_coordinator(config: ExperimentConfig, recorder: RunRecorder, adapter_keys: list[str],
                      anchors: AnchorLog | None = None, run_id: str = "") -> Coordinator:
    """The run's coordinator; ``anchors`` (DP-SGD runs) is the log of the sites' ledger heads."""
    method = recorder.adapter_method
    return Coordinator(config, recorder, adapter_keys, method, build_aggregator(config, method, recorder.run_dir),
                       anchors if config.privacy.sample_level else None, run_id)

