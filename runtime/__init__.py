"""Flower's own processes, started the way fedfm deploys them: ``python -m runtime.supernode``
(a SuperNode with short waits, its site's long-lived worker turned on) and the SuperExec it starts
(``runtime/superexec.py``: ClientApps forked from a pre-imported template).

Unlike ``server/`` and ``clients/`` (the app, on Flower's public API only), these launchers reach
into private modules of one Flower release, each change behind a check of that exact version
(``runtime.supernode.PATCHED_FLWR``); with any other release Flower runs as it is.
"""
