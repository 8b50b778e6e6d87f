"""``fedfm deploy local``: the whole deployment as local processes on loopback, TLS and auth on.

The same programs as a real deployment (Flower's SuperLink with TLS, node authentication and a
database, ``python -m runtime.superlink``; one SuperNode per site with its own key and node config,
``python -m runtime.supernode``; ``flwr run``
against the SuperLink's HTTPS port), only every address is 127.0.0.1. Used by users without
Docker and by the deployment tests, which drive :class:`LocalDeployment` directly to kill a
site or the coordinator mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedfm.appconfig import APP_DIR, NODE_DATA_PATH, NODE_LEDGER_DIR, NODE_SIGNING_KEY, NODE_SITE_ID
from fedfm.config import ConfigError, ExperimentConfig
from fedfm.deploy.init import CONNECTION, Deployment, init_deployment, write_connection
from fedfm.protocol import site_name
from fedfm.run_log import stream_run


SUPEREXEC_POLL_S = "0.25"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through LocalDeployment.__exit__, which stops every process


def _exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback; every process is stopped on exit, whatever happened."""

    def __init__(self, deployment: Deployment, work_dir: Path, threads: int = 1):
        self.dep = deployment
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.flwr_home = self.work / "flwr-local"
        write_connection(self.flwr_home, f"127.0.0.1:{self.port}", deployment.ca)
        self.env = dict(os.environ)
        self.env.update({
            "FLWR_HOME": str(self.flwr_home),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            # the SuperExecs (ServerApp at the SuperLink, ClientApps at each site) look for tasks this often
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_S,
        })
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[int, int] = {}

    def __enter__(self) -> "LocalDeployment":
        # `kill` of this process must not leave the SuperLink and SuperNodes behind
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(command, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.work)
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self, timeout: float = 120.0) -> None:
        """The coordinator: TLS with the deployment's certificate, node auth, state in a database."""
        (self.work / "state").mkdir(exist_ok=True)
        self._start("superlink", [
            sys.executable, "-m", "runtime.superlink",
            "--ssl-ca-certfile", str(self.dep.ca), "--ssl-certfile", str(self.dep.server_cert),
            "--ssl-keyfile", str(self.dep.server_key), "--enable-supernode-auth",
            "--database", str(self.work / "state" / "state.db"), "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])
        self._wait(lambda: port_open(self.port), timeout, "the SuperLink to listen", "superlink")

    def register(self, site: int) -> int:
        """Register site's public key with the SuperLink; returns its node id."""
        out = self.flwr(["supernode", "register", str(self.dep.public_key(site)), CONNECTION, "--format", "json"])
        node_id = int(json.loads(out)["node-id"] if "node-id" in out else json.loads(out)["node_id"])
        self.node_ids[site] = node_id
        return node_id

    def start_supernode(self, site: int, node_config: dict[str, str | int | float], key: Path | None = None,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
        """Site ``site``'s SuperNode, authenticating with its private key (or ``key``)."""
        items = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items())
        return self._start(site_name(site), [
            sys.executable, "-m", "runtime.supernode", "--root-certificates", str(self.dep.ca),
            "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(key or self.dep.private_key(site)),
            "--node-config", items, "--port", str(free_port()),
        ], env={**self.env, **(env or {})})

    def online_nodes(self) -> set[int]:
        listing = json.loads(self.flwr(["supernode", "list", CONNECTION, "--format", "json"]))
        return {int(n["node-id"] if "node-id" in n else n["node_id"]) for n in listing.get("nodes", [])
                if str(n.get("status", "")).lower() == "online"}

    def wait_online(self, sites: list[int], timeout: float = 120.0) -> None:
        wanted = {self.node_ids[s] for s in sites}
        self._wait(lambda: wanted <= self.online_nodes(), timeout, f"sites {sites} to come online", None)

    def flwr(self, args: list[str], timeout: float = 60.0) -> str:
        done = subprocess.run([_exe("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
        return done.stdout

    def run_app(self, run_config: Path, log_path: Path, verbose: bool = False) -> int:
        """``flwr run`` the fedfm app against this SuperLink and stream its log."""
        command = [_exe("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), "--stream"]
        return stream_run(command, self.env, log_path, verbose)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill process ``name`` and everything it started (its ClientApp or ServerApp processes)."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in list(self.procs)[::-1]:  # sites first, the SuperLink last
            self.kill(name, signal.SIGTERM)

    def _wait(self, ready, timeout: float, what: str, proc_name: str | None) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            proc = self.procs.get(proc_name) if proc_name else None
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.5)
        log = self.work / f"{proc_name}.log" if proc_name else None
        tail = log.read_text()[-1500:] if log and log.exists() else ""
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def site_node_config(config: ExperimentConfig, site: int, ledger_dir: Path,
                     signing_key: Path | None = None) -> dict[str, str | int | float]:
    """Site ``site``'s node config; ``signing_key``: the SuperNode's private key, which signs its ledger."""
    node: dict[str, str | int | float] = {NODE_SITE_ID: site, NODE_LEDGER_DIR: str(ledger_dir)}
    if signing_key is not None:
        node[NODE_SIGNING_KEY] = str(signing_key)
    if config.data.path:
        node[NODE_DATA_PATH] = config.data.path
    return node


def deploy_local(config: ExperimentConfig, out: str | None = None, verbose: bool = False,
                 state: str | Path | None = None) -> Path:
    """Run ``config`` as a local deployment: one SuperNode per site, TLS and authentication on.

    ``state`` is a folder that outlives runs (what the hospitals' and the coordinator's volumes are
    in a real deployment): the deployment's keys (``state/deployment``), each site's ledger
    (``state/ledger``) and the coordinator's anchor log (``state/anchors``). A second run with the same
    folder continues every site's spend and is checked against every head anchored before."""
    from fedfm.simulate import prepare_run_dir, write_run_config

    run_dir = prepare_run_dir(config, out)
    sites = list(range(config.data.num_sites))
    print(f"[fedfm] deployment: {len(sites)} sites, TLS + node authentication -> {run_dir}", flush=True)
    root = Path(state).expanduser().resolve() if state else run_dir
    dep_dir = root / "deployment"
    dep = Deployment(dep_dir) if (dep_dir / "certs" / "ca.key").is_file() else init_deployment(dep_dir, sites=len(sites))
    missing = [s for s in sites if not dep.private_key(s).is_file()]
    if missing:
        raise ConfigError(f"--state {root}: its deployment has keys for sites {dep.sites}, not for {missing}; "
                          "pass data.num_sites as before, or a new --state folder")
    ledger_dir = root / "ledger"
    anchor_dir = root / "anchors" if state else None
    if state:
        ledger_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ledger").symlink_to(ledger_dir, target_is_directory=True)  # the run's view of the sites' ledgers
        print(f"[fedfm] state (keys, site ledgers, anchor log) in {root}; audit every run on it with: fedfm audit "
              f"{ledger_dir} --keys {dep.root / 'keys'} --anchors {anchor_dir}", flush=True)
    with LocalDeployment(dep, run_dir / "deployment", config.train.threads) as local:
        local.start_superlink()
        for site in sites:
            local.register(site)
            local.start_supernode(site, site_node_config(config, site, ledger_dir, dep.private_key(site)))
        local.wait_online(sites)
        print(f"[fedfm] SuperLink on 127.0.0.1:{local.port}, {len(sites)} sites online", flush=True)
        run_config = write_run_config(config, run_dir, anchor_dir=anchor_dir)
        code = local.run_app(run_config, run_dir / "flwr.log", verbose)
    results = run_dir / "results.json"
    status = json.loads(results.read_text()).get("status") if results.exists() else None
    if code != 0 or status != "complete":
        tail = "".join((run_dir / "flwr.log").read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"deployment run did not complete (flwr exit {code}, status {status}); last log lines:\n{tail}")
    return run_dir
