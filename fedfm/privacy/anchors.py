"""The coordinator's anchor log: every ledger head the sites sent, in a signed append-only file.

Each training reply carries the site's signed ledger head (:mod:`fedfm.privacy.heads`). The
coordinator appends it, with the round and the time, to ``anchors.jsonl``: a hash-chained
:class:`~fedfm.privacy.ledger.SiteLedger` whose entries the coordinator signs with its own key
(``keys/coordinator`` beside the log). In simulation the log lives in the run folder
(``ledger-federation/``); in deployment next to the SuperLink's state, so it spans runs.

Anchors turn a site's ledger from "whatever the file says now" into "at least what the site
declared, round by round": :func:`check_ledger` finds truncation, rollback, deleted, reordered or
rewritten entries and a ledger copied from another site, naming the site and the entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedfm.privacy.heads import LedgerHead, disagreement
from fedfm.privacy.ledger import LedgerError, SiteLedger
from fedfm.privacy.signing import (
    KEYS_DIR,
    LazySigner,
    SigningError,
    load_public_key,
    public_key_id,
    simulation_signer,
    verify_signature,
)

ANCHOR_LOG = "anchors"  # <anchor_dir>/anchors.jsonl
COORDINATOR = "coordinator"  # the coordinator's key pair: <anchor_dir>/keys/coordinator(.pub)


class AnchorRejected(RuntimeError):
    """A head that goes back behind what the coordinator anchored for that site before."""


class AnchorLog:
    """The coordinator's signed log of ledger heads in ``folder``."""

    def __init__(self, folder: str | Path, sign: bool = True):
        self.folder = Path(folder)
        signer = LazySigner(lambda: simulation_signer(self.folder, COORDINATOR)) if sign else None  # made on the first anchor
        self.ledger = SiteLedger(self.folder, ANCHOR_LOG, signer)

    @property
    def path(self) -> Path:
        return self.ledger.path

    def exists(self) -> bool:
        return self.path.is_file()

    def heads(self) -> list[tuple[dict[str, Any], LedgerHead]]:
        """(anchor entry, head) pairs in the order they were anchored; the chain is verified."""
        return [(entry, LedgerHead.from_dict(entry["head"])) for entry in self.ledger.verify()]

    def last_for(self, site: str) -> LedgerHead | None:
        last = None
        for _, head in self.heads():
            if head.site == site:
                last = head
        return last

    def append(self, head: LedgerHead, server_round: int, run_id: str = "") -> dict[str, Any]:
        """Anchor ``head``; refuse (:class:`AnchorRejected`) one that goes back behind the site's last head."""
        previous = self.last_for(head.site)
        if previous is not None and (head.entries < previous.entries or head.epsilon < previous.epsilon - 1e-9):
            raise AnchorRejected(
                f"{head.site} sent a ledger head at {head.entries} entries (epsilon {head.epsilon:.6f}) after the "
                f"coordinator anchored {previous.entries} entries (epsilon {previous.epsilon:.6f}): its ledger was "
                "truncated, rolled back or reset")
        return self.ledger.append({"round": server_round, "run_id": run_id, "head": head.to_dict(), "time": time.time()})


def verify_log(log: AnchorLog) -> tuple[list[tuple[dict[str, Any], LedgerHead]], list[str]]:
    """The log's heads and the problems of the log itself (chain, the coordinator's signatures)."""
    try:
        heads = log.heads()
    except LedgerError as err:
        return [], [f"the coordinator's anchor log is broken or was tampered with: {err}"]
    key_path = log.folder / KEYS_DIR / f"{COORDINATOR}.pub"
    if not heads:
        return heads, []
    if not key_path.is_file():
        return heads, [f"{log.path}: no coordinator public key {key_path}: the anchors' signatures cannot be checked"]
    try:
        public = load_public_key(key_path)
    except SigningError as err:
        return heads, [str(err)]
    key_id = public_key_id(public)
    problems = [
        f"{log.path}: anchor {number} (round {entry.get('round')}) is not signed by the coordinator's key {key_path}"
        for number, (entry, _) in enumerate(heads, start=1)
        if entry.get("key_id") != key_id or not verify_signature(public, entry["hash"], entry.get("signature", ""))
    ]
    return heads, problems


def check_ledger(site: str, entries: list[dict[str, Any]], anchored: list[tuple[dict[str, Any], LedgerHead]],
                 public_key=None) -> list[str]:
    """Problems of one site's ledger ``entries`` against the heads the coordinator anchored for it."""
    problems = []
    for entry, head in anchored:
        if head.site != site:
            continue
        where = f"{site}: the head anchored in round {entry.get('round')}"
        if public_key is not None and not head.verifies_with(public_key):
            problems.append(f"{where} is not signed with {site}'s key (a head forged or sent for another site)")
        problem = disagreement(head, entries)
        if problem:
            problems.append(f"{where} is not in the ledger: {problem}; the ledger was truncated, rolled back, "
                            "reordered, rewritten or copied from another site")
    return problems
