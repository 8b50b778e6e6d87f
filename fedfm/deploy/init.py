"""``fedfm deploy init``: everything a deployment needs before anything runs.

Layout of the folder it writes (``--out``, default ``deployment/``)::

    certs/ca.crt            the federation's CA certificate: every site gets a copy
    certs/ca.key            the CA's key: stays at the coordinator, offline if possible
    certs/superlink.crt/.key  the SuperLink's TLS certificate for the names sites dial
    keys/site-K, site-K.pub   site K's key pair (all-in-one, for deploy local and demos), or only
                            site-K.pub, the public key site K made itself (fedfm deploy keygen)
    sites/site-K.env          site K's settings for docker compose / its SuperNode
    coordinator.env           the coordinator's settings
    flwr/config.toml          a Flower connection ("fedfm") to the SuperLink over TLS, for the operator
    STEPS.md                  the registration and start-up steps, also printed
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedfm.config import ConfigError
from fedfm.deploy.pki import make_ca, make_node_keys, make_server_cert
from fedfm.privacy.signing import SigningError, load_public_key
from fedfm.protocol import SITE_PREFIX, is_site_name, site_id, site_name

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
        return self.root / "keys" / site_name(site)

    def public_key(self, site: int) -> Path:
        return self.root / "keys" / f"{site_name(site)}.pub"

    @property
    def sites(self) -> list[int]:
        return sorted(site_id(p.stem) for p in (self.root / "keys").glob(f"{SITE_PREFIX}*.pub") if is_site_name(p.stem))

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


def site_keygen(out: str | Path, site: int) -> tuple[Path, Path]:
    """At a hospital: make site K's own key pair in ``out``; only ``site-K.pub`` goes to the coordinator."""
    if site < 0:
        raise ConfigError(f"--site {site}: site numbers start at 0")
    folder = Path(out).expanduser().resolve()
    if (folder / site_name(site)).exists():
        raise ConfigError(f"{folder / site_name(site)} exists: this site already has a key pair (a new one would need "
                          "registering again, and ledger entries signed with the old key verify only with the old one)")
    return make_node_keys(folder, site_name(site))


def _registered_public_key(folder: Path, site: int) -> Path:
    path = folder / f"{site_name(site)}.pub"
    if not path.is_file():
        raise ConfigError(f"--site-keys {folder}: no {path.name}; each hospital runs `fedfm deploy keygen --site "
                          f"{site}` and sends the coordinator its {path.name}")
    try:
        load_public_key(path)
    except SigningError as err:
        raise ConfigError(f"--site-keys: {err}; use the {path.name} written by fedfm deploy keygen") from None
    return path


def init_deployment(out: str | Path, sites: int, names: list[str] | None = None, budget: float = 8.0,
                    port: int = SUPERLINK_PORT, site_keys: str | Path | None = None) -> Deployment:
    """Write a CA, the SuperLink certificate, one key pair (or, with ``site_keys``, the public key
    each site made itself) and one env file per site, and the steps."""
    if sites < 1:
        raise ConfigError(f"--sites {sites}: a deployment needs at least one site")
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget {budget}: give each site's epsilon budget as a finite number > 0, e.g. --budget 8")
    keys_from = Path(site_keys).expanduser().resolve() if site_keys else None
    if keys_from is not None:
        for site in range(sites):
            _registered_public_key(keys_from, site)
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
        name = site_name(site)
        if keys_from is None:
            make_node_keys(root / "keys", name)
        else:
            (root / "keys").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_registered_public_key(keys_from, site), dep.public_key(site))
        (root / "sites" / f"{name}.env").write_text(
            f"# settings of hospital {name}: only this file, certs/ca.crt "
            f"{'and keys/' + name + ' ' if keys_from is None else ''}go to that site\n"
            f"SITE_ID={site}\nSITE_BUDGET_EPSILON={budget}\nSITE_DATA=./data/{name}\n"
            f"SUPERLINK_ADDRESS={names[0]}:{port}\n"
        )
    (root / "coordinator.env").write_text(
        f"# the coordinator: SuperLink on port {port} (HTTPS), state in ./state\nSUPERLINK_PORT={port}\nSITES={sites}\n"
    )
    write_connection(dep.flwr_home, f"{names[0]}:{port}", dep.ca)
    (root / "STEPS.md").write_text(steps_text(dep, names, port, own_keys=keys_from is not None))
    return dep


