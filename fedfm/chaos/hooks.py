"""Faults injected from inside a process of the deployment (loaded by a ``sitecustomize``).

The soak writes a ``sitecustomize.py`` that calls :func:`install` onto the ``PYTHONPATH`` of
one site's SuperNode (or of the coordinator) and describes the fault in ``FEDFM_CHAOS_HOOK``.
Only the processes that run app code act on it (a site's worker, or its ClientApp when it calls
the site in process; ``flwr-serverapp`` or ``python -m runtime.serverapp`` on the coordinator); the fault fires once per soak run (a marker file records it). Nothing here is
imported by fedfm itself: without the environment variable a deployment has no hooks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ENV = "FEDFM_CHAOS_HOOK"
# the coordinator's processes above a ServerApp: Flower's commands, or fedfm's launcher of the SuperLink
COORDINATOR_PROGRAMS = ("flower-superlink", "flower-superexec", "runtime.superlink")
SITECUSTOMIZE = "from fedfm.chaos.hooks import install\ninstall()\n"


def write_sitecustomize(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


SITE, COORDINATOR = "site", "coordinator"


def process_kind() -> str | None:
    """Which process this is: where a site's code runs (its long-lived worker, or a ClientApp
    that calls the site in process), the ServerApp, or neither."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "fedfm.deploy.site_worker" in argv:
        return SITE
    program = next((Path(a).name for a in argv[1:2] if not a.startswith("-")), "")
    if argv[1:2] == ["-m"]:  # fedfm's launcher of a ServerApp: python -m runtime.serverapp
        program = {"runtime.serverapp": "flwr-serverapp"}.get(argv[2] if len(argv) > 2 else "", "")
    if program == "flwr-clientapp" and os.environ.get("FEDFM_SITE_WORKER", "") != "1":
        return SITE
    return COORDINATOR if program == "flwr-serverapp" else None


def install() -> None:
    raw = os.environ.get(ENV)
    program = process_kind()
    if not raw or program is None:
        return
    spec = json.loads(raw)
    if program == SITE and spec["kind"] == "kill-in-ledger-write":
        _ledger_kill(spec)
    elif program == SITE and spec["kind"] in ("drop-reply", "delay-reply"):
        _hold_reply(spec)
    elif program == COORDINATOR and spec["kind"] == "kill-in-checkpoint-write":
        _checkpoint_kill(spec)


def _fire(spec: dict) -> bool:
    """True the first time in the run (and records it); False once the fault has fired."""
    marker = Path(spec["marker"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "time": time.time(), "argv": sys.argv[0]}))
    return True


def _die(coordinator: bool = False) -> None:
    """SIGKILL this process; ``coordinator``: with the SuperLink above it and the SuperExec between
    (the SuperLink starts its SuperExec in a session of its own), as a power cut would."""
    sys.stdout.flush()
    if coordinator:
        import psutil

        for parent in psutil.Process().parents():
            if any(Path(part).name in COORDINATOR_PROGRAMS for part in parent.cmdline()[:3]):
                parent.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _torn(path: Path, data: bytes, fraction: float, named: Path | None = None) -> None:
    """Leave what a write killed part way leaves: the first ``fraction`` of ``data`` in a temp file."""
    if named is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    else:
        fd = os.open(named, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data[: int(len(data) * fraction)])
        handle.flush()
        os.fsync(handle.fileno())


def _last_round(text: str) -> int | None:
    lines = text.strip().splitlines()
    try:
        return int(json.loads(lines[-1]).get("round")) if lines else None
    except (ValueError, TypeError):
        return None


def _ledger_kill(spec: dict) -> None:
    import fedfm.privacy.heads as heads
    import fedfm.privacy.ledger as ledger

    original = ledger.atomic_write
    armed = {"head": False}

    def ledger_write(path: Path, text: str) -> None:
        if path.suffix != ".jsonl" or _last_round(text) != spec["round"]:
            return original(path, text)
        point = spec["point"]
        if point == "head-partial":
            original(path, text)
            armed["head"] = True  # the head written next is the one that tears
            return None
        if not _fire(spec):
            return original(path, text)
        if point == "temp-partial":
            _torn(path, text.encode(), spec["fraction"])
        elif point == "before-rename":
            _torn(path, text.encode(), 1.0)
        else:  # after-rename: the new ledger is in place, the head not yet saved
            original(path, text)
        _die()

    def head_write(path: Path, text: str) -> None:
        if armed["head"] and _fire(spec):
            _torn(path, text.encode(), spec["fraction"])
            _die()
        return original(path, text)

    ledger.atomic_write = ledger_write
    heads.atomic_write = head_write


def _hold_reply(spec: dict) -> None:
    import fedfm.site as site_module

    train = site_module.Site.train

    def held(self, global_adapter, server_round):
        reply = train(self, global_adapter, server_round)
        if server_round == spec["round"] and _fire(spec):
            time.sleep(float(spec["sleep_s"]))  # trained and ledgered; the reply leaves late
        return reply

    site_module.Site.train = held


def _checkpoint_kill(spec: dict) -> None:
    import fedfm.results as results

    state = {"round": None}
    checkpoint, save_file, write_json = results.RunRecorder.checkpoint, results.save_file, results.write_json
    point, fraction = spec["point"], float(spec["fraction"])

    def in_checkpoint(self, server_round, adapter):
        state["round"] = server_round + self.round_offset
        try:
            return checkpoint(self, server_round, adapter)
        finally:
            state["round"] = None

    def armed() -> bool:
        return state["round"] == spec["round"]

    def faulty_save(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if armed() and point == "adapter-partial" and _fire(spec):
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: int(len(data) * fraction)])
            _die(coordinator=True)

    def faulty_json(path: Path, payload) -> None:
        if armed() and point == "after-adapter" and _fire(spec):
            _die(coordinator=True)  # the adapter is in place, nothing else of the checkpoint
        if armed() and point == f"{path.stem}-partial" and _fire(spec):
            _torn(path, json.dumps(payload, default=str).encode(), fraction, named=path.with_suffix(path.suffix + ".tmp"))
            _die(coordinator=True)
        write_json(path, payload)
        if armed() and point == f"after-{path.stem}" and _fire(spec):
            _die(coordinator=True)

    results.RunRecorder.checkpoint = in_checkpoint
    results.save_file = faulty_save
    results.write_json = faulty_json
