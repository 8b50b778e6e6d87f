"""The coordinator's launchers (runtime/superlink.py, runtime/serverapp.py) and the short first wait
for a message object that is not there yet (``shorten_object_pulls``), Flower 1.42.0 only."""

import os
import sys
import time

import flwr
import pytest

from runtime import superexec

if flwr.__version__ != superexec.PATCHED_FLWR:
    pytest.skip(f"the launchers apply to flwr {superexec.PATCHED_FLWR} only", allow_module_level=True)

from flwr.supercore.inflatable import inflatable_utils  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError  # noqa: E402


def _pull_once_missing() -> float:
    """Seconds a pull takes whose object is not there at the first ask, there at the second."""
    asked = []

    def pull(object_id: str) -> bytes:
        asked.append(object_id)
        if len(asked) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
    return time.monotonic() - started


def test_an_object_not_there_yet_is_asked_for_again_soon_not_after_flowers_second(flower_pull_defaults):
    assert _pull_once_missing() > 0.7  # Flower's own first wait: 1 s (+-20 %)
    superexec.shorten_object_pulls()
    assert _pull_once_missing() < 0.5
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == superexec.OBJECT_FIRST_WAIT_S


def test_the_coordinators_superexec_starts_each_serverapp_through_runtime_serverapp(monkeypatch):
    from flwr.supercore.superexec.executor import subprocess_executor

    started = []

    class Recorded:
        def __init__(self, args, **kwargs):
            started.append((list(args), kwargs))
            self.pid = 4242

    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    superexec.use_launchers(None)  # a SuperLink's SuperExec: no ClientApp template
    launched = subprocess_executor.subprocess.Popen(["flwr-serverapp", "--serverappio-api-address", "x:1", "--token", "t"])
    assert launched.pid == 4242
    assert started == [([sys.executable, "-m", "runtime.serverapp", "--serverappio-api-address", "x:1", "--token", "t"], {})]
    subprocess_executor.subprocess.Popen(["flwr-clientapp", "--token", "u"], stdout=subprocess.DEVNULL)
    assert started[-1] == (["flwr-clientapp", "--token", "u"], {"stdout": subprocess.DEVNULL})  # as Flower starts it


def test_runtime_serverapp_shortens_the_waits_then_runs_flowers_serverapp(monkeypatch, flower_pull_defaults):
    from flwr.superlink import cli

    from runtime import serverapp

    seen = {}
    monkeypatch.setattr(cli, "flwr_serverapp", lambda: seen.update(
        argv0=sys.argv[0], wait=inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"]))
    monkeypatch.setattr(sys, "argv", ["serverapp.py", "--token", "t"])
    serverapp.main()
    assert seen == {"argv0": "flwr-serverapp", "wait": superexec.OBJECT_FIRST_WAIT_S}


def test_runtime_superlink_starts_its_superexec_as_ours_without_a_clientapp_template(monkeypatch, tmp_path):
    from flwr.superlink import cli

    from runtime import superlink

    monkeypatch.setenv("FEDFM_WORKER_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv(superexec.TEMPLATE_ENV, "1")  # recorded, so the launcher's "0" is undone after the test
    seen = {}
    monkeypatch.setattr(cli, "flower_superlink", lambda: seen.update(
        path=os.environ["PATH"].split(os.pathsep)[0], template=os.environ.get(superexec.TEMPLATE_ENV)))
    monkeypatch.setattr(sys, "argv", ["superlink.py", "--port", "1"])
    superlink.main()
    assert seen["path"].startswith(str(tmp_path)) and os.path.exists(os.path.join(seen["path"], "flower-superexec"))
    assert seen["template"] == "0"
