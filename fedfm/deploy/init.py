"""``fedfm deploy init``: everything a deployment needs before anything runs.

Layout of the folder it writes (``--out``, default ``deployment/``)::

    certs/ca.crt            the federation's CA certificate: every site gets a copy
    certs/ca.key            the CA's key: stays at the coordinator, offline if possible
    certs/superlink.crt/.key  the SuperLink's TLS certificate for the names sites dial
    keys/site-K, site-K.pub   site K's authentication key pair (private key goes to site K only)
    sites/site-K.env          site K's settings for docker compose / its SuperNode
    coordinator.env           the coordinator's settings
    flwr/config.toml          a Flower connection ("fedfm") to the SuperLink over TLS, for the operator
    STEPS.md                  the registration and start-up steps, also printed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedfm.config import ConfigError
from fedfm.deploy.pki import make_ca, make_node_keys, make_server_cert

SUPERLINK_PORT = 9093  # Flower 1.42 serves Fleet, Control and ServerAppIo over one HTTPS port
CONNECTION = "fedfm"
DEFAULT_NAMES = ["superlink", "localhost", "127.0.0.1", "::1"]


@dataclass(frozen=True)
class Deployment:
    """Paths of a deployment folder written by :func:`init_deployment`."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "certs" / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "certs" / "superlink.key"

    def private_key(self, site: int) -> Path:
        return self.root / "keys" / f"site-{site}"

    def public_key(self, site: int) -> Path:
        return self.root / "keys" / f"site-{site}.pub"

    @property
    def sites(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in (self.root / "keys").glob("site-*.pub"))

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"


def write_connection(flwr_home: Path, address: str, ca: Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one TLS connection named ``fedfm``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca.resolve()}"\n'
    )
    return path


def init_deployment(out: str | Path, sites: int, names: list[str] | None = None, budget: float = 8.0,
                    port: int = SUPERLINK_PORT) -> Deployment:
    """Write a CA, the SuperLink certificate, one key pair and one env file per site, and the steps."""
    if sites < 1:
        raise ConfigError(f"--sites {sites}: a deployment needs at least one site")
    root = Path(out).expanduser().resolve()
    if (root / "certs" / "ca.key").exists():
        raise ConfigError(f"{root} already holds a deployment (certs/ca.key): pass a new --out, "
                          "or keep using the existing keys (re-running would replace every site's key)")
    names = list(dict.fromkeys([*(names or []), *DEFAULT_NAMES]))
    dep = Deployment(root)
    make_ca(root / "certs")
    make_server_cert(root / "certs", names)
    (root / "sites").mkdir(parents=True, exist_ok=True)
    for site in range(sites):
        make_node_keys(root / "keys", f"site-{site}")
        (root / "sites" / f"site-{site}.env").write_text(
            f"# settings of hospital site-{site}: only this file, keys/site-{site} and certs/ca.crt go to that site\n"
            f"SITE_ID={site}\nSITE_BUDGET_EPSILON={budget}\nSITE_DATA=./data/site-{site}\n"
            f"SUPERLINK_ADDRESS={names[0]}:{port}\n"
        )
    (root / "coordinator.env").write_text(
        f"# the coordinator: SuperLink on port {port} (HTTPS), state in ./state\nSUPERLINK_PORT={port}\nSITES={sites}\n"
    )
    write_connection(dep.flwr_home, f"{names[0]}:{port}", dep.ca)
    (root / "STEPS.md").write_text(steps_text(dep, names, port))
    return dep


def steps_text(dep: Deployment, names: list[str], port: int) -> str:
    root = dep.root
    return f"""# Deployment steps

Certificate names (sites must dial one of these): {', '.join(names)}

## Coordinator
1. Start the SuperLink with TLS, node authentication and a persistent database:
   flower-superlink --ssl-ca-certfile {dep.ca} --ssl-certfile {dep.server_cert} \\
     --ssl-keyfile {dep.server_key} --enable-supernode-auth --database state/state.db \\
     --port {port} --disable-runtime-dependency-installation
   (or: docker compose up superlink). Open TCP port {port} to the sites; nothing else.
2. Register every site's public key (once per site; unregistering is permanent):
   FLWR_HOME={dep.flwr_home} flwr supernode register {root}/keys/site-K.pub {CONNECTION}
3. Start the federation: FLWR_HOME={dep.flwr_home} flwr run . {CONNECTION} --run-config run-config.toml --stream

## Each hospital (site K)
1. Receive certs/ca.crt, keys/site-K (private: never leaves the site) and sites/site-K.env.
2. Start the SuperNode next to the data (read-only) and its own ledger folder:
   flower-supernode --root-certificates ca.crt --superlink {names[0]}:{port} \\
     --auth-supernode-private-key site-K --node-config 'site-id=K data-path="/data" ledger-dir="/ledger"'
   (or: docker compose -f deploy/site/compose.yml up). Outbound TCP to the SuperLink only.

What leaves a site: adapter weights (LoRA + head) after each round it trains, and the metrics it
reports (train loss, epsilon, validation/test metrics; test probabilities if eval.share_predictions).
"""
