"""``python -m runtime.superexec [flower-superexec arguments]``: Flower's SuperExec, whose ClientApp
processes start already imported.

Flower 1.42 runs every message in a new ``flwr-clientapp`` process, and about a second of its start
is importing Flower itself (more when the sites of a machine start theirs at once). Before the
SuperExec opens any connection or thread, this launcher imports what every ClientApp process
imports and forks a *template*: a single-threaded process that only waits for launch requests.
The SuperExec's subprocess executor then asks the template for each ClientApp, and the template
forks a child that runs the unmodified ``flwr-clientapp`` entry point with the arguments the
executor would have passed to it. Nothing of the app is imported ahead: its modules (``clients``,
``fedfm``) are dropped from the template, so each ClientApp loads them from its own FAB as before.

Between two looks for a task the SuperExec sleeps ``BUSY_POLL_S`` while ClientApps are being
launched and Flower's own second after a quiet minute (``TaskPolls``).

When the template is gone, or anything about a request fails, the executor starts the process the
way Flower does. The executor and the loop are private code of one Flower release, so both are changed
only with that release (``PATCHED_FLWR``); with any other, Flower runs as it is.
``runtime/supernode.py`` puts this launcher first on the SuperNode's ``PATH`` as
``flower-superexec`` (``launcher_dir``); ``runtime/superlink.py`` does the same for the SuperLink's
SuperExec, which has no template and starts each ServerApp as ``python -m runtime.serverapp``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import stat
import sys
import time
import types
from multiprocessing.connection import Connection
from pathlib import Path

log = logging.getLogger("fedfm")

PATCHED_FLWR = "1.42.0"  # the one Flower release whose private code runtime/ changes
CLIENTAPP = "flwr-clientapp"
SERVERAPP = "flwr-serverapp"
APP_PACKAGES = ("clients", "fedfm")  # loaded by each ClientApp from its FAB, never ahead
TEMPLATE_ENV = "FEDFM_CLIENTAPP_TEMPLATE"  # "1" (on the SuperNode): ClientApps from the template; else as Flower starts them
BUSY_POLL_S = 0.1  # while ClientApps are launched: the next task is looked for 10 times a second
IDLE_POLL_S = 1.0  # Flower's own interval, once ...
IDLE_AFTER_S = 60.0  # ... this long has passed without a launch
OBJECT_FIRST_WAIT_S = 0.05  # a message object not there yet is asked for again this soon (Flower: 1 s), then 0.1, 0.2 ...


class TaskPolls:
    """The SuperExec's sleep between two looks for a task: short while its SuperNode's ClientApps
    are being launched (a run), Flower's own pace once ``idle_after_s`` has passed without one, so
    an idle federation costs next to nothing. The first task after a quiet spell waits one idle poll."""

    def __init__(self, busy_s: float = BUSY_POLL_S, idle_s: float = IDLE_POLL_S, idle_after_s: float = IDLE_AFTER_S):
        self.busy_s, self.idle_s, self.idle_after_s = busy_s, idle_s, idle_after_s
        self.last_launch = time.monotonic()

    def launched(self) -> None:
        self.last_launch = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if time.monotonic() - self.last_launch > self.idle_after_s:
            time.sleep(max(float(seconds), self.idle_s))
        else:
            time.sleep(min(float(seconds), self.busy_s))

    def time_module(self) -> types.ModuleType:
        """A stand-in for the ``time`` module of the SuperExec's loop, with this ``sleep``."""
        shim = types.ModuleType("time")
        shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
        shim.sleep = self.sleep
        return shim


class Template:
    """The forking template, seen from the SuperExec: ``launch`` asks it for one ClientApp process."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid, self.conn = pid, conn

    @classmethod
    def start(cls) -> Template:
        from flwr.supernode.cli import flwr_clientapp  # noqa: F401  what every ClientApp process imports
        import numpy  # noqa: F401  (and its app's first import)

        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the template
            ours.close()
            code = 0
            try:
                serve(Connection(theirs.detach()))
            except BaseException:  # noqa: BLE001  a template never returns into the SuperExec's code
                code = 1
            os._exit(code)
        theirs.close()
        return cls(pid, Connection(ours.detach()))

    def launch(self, args: list[str], quiet: bool) -> int:
        """Fork a ClientApp process running ``flwr-clientapp`` with ``args``; its pid."""
        self.conn.send((list(args), bool(quiet)))
        pid = self.conn.recv()
        if not isinstance(pid, int) or pid <= 0:
            raise OSError(f"the ClientApp template could not start a process: {pid!r}")
        return pid


def serve(conn: Connection) -> None:
    """The template's loop: one forked ClientApp per request, until the SuperExec goes away."""
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]  # the app comes from each run's FAB
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the template's children are reaped as they exit
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the SuperExec, whose exit ends this loop
    while True:
        try:
            args, quiet = conn.recv()
        except (EOFError, OSError):
            return  # the SuperExec has exited
        try:
            pid = os.fork()
        except OSError as err:
            conn.send(str(err))
            continue
        if pid == 0:
            conn.close()
            os._exit(run_clientapp(args, quiet))
        conn.send(pid)


