"""``python -m runtime.supernode [flower-supernode arguments]``: Flower's SuperNode with short waits.

Flower 1.42.0's SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message and
0.5 s between checks for its ClientApp's reply (``flwr/supernode/start_client_internal.py``,
hard-coded), and its SuperExec looks for new tasks every second. A fedfm round is a few seconds
of compute, so these waits were most of it. While messages come (a run), the waits are short;
a minute after the last, the SuperNode polls at Flower's pace again. This launcher turns on the site's long-lived worker
(``FEDFM_SITE_WORKER=1``: see ``fedfm/deploy/worker_client.py``), caps those sleeps at ``WAIT_S`` and sets
the SuperExec's interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, its documented variable) before
running the unmodified ``flower-supernode`` command, whose SuperExec starts each ClientApp from a
pre-imported template (``runtime/superexec.py``; ``FEDFM_CLIENTAPP_TEMPLATE=0`` starts them as
Flower does). It also makes the loop push a reply it would otherwise leave behind after a
SuperLink restart (``push_every_reply``). The cap, the push and the template rely on private
modules of one Flower release, so they apply only to that release (``PATCHED_FLWR``); any other
version runs Flower as it is, with a warning.
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings
from collections.abc import Callable

from fedfm.deploy.worker_client import WORKER_ENV
from runtime.superexec import PATCHED_FLWR, TEMPLATE_ENV, launcher_first_on_path, shorten_object_pulls

WAIT_ENV = "FEDFM_SUPERNODE_WAIT_S"  # the cap, in seconds (default WAIT_S)
WAIT_S = 0.2  # an idle SuperNode pulls 5 times a second (one small gRPC call)
SUPEREXEC_POLL_S = "0.25"
IDLE_SLEEP_S = 3.0  # the SuperNode's sleep after a pull that found no message
REPLY_WAIT_S = 0.05  # while its ClientApp works, the SuperNode looks for the reply this often (Flower: 0.5 s)
IDLE_AFTER_S = 60.0  # this long without a message, the SuperNode waits Flower's 3 s between pulls again


def capped_time(cap: float, idle_after_s: float = IDLE_AFTER_S, reply_cap: float = REPLY_WAIT_S) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``cap`` seconds while the
    SuperNode is busy. Its loop sleeps 3 s after a pull that found nothing, and 0.5 s at a time
    while it waits for its ClientApp's reply: those waits (any sleep shorter than ``IDLE_SLEEP_S``)
    are activity and last at most ``reply_cap`` (a look at the SuperNode's own memory, no network).
    After ``idle_after_s`` without any, the idle sleeps are Flower's own again, so an idle
    federation costs next to nothing."""
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    last_busy = [time.monotonic()]

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        now = time.monotonic()
        if seconds < IDLE_SLEEP_S:
            last_busy[0] = now
            time.sleep(min(seconds, reply_cap))
            return
        if now - last_busy[0] > idle_after_s:
            time.sleep(seconds)
            return
        time.sleep(min(seconds, cap))

    shim.sleep = sleep
    return shim


def replies_waiting(state) -> bool:
    """Whether the SuperNode's state holds a ClientApp reply that no push has taken yet (a peek:
    Flower's own getter marks what it returns as taken)."""
    with state.lock_msg_store:
        return any(not entry.is_retrieved and entry.message.metadata.reply_to_message_id
                   for entry in state.msg_store.values())


def push_every_reply(pull_and_store: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap the SuperNode loop's pull so that a reply the loop would never push is pushed.

    Flower 1.42.0's loop pushes replies only right after it pulled a message, and then only those
    ready at that moment. A message of a run that has ended since it was sent (what a restarted
    SuperLink delivers again) is still stored and its task still created before the SuperLink's
    refusal is noticed, so a ClientApp answers it; that reply alone is then pushed after the next
    run's message, whose own reply waits for a pull that never comes: the ServerApp waits out its
    round timeout. With this wrapper an empty pull still leads to a push whenever a reply waits."""

    def pull(*args, **kwargs) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        state = kwargs.get("state")
        if run_id is None and state is not None and replies_waiting(state):
            return 0  # the loop only asks "was anything pulled?": push what is waiting
        return run_id

    pull.wrapped = pull_and_store
    return pull


def shorten_waits(cap: float = WAIT_S) -> bool:
    """Cap the SuperNode loop's sleeps and have it push every waiting reply (``push_every_reply``)
    (Flower PATCHED_FLWR only); True when applied."""
    import flwr

    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    os.environ.setdefault(WORKER_ENV, "1")  # its ClientApps forward every call to the site's long-lived worker
    if flwr.__version__ != PATCHED_FLWR:
        warnings.warn(f"flwr {flwr.__version__} is not {PATCHED_FLWR}: the SuperNode keeps Flower's own waits "
                      "(3 s between pulls)", stacklevel=2)
        return False
    from flwr.supernode import start_client_internal

    start_client_internal.time = capped_time(cap)
    shorten_object_pulls()
    if not hasattr(start_client_internal._pull_and_store_message, "wrapped"):
        start_client_internal._pull_and_store_message = push_every_reply(start_client_internal._pull_and_store_message)
    return True


def main() -> None:
    if shorten_waits(float(os.environ.get(WAIT_ENV) or WAIT_S)) and os.environ.get(TEMPLATE_ENV, "1") != "0":
        launcher_first_on_path()  # its SuperExec forks ClientApps from a pre-imported template
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
