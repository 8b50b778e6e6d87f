"""Flower's own processes, started the way fedfm deploys them: ``python -m runtime.supernode``
(a SuperNode with short waits, its site's long-lived worker turned on), the SuperExec it starts
(``runtime/superexec.py``: ClientApps forked from a pre-imported template), and ``python -m
runtime.superlink`` (a SuperLink whose SuperExec starts each ServerApp as ``python -m
runtime.serverapp``, with short waits for the sites' reply objects).

Unlike ``server/`` and ``clients/`` (the app, on Flower's public API only), these launchers reach
into private modules of one Flower release, each change behind a check of that exact version
(``runtime.superexec.PATCHED_FLWR``); with any other release Flower runs as it is.
"""
