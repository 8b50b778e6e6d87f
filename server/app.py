"""ServerApp: the federation core (``fedfm.federation``) over Flower's Grid.

This module only translates: the run config into a :class:`RunRequest`, the core's outgoing
messages into Flower Messages, and Flower's replies into :class:`Reply` objects.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfm.appconfig import experiment_from_run_config
from fedfm.federation import TRAIN, Outgoing, Reply, RunRequest, serve
from fedfm.protocol import ARRAYS, CONFIG, LEDGER_HEAD, METRICS

app = ServerApp()

MALFORMED = "a train reply needs one ArrayRecord and one MetricRecord"
PULL_INTERVAL_S = 0.1  # Grid.send_and_receive waits 3 s between pulls; a round waits for its replies this long at most


class GridLink:
    """The core's :class:`~fedfm.federation.link.Link` over a Flower Grid."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self._record: tuple[dict, ArrayRecord] | None = None  # the last adapter sent, serialized once

    def nodes(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def record(self, adapter: dict[str, torch.Tensor]) -> ArrayRecord:
        if self._record is None or self._record[0] is not adapter:
            self._record = (adapter, ArrayRecord(adapter))
        return self._record[1]

    def wire_bytes(self, adapter: dict[str, torch.Tensor]) -> int:
        return self.record(adapter).count_bytes()

    def exchange(self, messages: list[Outgoing], timeout: float) -> list[Reply]:
        out = [
            Message(
                content=RecordDict({ARRAYS: self.record(m.adapter), CONFIG: ConfigRecord(m.config)}),
                message_type=MessageType.TRAIN if m.kind == TRAIN else MessageType.EVALUATE,
                dst_node_id=m.node,
            )
            for m in messages
        ]
        return [as_reply(reply) for reply in self.send_and_receive(out, timeout)] if out else []

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push ``messages``, then pull their replies every PULL_INTERVAL_S until all are in or ``timeout``."""
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(PULL_INTERVAL_S)
        return replies


def as_reply(message: Message) -> Reply:
    node = message.metadata.src_node_id
    if message.has_error():
        return Reply(node, error_code=message.error.code, error_reason=message.error.reason)
    content = message.content
    arrays = [v for v in content.values() if isinstance(v, ArrayRecord)]
    metrics = dict(content[METRICS]) if METRICS in content else None
    head = dict(content[LEDGER_HEAD]) if LEDGER_HEAD in content else None
    if len(arrays) != 1:  # an evaluate reply carries no adapter; the core rejects a train reply without one
        return Reply(node, metrics=metrics, ledger_head=head, malformed=MALFORMED if arrays else None)
    # decoded only when the core has checked its size (federation.max_update_bytes)
    return Reply(node, None, metrics, head, nbytes=arrays[0].count_bytes(), load=arrays[0].to_torch_state_dict,
                 malformed=None if metrics is not None else MALFORMED)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    config = experiment_from_run_config(run)
    request = RunRequest(
        run_dir=Path(str(run.get("out-dir") or "runs/flwr")),
        run_id=str(context.run_id),
        resume=bool(run.get("resume", False)),
        until_round=int(run.get("until-round", 0) or 0),
        anchor_dir=str(run.get("anchor-dir") or ""),
    )
    serve(GridLink(grid), config, request)
