"""``python -m clients.supernode [flower-supernode arguments]``: Flower's SuperNode with short waits.

Flower 1.42.0's SuperNode sleeps 3 s whenever a pull from the SuperLink finds no message and
0.5 s between checks for its ClientApp's reply (``flwr/supernode/start_client_internal.py``,
hard-coded), and its SuperExec looks for new tasks every second. A fedfm round is a few seconds
of compute, so these waits were most of it. This launcher turns on the site's long-lived worker
(``FEDFM_SITE_WORKER=1``: see ``fedfm/deploy/worker_client.py``), caps those sleeps at ``WAIT_S`` and sets
the SuperExec's interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, its documented variable) before
running the unmodified ``flower-supernode`` command. The cap relies on a private module of one
Flower release, so it applies only to that release (``PATCHED_FLWR``); any other version runs
Flower as it is, with a warning.
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings

from fedfm.deploy.worker_client import WORKER_ENV

PATCHED_FLWR = "1.42.0"
WAIT_S = 0.2  # an idle SuperNode pulls 5 times a second (one small gRPC call)
SUPEREXEC_POLL_S = "0.1"


def capped_time(cap: float) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``cap`` seconds."""
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = lambda seconds: time.sleep(min(float(seconds), cap))
    return shim


def shorten_waits(cap: float = WAIT_S) -> bool:
    """Cap the SuperNode loop's sleeps (Flower PATCHED_FLWR only); True when applied."""
    import flwr

    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    os.environ.setdefault(WORKER_ENV, "1")  # its ClientApps forward every call to the site's long-lived worker
    if flwr.__version__ != PATCHED_FLWR:
        warnings.warn(f"flwr {flwr.__version__} is not {PATCHED_FLWR}: the SuperNode keeps Flower's own waits "
                      "(3 s between pulls)", stacklevel=2)
        return False
    from flwr.supernode import start_client_internal

    start_client_internal.time = capped_time(cap)
    return True


def main() -> None:
    shorten_waits()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
