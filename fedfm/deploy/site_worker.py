"""``python -m fedfm.deploy.site_worker SOCKET --watch-pid PID``: a site's process across rounds.

It imports torch, peft and opacus once, builds the site (its data, the backbone with its adapter,
the activation cache) once per run, and then answers the ClientApp's calls
(:mod:`fedfm.site_calls`) one at a time over an authenticated Unix socket. Nothing that matters
lives only in its memory: every call reads the site's ledger and signed head from disk, so a
worker killed at any moment loses nothing; the ClientApp reports that round's call as failed and
the next message starts a new worker. It exits when the process it watches (the SuperNode's
SuperExec) is gone, or after ``IDLE_EXIT_S`` (30 minutes) without a call.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from fedfm import site_calls
from fedfm.deploy.worker_client import key_path

IDLE_EXIT_S = 1800.0
WATCH_S = 1.0


class SiteWorker:
    """Answers calls; keeps the last run's site built (one site per SuperNode)."""

    def __init__(self) -> None:
        self.site = None
        self.site_key: str | None = None
        self.calls = 0

    def site_for(self, request: dict[str, Any]):
        key = json.dumps([request["run_config"], request["node_config"], request["run_id"]], sort_keys=True, default=str)
        if key != self.site_key:
            self.site = None  # the previous run's data and model go before the next are built
            self.site = site_calls.build_site(request["run_config"], request["node_config"], request["run_id"])
            self.site_key = key
        return self.site

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            site = self.site_for(request)
            outcome = site_calls.CALLS[request["call"]](site, request["arrays"], request["config"])
        except Exception:  # noqa: BLE001 - the ClientApp raises it, so Flower reports it as the site's error
            return {"failed": traceback.format_exc()}
        self.calls += 1
        return {"metrics": outcome.metrics, "arrays": outcome.arrays, "head": outcome.head, "error": outcome.error,
                "calls": self.calls, "seconds": time.monotonic() - started}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(socket: Path, watch_pid: int, idle_exit_s: float = IDLE_EXIT_S) -> None:
    listener = Listener(str(socket), family="AF_UNIX", authkey=key_path(socket).read_bytes())
    worker = SiteWorker()
    state = {"last": time.monotonic(), "busy": False}

    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            idle = not state["busy"] and time.monotonic() - state["last"] > idle_exit_s
            if not alive(watch_pid) or idle:
                socket.unlink(missing_ok=True)
                os._exit(0)  # the accept() below would otherwise block forever

    threading.Thread(target=watch, daemon=True).start()
    print(f"[fedfm] site worker {os.getpid()} listening on {socket}", flush=True)
    while True:
        with listener.accept() as conn:
            try:
                request = conn.recv()
            except EOFError:
                continue
            state["busy"] = True
            try:
                conn.send(worker.handle(request))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the ClientApp is gone (its SuperNode stopped); the ledger is already on disk
            finally:
                state["busy"], state["last"] = False, time.monotonic()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", type=Path)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-exit-s", type=float, default=IDLE_EXIT_S)
    args = parser.parse_args(argv)
    import torch  # noqa: F401 - the heavy imports before the first call, not during it

    serve(args.socket, args.watch_pid, args.idle_exit_s)


if __name__ == "__main__":
    main()
