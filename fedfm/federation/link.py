"""What the federation core needs from a transport: the connected nodes and one exchange of
messages. ``server/`` implements it over Flower's Grid; tests implement it in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fedfm.federation.aggregate import Adapter
from fedfm.federation.replies import Reply

TRAIN: Literal["train"] = "train"
EVALUATE: Literal["evaluate"] = "evaluate"


@dataclass
class Outgoing:
    """One message to a node: train on, or evaluate, ``adapter`` (wire form) with ``config``."""

    node: int
    kind: Literal["train", "evaluate"]
    adapter: Adapter
    config: dict[str, Any]


class Link(Protocol):
    def nodes(self) -> list[int]:
        """The ids of the nodes connected now."""

    def exchange(self, messages: list[Outgoing], timeout: float) -> list[Reply]:
        """Send every message and return the replies that came back within ``timeout`` seconds."""

    def wire_bytes(self, adapter: Adapter) -> int:
        """How many bytes ``adapter`` takes in one message."""
