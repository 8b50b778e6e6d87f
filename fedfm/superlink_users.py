"""Simulations on one machine share the local SuperLink that ``flwr run`` starts; the last to end stops it.

``flwr run`` starts one background SuperLink per machine and every later ``flwr run`` joins it.
A run that stopped "its" SuperLink when it ended would cut off a second simulation started
meanwhile (a search next to another, two users on one server). So every fedfm simulation writes
an entry here while it runs (:func:`join`), the one that found no SuperLink marks it as started
by fedfm (:func:`mark_started`), and when a run ends (:func:`leave`) the SuperLink is stopped only
if fedfm started it and no other live run still uses it. A SuperLink someone started by hand has
no mark and is never stopped. Entries of runs that died are ignored (their PID is gone).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

STARTED = "started-by-fedfm"


def users_dir(port: int) -> Path:
    """Where the runs of this user on the SuperLink at ``port`` write their entries."""
    return Path(tempfile.gettempdir()) / f"fedfm-superlink-{os.getuid()}-{port}"


def join(directory: Path) -> Path:
    """Enter this process as a user of the local SuperLink; returns the entry :func:`leave` removes.
    Call it before looking whether a SuperLink is up, so a run that ends meanwhile sees this one."""
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    entry.write_text(str(os.getpid()))
    return entry


def mark_started(directory: Path) -> None:
    """This run found no SuperLink: the one ``flwr run`` is about to start belongs to fedfm."""
    (directory / STARTED).touch()


def live_users(directory: Path, besides: Path | None = None) -> list[Path]:
    """Entries of runs still alive (other than ``besides``); entries of dead runs are removed."""
    alive = []
    for entry in directory.glob("run-*"):
        if entry == besides:
            continue
        try:
            pid = int(entry.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)  # its run is gone (or the entry is torn): not a user
            continue
        alive.append(entry)
    return alive


def leave(entry: Path, stop: Callable[[], None] | None) -> bool:
    """Remove this run's entry; stop the SuperLink (``stop``; None: never) if fedfm started it and
    no other live run uses it. Returns whether it was stopped."""
    directory = entry.parent
    entry.unlink(missing_ok=True)
    if stop is None or live_users(directory) or not (directory / STARTED).exists():
        return False
    (directory / STARTED).unlink(missing_ok=True)
    stop()
    return True
