"""Stopping the local SuperLink also stops what it spawned: after Ctrl-C a simulation (and its Ray)
would otherwise go on training and spending the sites' budgets. ``spawned_by`` finds the whole tree;
``stop_processes`` ends it, with SIGKILL for a process that ignores SIGTERM (as Ray's agents do)."""

import subprocess
import sys
import time

import psutil

from fedfm.cli import main
from fedfm.simulate import spawned_by, stop_processes

GRANDCHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
CHILD = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); time.sleep(600)"


def _tree():
    """A parent, its child, and a grandchild that ignores SIGTERM (as Ray's agents do)."""
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {CHILD!r}]); time.sleep(600)"])
    deadline = time.time() + 20
    while time.time() < deadline and len(psutil.Process(parent.pid).children(recursive=True)) < 2:
        time.sleep(0.1)
    time.sleep(1.0)  # the grandchild has set its SIGTERM handler by now
    return parent


def test_the_whole_tree_below_a_process_is_stopped_even_what_ignores_sigterm():
    parent = _tree()
    try:
        below = spawned_by([parent.pid])
        assert len(below) == 2  # the child and the grandchild that ignores SIGTERM
        stop_processes(below, timeout=2)
        assert not [p for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert parent.poll() is None  # only what was below: the parent itself is the caller's to stop
    finally:
        parent.kill()
        parent.wait()


def test_a_gone_process_is_skipped():
    assert spawned_by([2 ** 22 + 12345]) == []  # no such pid
    stop_processes([], timeout=0.1)


def test_ctrl_c_ends_in_one_line_that_says_how_to_continue(monkeypatch, capsys):
    import fedfm.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedfm.cli, "cmd_config", interrupted)
    assert main(["config"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fedfm: interrupted") and "--resume RUN_DIR" in err
