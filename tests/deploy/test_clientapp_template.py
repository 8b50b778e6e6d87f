"""The SuperExec's ClientApp template (runtime/superexec.py): a pre-imported process that forks one
child per ClientApp. The child runs with the executor's arguments, loads the app afresh (no fedfm or
clients module carried over from the template), the template goes away with its SuperExec, and a
launch the template cannot serve starts the process the way Flower does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SUPEREXEC = textwrap.dedent("""
    import json, os, sys, time
    import runtime.superexec as se

    out = sys.argv[1]

    def fake_clientapp(args, quiet):  # stands in for flwr-clientapp: records what the child saw
        with open(out + f".{os.getpid()}.part", "w") as f:
            json.dump({"pid": os.getpid(), "ppid": os.getppid(), "args": args, "quiet": quiet,
                       "app_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("clients", "fedfm")),
                       "flwr_imported": "flwr.supernode.cli.flwr_clientapp" in sys.modules}, f)
        os.replace(out + f".{os.getpid()}.part", out + f".{os.getpid()}.json")
        return 3

    se.run_clientapp = fake_clientapp
    template = se.Template.start()
    print(template.pid, flush=True)
    pids = [template.launch(["flwr-clientapp", "--token", str(i)], quiet=i == 1) for i in range(2)]
    print(json.dumps(pids), flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_template_forks_each_clientapp_with_its_arguments_and_no_app_modules(tmp_path):
    out = tmp_path / "child"
    proc = subprocess.Popen([sys.executable, "-c", SUPEREXEC, str(out), "60"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        template = int(proc.stdout.readline())
        pids = json.loads(proc.stdout.readline())
        assert _wait(lambda: len(list(tmp_path.glob("child.*.json"))) == 2)
        seen = sorted((json.loads(p.read_text()) for p in tmp_path.glob("child.*.json")), key=lambda d: d["args"][2])
        assert [d["pid"] for d in seen] == pids and all(d["ppid"] == template for d in seen)
        assert [d["args"] for d in seen] == [["flwr-clientapp", "--token", "0"], ["flwr-clientapp", "--token", "1"]]
        assert [d["quiet"] for d in seen] == [False, True]
        # the app is loaded from each run's FAB, never from what the launcher itself imported
        assert all(d["app_modules"] == [] and d["flwr_imported"] for d in seen)
        assert _wait(lambda: not any(_alive(p) for p in pids))  # exited and reaped by the template
        assert _alive(template)
    finally:
        proc.kill()
        proc.wait()
    assert _wait(lambda: not _alive(template)), "the template outlived its SuperExec"


def test_a_launch_the_template_cannot_serve_starts_a_process_as_flower_does(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    import flwr

    from runtime import superexec
    from runtime.supernode import PATCHED_FLWR

    if flwr.__version__ != PATCHED_FLWR:
        pytest.skip(f"the template applies to flwr {PATCHED_FLWR} only")
    from flwr.supercore.superexec.executor import subprocess_executor

    class Gone:
        def launch(self, args, quiet):
            raise EOFError("the template has exited")

    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    superexec.use_launchers(Gone())
    marker = tmp_path / "ran"
    started = subprocess_executor.subprocess.Popen([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert _wait(marker.exists) and started.pid > 0  # not a ClientApp: a plain subprocess
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    fake = tmp_path / "flwr-clientapp"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'fallback'}\n")
    fake.chmod(0o755)
    subprocess_executor.subprocess.Popen(["flwr-clientapp", "--token", "t"])
    assert _wait(lambda: (tmp_path / "fallback").exists() and (tmp_path / "fallback").read_text().strip() == "--token t")


def test_the_launcher_is_first_on_the_supernodes_path(tmp_path):
    from runtime.superexec import launcher_dir

    folder = launcher_dir(tmp_path / "bin")
    script = folder / "flower-superexec"
    assert os.access(script, os.X_OK) and script.read_text().startswith(f"#!{sys.executable}\n")
    assert "runtime.superexec" in script.read_text() and launcher_dir(tmp_path / "bin") == folder


def test_a_clientapps_process_age_is_its_time_since_start(tmp_path):
    """What the deployment bench reports as ClientApp start-up: not off by the boot time's rounding."""
    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.6); from clients.app import process_age; "
                          "print(process_age())"], cwd=REPO, capture_output=True, text=True, check=True)
    assert 0.6 <= float(out.stdout) < 0.6 + 5.0


def test_a_forked_clientapp_is_found_by_name_like_a_started_one():
    """Its command line is the SuperExec's; the fault soak still finds (and kills) it as a ClientApp."""
    from fedfm.chaos.runner import _apps

    code = "from runtime.superexec import name_process; name_process('flwr-clientapp'); print(1, flush=True); " \
           "import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        here = type("Proc", (), {"pid": os.getpid()})()
        assert [p.pid for p in _apps(here, "flwr-clientapp")] == [child.pid]
        assert _apps(here, "flwr-serverapp") == []
    finally:
        child.kill()
        child.wait()
