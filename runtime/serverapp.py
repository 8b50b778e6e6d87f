"""``python -m runtime.serverapp [flwr-serverapp arguments]``: Flower's ServerApp process, whose
pulls of the sites' replies look again soon when an object is not there yet.

The SuperLink stores a site's reply as soon as its SuperNode announces it and receives the reply's
objects just after; a ServerApp polling for replies (fedfm's every 0.05 s) often asks in between,
and Flower 1.42.0 then waits a whole second before asking again (``PULL_INITIAL_BACKOFF``): about
one second of every deployment round. The SuperExec of a SuperLink started with
``python -m runtime.superlink`` runs this in place of ``flwr-serverapp``
(``runtime/superexec.py``); the first wait is ``OBJECT_FIRST_WAIT_S``, doubling as before. Nothing
of the app is imported here: the ServerApp loads it from the run's FAB. With another Flower
release than ``PATCHED_FLWR``, Flower runs as it is.
"""

from __future__ import annotations

import sys


def main() -> None:
    import flwr

    from runtime.superexec import PATCHED_FLWR, SERVERAPP, name_process, shorten_object_pulls

    name_process(SERVERAPP)  # found by name as Flower's own ServerApp process is
    if flwr.__version__ == PATCHED_FLWR:
        shorten_object_pulls()
    from flwr.superlink.cli import flwr_serverapp

    sys.argv[0] = SERVERAPP
    flwr_serverapp()


if __name__ == "__main__":
    main()
