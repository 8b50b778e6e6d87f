"""``python -m runtime.supernode``: Flower's SuperNode, its hard-coded waits capped (Flower 1.42.0 only)."""

import time

import flwr
import pytest

from runtime import supernode


def test_capped_sleep_waits_at_most_the_cap_and_keeps_the_rest_of_time():
    shim = supernode.capped_time(0.05)
    started = time.monotonic()
    shim.sleep(3)
    assert time.monotonic() - started < 0.5
    assert shim.time is time.time and shim.monotonic is time.monotonic


def test_after_a_quiet_spell_the_idle_sleeps_are_flowers_own_again(monkeypatch):
    clock = [100.0]
    slept = []
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: slept.append(seconds))
    shim = supernode.capped_time(0.2, idle_after_s=60, reply_cap=0.05)
    shim.sleep(3)  # an idle pull while the run is on: short
    shim.sleep(0.5)  # a reply on its way: activity, looked for more often
    clock[0] += 59
    shim.sleep(3)
    clock[0] += 2  # over a minute since the last activity
    shim.sleep(3)
    shim.sleep(0.5)  # a message again
    shim.sleep(3)
    shim.sleep(0.01)  # never longer than asked
    assert slept == [0.2, 0.05, 0.2, 3.0, 0.05, 0.2, 0.01]


def test_the_supernode_loop_sleeps_briefly_and_its_superexec_polls_often(monkeypatch, flower_pull_defaults):
    from flwr.supernode import start_client_internal

    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    monkeypatch.delenv("FEDFM_SITE_WORKER", raising=False)
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", start_client_internal._pull_and_store_message)
    assert supernode.shorten_waits(0.05) == (flwr.__version__ == supernode.PATCHED_FLWR)
    import os

    assert os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == supernode.SUPEREXEC_POLL_S
    assert os.environ["FEDFM_SITE_WORKER"] == "1"
    if flwr.__version__ == supernode.PATCHED_FLWR:
        started = time.monotonic()
        start_client_internal.time.sleep(3)  # the idle wait between pulls
        assert time.monotonic() - started < 0.5


def test_another_flower_release_keeps_its_own_waits(monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    monkeypatch.setattr(start_client_internal, "time", time)
    with pytest.warns(UserWarning, match="keeps Flower's own waits"):
        assert supernode.shorten_waits() is False
    assert start_client_internal.time is time


def test_the_superexec_polls_briefly_while_clientapps_launch_and_at_flowers_pace_after_a_quiet_minute(monkeypatch):
    from runtime.superexec import TaskPolls

    clock = [100.0]
    slept = []
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: slept.append(seconds))
    polls = TaskPolls(busy_s=0.1, idle_s=1.0, idle_after_s=60)
    loop_time = polls.time_module()
    loop_time.sleep(0.25)  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL, just started: a run is coming
    clock[0] += 61
    loop_time.sleep(0.25)  # a quiet minute: Flower's pace
    polls.launched()  # a ClientApp
    loop_time.sleep(0.25)
    clock[0] += 30
    loop_time.sleep(0.05)  # never longer than asked while busy
    assert slept == [0.1, 1.0, 0.1, 0.05]
    assert loop_time.time is time.time


def test_every_clientapp_launch_counts_as_activity(monkeypatch):
    if flwr.__version__ != supernode.PATCHED_FLWR:
        pytest.skip(f"the template applies to flwr {supernode.PATCHED_FLWR} only")
    from flwr.supercore.superexec.executor import subprocess_executor

    from runtime import superexec

    class Template:
        def launch(self, args, quiet):
            return 4242

    polls = superexec.TaskPolls(idle_after_s=60)
    polls.last_launch = 0.0
    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    superexec.use_launchers(Template(), polls)
    assert subprocess_executor.subprocess.Popen(["flwr-clientapp", "--token", "t"]).pid == 4242
    assert time.monotonic() - polls.last_launch < 5
