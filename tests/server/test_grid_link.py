"""The ServerApp's link over Flower's Grid: it pushes a round's messages once, pulls their replies
often (not every 3 s, as Grid.send_and_receive does) and stops at the round's timeout."""

import time
from types import SimpleNamespace

from server.app import PULL_INTERVAL_S, GridLink


class SlowGrid:
    """A Grid whose replies are there ``delay`` seconds after the push (never for ``silent`` messages)."""

    def __init__(self, delay: float, silent=()):
        self.delay, self.silent = delay, set(silent)
        self.pushed: list[str] = []
        self.pulls = 0
        self.pushed_at = 0.0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        self.pushed = [f"m{number}" for number, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))
                for mid in message_ids if mid not in self.silent]


def test_replies_are_collected_within_a_pull_interval_of_their_arrival():
    grid = SlowGrid(delay=0.5)
    started = time.monotonic()
    replies = GridLink(grid).send_and_receive(["a", "b", "c"], timeout=30)
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.5 <= took < 0.5 + 2 * PULL_INTERVAL_S + 0.3  # Grid.send_and_receive waits 3 s between pulls
    assert grid.pushed == ["m0", "m1", "m2"]  # pushed once


def test_the_round_timeout_ends_the_wait_for_a_silent_site():
    grid = SlowGrid(delay=0.0, silent=["m2"])
    started = time.monotonic()
    replies = GridLink(grid).send_and_receive(["a", "b", "c"], timeout=1.0)
    assert len(replies) == 2
    assert 1.0 <= time.monotonic() - started < 1.5
    assert grid.pulls <= 1.0 / PULL_INTERVAL_S + 2  # it waits between pulls: no busy loop
