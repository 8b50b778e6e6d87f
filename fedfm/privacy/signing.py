"""Site signatures on ledger entries: only the holder of a site's private key can write an entry
that verifies under the site's public key.

The key pair is the one a SuperNode authenticates with in deployment (EC SECP384R1, OpenSSH
format, written by ``fedfm deploy``; its public key is registered at the coordinator), or, in
simulation, one generated per site in the run's ledger folder (``keys/<site>`` and
``keys/<site>.pub``). A signature is ECDSA with SHA-384 over the entry's hash, base64 in the
entry's ``signature`` field, with ``key_id`` (the SHA-256 of the public key) beside it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

KEYS_DIR = "keys"


class SigningError(RuntimeError):
    """A key cannot be read, or a signature does not verify."""


def public_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(raw).hexdigest()


class EntrySigner:
    """Signs ledger entry hashes with one site's private key."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._key = private_key
        self.key_id = public_key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> EntrySigner:
        path = Path(path)
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as err:
            raise SigningError(f"{path}: not a readable OpenSSH private key ({err}); pass the site's key pair "
                               "written by fedfm deploy") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SigningError(f"{path}: an EC key is needed (fedfm deploy writes SECP384R1 keys)")
        return cls(key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, entry_hash: str) -> str:
        return base64.b64encode(self._key.sign(bytes.fromhex(entry_hash), ec.ECDSA(hashes.SHA384()))).decode()


class LazySigner:
    """An :class:`EntrySigner` made on the first signature (a site that never writes its ledger,
    e.g. without DP, leaves no key behind)."""

    def __init__(self, make) -> None:
        self._make = make
        self._signer: EntrySigner | None = None

    def _get(self) -> EntrySigner:
        if self._signer is None:
            self._signer = self._make()
        return self._signer

    @property
    def key_id(self) -> str:
        return self._get().key_id

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._get().public_key

    def sign(self, entry_hash: str) -> str:
        return self._get().sign(entry_hash)


def site_signer(ledger_dir: str | Path, site: str, signing_key: str | Path | None = None) -> LazySigner:
    """The site's signer: its own private key file (deployment), else a simulation key pair."""
    if signing_key:
        return LazySigner(lambda: EntrySigner.from_file(signing_key))
    return LazySigner(lambda: simulation_signer(ledger_dir, site))


def write_key_pair(folder: str | Path, name: str) -> tuple[Path, Path]:
    """An EC SECP384R1 key pair as ``<folder>/<name>`` (OpenSSH private key, mode 0600) and
    ``<name>.pub`` (OpenSSH public key, what the coordinator registers). When several processes
    make the same pair at once, the first writer wins and every one gets that pair."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, private)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    if not public.is_file():
        raw = EntrySigner.from_file(private).public_key.public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH)
        public.write_bytes(raw + f" {name}\n".encode())
    return private, public


def simulation_signer(ledger_dir: str | Path, site: str) -> EntrySigner:
    """The site's key pair in ``<ledger_dir>/keys/`` (created on first use): simulation only."""
    folder = Path(ledger_dir) / KEYS_DIR
    if not (folder / site).is_file():
        write_key_pair(folder, site)
    return EntrySigner.from_file(folder / site)


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        kind, body = path.read_bytes().split()[:2]  # "<type> <base64> [comment]"
        key = serialization.load_ssh_public_key(kind + b" " + body)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise SigningError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningError(f"{path}: an EC public key is needed")
    return key


def verify_signature(public_key: ec.EllipticCurvePublicKey, entry_hash: str, signature: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature), bytes.fromhex(entry_hash), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
