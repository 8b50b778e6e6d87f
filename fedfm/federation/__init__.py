"""The federation core: rounds, reply screening, aggregation and the run's record, with no
transport. ``server/`` connects it to Flower; anything with a :class:`Link` can drive it."""

from fedfm.federation.aggregate import CombineByMethod
from fedfm.federation.client_dp import ClientLevelDP
from fedfm.federation.coordinator import Coordinator, build_aggregator, build_coordinator
from fedfm.federation.link import EVALUATE, TRAIN, Link, Outgoing
from fedfm.federation.replies import Reply
from fedfm.federation.workflow import RunRequest, serve

__all__ = [
    "EVALUATE", "TRAIN", "ClientLevelDP", "CombineByMethod", "Coordinator", "Link", "Outgoing", "Reply",
    "RunRequest", "build_aggregator", "build_coordinator", "serve",
]
