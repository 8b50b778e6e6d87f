"""The ClientApp's side of a site's long-lived worker: find it, start it, forward one call.

Flower 1.42 starts a fresh ClientApp process for every message. In deployment that process only
forwards the message (numpy arrays and plain dicts) over a Unix socket to the site's worker
(``fedfm/deploy/site_worker.py``), which keeps the data, the built model and the activation cache
in memory across rounds. This module imports no torch: the ClientApp process stays light.

The socket lives in a folder only this user can open (``FEDFM_WORKER_DIR``, default the system's
temporary folder), named after the SuperNode's node config, so two sites on one machine never
share a worker; connections are authenticated with a random key kept beside it (mode 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

WORKER_ENV = "FEDFM_SITE_WORKER"  # "1": the ClientApp forwards to the worker (set by runtime/supernode.py)
WORKER_DIR_ENV = "FEDFM_WORKER_DIR"
MAX_SOCKET_PATH = 107
START_TIMEOUT_S = 300.0  # the worker's first import of torch, peft and opacus on a slow disk


class WorkerFailed(RuntimeError):
    """The worker died or could not start; the next message starts a new one."""


def enabled() -> bool:
    return os.environ.get(WORKER_ENV, "") == "1"


def worker_dir() -> Path:
    root = Path(os.environ.get(WORKER_DIR_ENV) or tempfile.gettempdir()) / f"fedfm-workers-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_mode & 0o077:
        raise WorkerFailed(f"{root} can be opened by other users: remove it or set {WORKER_DIR_ENV} to a private folder")
    return root


def package_root() -> str:
    """The folder this fedfm is imported from (a Flower app's install folder in deployment)."""
    return str(Path(__file__).resolve().parents[2])


def socket_path(node_config: Mapping[str, Any]) -> Path:
    """The worker socket of the site ``node_config`` describes (short: Unix socket paths are limited)."""
    # named after the site and the code it runs: an app of another version gets a worker of its own
    identity = json.dumps([dict(node_config), package_root()], sort_keys=True, default=str)
    name = hashlib.sha256(identity.encode()).hexdigest()[:20]
    path = worker_dir() / f"{name}.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        raise WorkerFailed(f"{WORKER_DIR_ENV}={os.environ.get(WORKER_DIR_ENV)}: the worker's socket path would have "
                           f"{len(str(path))} characters, more than a Unix socket allows ({MAX_SOCKET_PATH}): "
                           "choose a shorter folder")
    return path


def key_path(socket: Path) -> Path:
    return socket.with_suffix(".key")


def connect(socket: Path) -> Connection | None:
    """A connection to the worker listening on ``socket``, or None when none does."""
    key = key_path(socket)
    if not socket.exists() or not key.is_file():
        return None
    try:
        return Client(str(socket), family="AF_UNIX", authkey=key.read_bytes())
    except (ConnectionRefusedError, FileNotFoundError):
        return None


def start(socket: Path, watch_pid: int) -> Connection:
    """Start a worker on ``socket`` (it exits when ``watch_pid`` does) and connect to it."""
    socket.unlink(missing_ok=True)
    key = key_path(socket)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    print(f"[fedfm] starting this site's worker ({socket.name}); later rounds reuse it", flush=True)
    # the worker imports the same fedfm as this process (a ClientApp may run from an installed FAB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "fedfm.deploy.site_worker", str(socket), "--watch-pid", str(watch_pid)],
                            stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = connect(socket)
        if conn is not None:
            return conn
        if proc.poll() is not None:
            raise WorkerFailed(f"the site worker exited with code {proc.returncode} before it listened "
                               "(its error is in the SuperNode's log)")
        time.sleep(0.05)
    proc.kill()
    raise WorkerFailed(f"the site worker did not listen on {socket} within {START_TIMEOUT_S:.0f} s")


def call(request: dict[str, Any], node_config: Mapping[str, Any], watch_pid: int | None = None) -> dict[str, Any]:
    """Send ``request`` to the site's worker (started if none runs) and return its answer."""
    socket = socket_path(node_config)
    conn = connect(socket) or start(socket, watch_pid if watch_pid is not None else os.getppid())
    with conn:
        try:
            conn.send(request)
            return conn.recv()
        except (EOFError, OSError) as err:
            raise WorkerFailed(f"the site worker died during the {request.get('call')} call "
                               f"({type(err).__name__}); the next message starts a new one") from err