def shorten_object_pulls(first_wait: float = OBJECT_FIRST_WAIT_S) -> None:
    """Make a pull of a message's objects that finds one not there yet look again after
    ``first_wait`` seconds (doubling, as before), not Flower's one second.

    A SuperNode creates a message's task before it has pulled the message's objects from the
    SuperLink, and its SuperExec launches the ClientApp for the task at once; a ClientApp started
    from the template asks for the objects before they are there and, in Flower 1.42.0, then
    sleeps a whole second (``PULL_INITIAL_BACKOFF``). The same wait applies to the SuperNode's own
    pulls from the SuperLink. Both functions take the value as a keyword default."""
    from flwr.supercore.inflatable import inflatable_utils

    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        pull.__kwdefaults__["initial_backoff"] = first_wait


def name_process(name: str) -> None:
    """Give this process the name ``ps``, ``pgrep`` and psutil's ``name()`` show (Linux; 15 bytes),
    so that a forked ClientApp is found by name as a started one is: its command line stays the
    SuperExec's."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run_clientapp(args: list[str], quiet: bool) -> int:
    """In a forked child: Flower's ``flwr-clientapp`` command with ``args``; its exit code."""
    name_process(CLIENTAPP)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    from flwr.supernode.cli import flwr_clientapp

    shorten_object_pulls()  # a forked ClientApp is often ready before its message's objects are
    sys.argv = [CLIENTAPP, *args[1:]]
    code = 0
    try:
        flwr_clientapp()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter's exit would run; the template's caller never returns
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def use_launchers(template: Template | None, polls: TaskPolls | None = None) -> None:
    """Make the SuperExec's subprocess executor start ClientApps from ``template`` (when there is
    one; and tell ``polls`` of each launch) and ServerApps as ``python -m runtime.serverapp``."""
    import subprocess

    from flwr.supercore.superexec.executor import subprocess_executor

    class Popen:  # what the executor calls; anything else starts as before
        def __init__(self, args, **kwargs):
            if polls is not None:
                polls.launched()
            if template is not None and args and args[0] == CLIENTAPP and set(kwargs) <= {"stdout", "stderr"}:
                try:
                    self.pid = template.launch(args, quiet=bool(kwargs))
                    return
                except (OSError, EOFError, ValueError) as err:
                    log.warning("the ClientApp template failed (%s): starting %s as a new process", err, CLIENTAPP)
            if args and args[0] == SERVERAPP:
                args = [sys.executable, "-m", "runtime.serverapp", *args[1:]]
            self.pid = subprocess.Popen(args, **kwargs).pid  # noqa: S603

    subprocess_executor.subprocess = type(sys)("subprocess")
    subprocess_executor.subprocess.Popen = Popen
    subprocess_executor.subprocess.DEVNULL = subprocess.DEVNULL


def launcher_dir(folder: Path) -> Path:
    """A folder holding ``flower-superexec`` that runs this launcher with this Python (put it first on PATH)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = folder / "flower-superexec"
    text = f"#!{sys.executable}\nfrom runtime.superexec import main\nmain()\n"
    if not script.exists() or script.read_text() != text:
        part = folder / f".flower-superexec.{os.getpid()}"
        part.write_text(text)
        part.chmod(stat.S_IRWXU)
        os.replace(part, script)
    return folder


def launcher_first_on_path() -> None:
    """Put this launcher first, as ``flower-superexec``, on the PATH that this process (a SuperNode
    or a SuperLink) starts its SuperExec from."""
    import hashlib

    from fedfm.deploy.worker_client import worker_dir

    python = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]  # one per Python environment
    folder = launcher_dir(worker_dir() / f"bin-{python}")
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def main() -> None:
    import flwr

    if flwr.__version__ == PATCHED_FLWR:
        from flwr.supercore.superexec import run_superexec

        polls = template = None
        if os.environ.get(TEMPLATE_ENV, "1") != "0":  # a SuperNode's (a SuperLink's sets "0": it runs no ClientApp)
            polls, template = TaskPolls(), Template.start()
            run_superexec.time = polls.time_module()
        use_launchers(template, polls)
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    sys.exit(flower_superexec())


if __name__ == "__main__":
    main()
