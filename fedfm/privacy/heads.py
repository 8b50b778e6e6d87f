"""Ledger heads: a site's signed statement of how far its ledger goes.

A head names the site, the number of entries in its ledger, the hash of the last one and the
cumulative epsilon that entry records, signed with the site's private key. A site sends its head
with every training reply (the coordinator anchors it, :mod:`fedfm.privacy.anchors`) and keeps its
own last head in a file apart from the ledger: a ledger found shorter than, or different from,
the last head the site signed was truncated, rolled back or replaced, and the site refuses to train
on it (:class:`LedgerRolledBack`) rather than start its budget again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedfm.privacy.ledger import atomic_write
from fedfm.privacy.signing import verify_signature

HEADS_DIR = "heads"  # <ledger_dir>/heads/<site>.json unless the site names another folder


class LedgerRolledBack(RuntimeError):
    """The ledger is shorter than, or differs from, the last head the site signed."""


@dataclass(frozen=True)
class LedgerHead:
    site: str
    entries: int  # entries in the ledger
    hash: str  # hash of the last entry ("" when the ledger is empty)
    epsilon: float  # cumulative epsilon recorded in the last entry
    key_id: str = ""
    signature: str = ""

    def digest(self) -> str:
        """sha256 of the signed fields (site, entries, hash, epsilon) as canonical JSON."""
        body = {"site": self.site, "entries": self.entries, "hash": self.hash, "epsilon": float(self.epsilon)}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LedgerHead:
        return cls(str(raw["site"]), int(raw["entries"]), str(raw["hash"]), float(raw["epsilon"]),
                   str(raw.get("key_id", "")), str(raw.get("signature", "")))

    def verifies_with(self, public_key) -> bool:
        return bool(self.signature) and verify_signature(public_key, self.digest(), self.signature)


def head_of(site: str, entries: list[dict[str, Any]], signer=None) -> LedgerHead:
    """The head of ``entries`` (a verified ledger), signed with ``signer`` when given."""
    last = entries[-1] if entries else {}
    head = LedgerHead(site, len(entries), str(last.get("hash", "")), float(last.get("epsilon", 0.0)))
    if signer is None:
        return head
    return LedgerHead(head.site, head.entries, head.hash, head.epsilon, signer.key_id, signer.sign(head.digest()))


def disagreement(head: LedgerHead, entries: list[dict[str, Any]]) -> str | None:
    """How ``entries`` (a site's ledger) fail to contain ``head``, or None when they do."""
    if head.entries == 0:
        return None
    if len(entries) < head.entries:
        return (f"the ledger has {len(entries)} entries but {head.site} signed a head at {head.entries} entries "
                f"(epsilon {head.epsilon:.6f})")
    entry = entries[head.entries - 1]
    if entry.get("hash") != head.hash:
        return (f"entry {head.entries} (round {entry.get('round')}) has hash {str(entry.get('hash'))[:12]}... but the "
                f"signed head has {head.hash[:12]}...")
    if abs(float(entry.get("epsilon", 0.0)) - head.epsilon) > 1e-9:
        return f"entry {head.entries} records epsilon {entry.get('epsilon')} but the signed head {head.epsilon}"
    return None


class HeadStore:
    """The last head a site signed, kept in its own file (``<folder>/<site>.json``)."""

    def __init__(self, folder: str | Path, site: str):
        self.path = Path(folder) / f"{site}.json"
        self.site = site

    def load(self) -> LedgerHead | None:
        if not self.path.is_file():
            return None
        try:
            return LedgerHead.from_dict(json.loads(self.path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise LedgerRolledBack(f"{self.path}: the site's last signed head is unreadable ({err}); restore it or "
                                   "the ledger it belongs to") from None

    def save(self, head: LedgerHead) -> None:
        atomic_write(self.path, json.dumps(head.to_dict(), sort_keys=True) + "\n")

    def check(self, entries: list[dict[str, Any]], public_key=None) -> None:
        """Raise :class:`LedgerRolledBack` when ``entries`` do not extend the last signed head."""
        head = self.load()
        if head is None:
            return
        if public_key is not None and not head.verifies_with(public_key):
            raise LedgerRolledBack(f"{self.site} refuses to train: its last head {self.path} is not signed with its own "
                                   "key (replaced by someone else); restore the site's head and ledger")
        problem = disagreement(head, entries)
        if problem:
            raise LedgerRolledBack(
                f"{self.site} refuses to train: {problem}; the ledger was truncated, rolled back or replaced "
                f"(its head is kept in {self.path}). Restore the ledger from a backup: starting it again would "
                "reset the privacy budget this site's data has spent")
