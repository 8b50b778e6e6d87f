"""Simulations side by side share the local SuperLink: the last fedfm run to end stops it, never an earlier one."""

import subprocess
import sys

from fedfm import superlink_users


class _Stops:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def test_the_run_that_started_the_superlink_leaves_it_to_a_run_still_using_it(tmp_path):
    stop = _Stops()
    first = superlink_users.join(tmp_path)
    superlink_users.mark_started(tmp_path)  # the first run found none: flwr starts it
    second = superlink_users.join(tmp_path)  # a second simulation joins it
    assert superlink_users.leave(first, stop) is False and stop.count == 0
    assert superlink_users.leave(second, stop) is True and stop.count == 1
    assert not (tmp_path / superlink_users.STARTED).exists()


def test_a_superlink_started_by_hand_is_never_stopped(tmp_path):
    stop = _Stops()
    entry = superlink_users.join(tmp_path)  # found one up, no mark: somebody else started it
    assert superlink_users.leave(entry, stop) is False and stop.count == 0


def test_a_dead_run_does_not_keep_the_superlink_up(tmp_path):
    stop = _Stops()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run-crashed").write_text(dead.stdout.strip())  # a run killed without leaving
    (tmp_path / "run-torn").write_text("")
    entry = superlink_users.join(tmp_path)
    superlink_users.mark_started(tmp_path)
    assert superlink_users.live_users(tmp_path, besides=entry) == []
    assert not (tmp_path / "run-crashed").exists() and not (tmp_path / "run-torn").exists()
    assert superlink_users.leave(entry, stop) is True and stop.count == 1


def test_a_live_process_counts_as_a_user(tmp_path):
    stop = _Stops()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run-other").write_text(str(sleeper.pid))
        entry = superlink_users.join(tmp_path)
        superlink_users.mark_started(tmp_path)
        assert superlink_users.leave(entry, stop) is False and stop.count == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    last = superlink_users.join(tmp_path)
    assert superlink_users.leave(last, stop) is True and stop.count == 1


def test_a_run_refused_before_it_started_stops_nothing(tmp_path):
    stop = _Stops()
    entry = superlink_users.join(tmp_path)
    superlink_users.mark_started(tmp_path)
    assert superlink_users.leave(entry, None) is False and stop.count == 0
    assert (tmp_path / superlink_users.STARTED).exists()
