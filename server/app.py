"""ServerApp: the federation core (``fedfm.federation``) over Flower's Grid.

This module only translates: the run config into a :class:`RunRequest`, the core's outgoing
messages into Flower Messages, and Flower's replies into :class:`Reply` objects.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfm.appconfig import experiment_from_run_config
from fedfm.federation import TRAIN, Outgoing, Reply, RunRequest, serve
from fedfm.packed import LayoutError, pack, unpack
from fedfm.protocol import ARRAYS, CONFIG, LAYOUT, LEDGER_HEAD, METRICS, REFUSAL, REFUSAL_CODE, REFUSAL_REASON

app = ServerApp()

MALFORMED = "a train reply needs one ArrayRecord, its layout and one MetricRecord"
PULL_INTERVAL_S = 0.05  # Grid.send_and_receive waits 3 s between pulls; a round waits for its replies this long at most


class GridLink:
    """The core's :class:`~fedfm.federation.link.Link` over a Flower Grid."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self._record: tuple[dict, ArrayRecord, str] | None = None  # the last adapter sent, packed once

    def nodes(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def record(self, adapter: dict[str, torch.Tensor]) -> tuple[ArrayRecord, str]:
        """The adapter as one array per dtype (``fedfm.packed``) and its layout."""
        if self._record is None or self._record[0] is not adapter:
            packed, layout = pack({name: t.detach().cpu().numpy() for name, t in adapter.items()})
            self._record = (adapter, ArrayRecord({k: Array(v) for k, v in packed.items()}), layout)
        return self._record[1], self._record[2]

    def wire_bytes(self, adapter: dict[str, torch.Tensor]) -> int:
        record, layout = self.record(adapter)
        return record.count_bytes() + len(layout.encode())

    def exchange(self, messages: list[Outgoing], timeout: float) -> list[Reply]:
        out = []
        for m in messages:
            record, layout = self.record(m.adapter)
            out.append(Message(
                content=RecordDict({ARRAYS: record, CONFIG: ConfigRecord({**m.config, LAYOUT: layout})}),
                message_type=MessageType.TRAIN if m.kind == TRAIN else MessageType.EVALUATE,
                dst_node_id=m.node,
            ))
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
    if REFUSAL in content:  # a refusal with the metrics computed before it: they count as an accepted reply's do
        refusal = content[REFUSAL]
        return Reply(node, metrics=metrics, error_code=int(refusal[REFUSAL_CODE]), error_reason=str(refusal[REFUSAL_REASON]))
    head = dict(content[LEDGER_HEAD]) if LEDGER_HEAD in content else None
    layout = str(content[LAYOUT][LAYOUT]) if LAYOUT in content and LAYOUT in content[LAYOUT] else None
    if len(arrays) != 1 or layout is None:  # an evaluate reply carries no adapter; the core rejects a train reply without one
        return Reply(node, metrics=metrics, ledger_head=head, malformed=MALFORMED if arrays else None)
    reply = Reply(node, None, metrics, head, nbytes=arrays[0].count_bytes() + len(layout.encode()),
                  malformed=None if metrics is not None else MALFORMED)

    def load() -> dict[str, torch.Tensor] | None:  # only once the core has checked the size (max_update_bytes)
        try:
            unpacked = unpack({name: array.numpy() for name, array in arrays[0].items()}, layout)
        except LayoutError as err:
            reply.malformed = str(err)
            return None
        return {name: torch.from_numpy(value) for name, value in unpacked.items()}

    reply.load = load
    return reply


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
        ledger_dir=str(run.get("ledger-dir") or ""),  # simulation only: deployed sites keep their ledgers
    )
    serve(GridLink(grid), config, request)