def steps_text(dep: Deployment, names: list[str], port: int, own_keys: bool = False) -> str:
    root = dep.root
    if own_keys:
        keys = ("Site keys: each hospital made its own key pair (`fedfm deploy keygen`) and sent only its public key,\n"
                "copied to keys/site-K.pub. The coordinator never held a site's private key, so it cannot sign a\n"
                "site's ledger entries: this is the set-up for a real federation.")
        receive = "certs/ca.crt and sites/site-K.env (its private key keys/site-K is the one it made; it never leaves the site)"
    else:
        keys = ("Site keys: generated here, all in one place (keys/site-K and keys/site-K.pub). Fine for `fedfm deploy\n"
                "local` and demos, where one operator plays every site; in a real federation whoever holds keys/ could\n"
                "sign as any site. For real hospitals each site runs `fedfm deploy keygen --site K --out keys` where it\n"
                "runs and sends keys/site-K.pub; the coordinator then runs `fedfm deploy init --sites N --site-keys DIR`.")
        receive = "certs/ca.crt, keys/site-K (private: never leaves the site) and sites/site-K.env"
    return f"""# Deployment steps

Certificate names (sites must dial one of these): {', '.join(names)}

{keys}

## Coordinator
1. Start the SuperLink with TLS, node authentication and a persistent database:
   python -m runtime.superlink --ssl-ca-certfile {dep.ca} --ssl-certfile {dep.server_cert} \\
     --ssl-keyfile {dep.server_key} --enable-supernode-auth --database state/state.db \\
     --port {port} --disable-runtime-dependency-installation
   (or: docker compose up superlink). Open TCP port {port} to the sites; nothing else.
2. Register every site's public key (once per site; unregistering is permanent):
   FLWR_HOME={dep.flwr_home} flwr supernode register {root}/keys/site-K.pub {CONNECTION}
3. Start the federation, with the anchor log next to the SuperLink's state (it spans runs):
   FLWR_HOME={dep.flwr_home} flwr run . {CONNECTION} --stream \\
     --run-config 'config="configs/quickstart.yaml" out-dir="runs/NAME" anchor-dir="state/anchors"'

## Each hospital (site K)
1. Receive {receive}.
2. Start the SuperNode next to the data (read-only) and its own ledger folder; the same private key
   authenticates the SuperNode and signs every entry of the site's privacy ledger:
   flower-supernode --root-certificates ca.crt --superlink {names[0]}:{port} \\
     --auth-supernode-private-key site-K \\
     --node-config 'site-id=K data-path="/data" ledger-dir="/ledger" signing-key="site-K"'
   (or: docker compose -f deploy/site/compose.yml up). Outbound TCP to the SuperLink only.
   The ledger folder spans every run on this site's data: keep it (and back it up); the site
   refuses to train on a ledger shorter than the last head it signed (kept in ledger/heads/).

## Audit
At the coordinator the ServerApp keeps a signed log of every ledger head the sites sent
(anchors.jsonl in state/anchors, next to the SuperLink's database; its key pair in state/anchors/keys).
A site's privacy officer audits the site's ledger folder across all its runs against it:
   fedfm audit /ledger --keys keys --anchors state/anchors

What leaves a site: adapter weights (LoRA + head) after each round it trains, and the metrics it
reports (train loss, epsilon, validation/test metrics; test probabilities if eval.share_predictions).
"""
