"""Per-site privacy ledger: an append-only, hash-chained JSON-lines file.

One entry per round the site trained, holding everything needed to recompute its epsilon.
Each write replaces the file atomically (temp file, fsync, rename, fsync of the folder), so a
crash leaves either the old ledger or the new one, never half a line.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedfm.privacy.accountant import SiteAccountant, StepBatch

GENESIS_HASH = "0" * 64


class LedgerError(RuntimeError):
    """The ledger is unreadable or its hash chain is broken."""


UNHASHED = ("hash", "signature")  # the signature signs the hash, so neither is part of it


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON without its own ``hash`` and ``signature`` fields."""
    body = {k: v for k, v in entry.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SiteLedger:
    """The ledger of one site, stored at ``<folder>/<site>.jsonl``."""

    def __init__(self, folder: str | Path, site: str, signer=None):
        """``signer`` (an :class:`fedfm.privacy.signing.EntrySigner`) signs every entry appended."""
        self.path = Path(folder) / f"{site}.jsonl"
        self.site = site
        self.signer = signer

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LedgerError(f"{self.path}: line {number} is not valid JSON ({err.msg})") from None
        return out

    def verify(self) -> list[dict[str, Any]]:
        """Return the entries after checking the hash chain; raise naming the first bad entry."""
        entries = self.entries()
        prev = GENESIS_HASH
        for number, entry in enumerate(entries, start=1):
            if entry.get("prev_hash") != prev:
                raise LedgerError(f"{self.path}: entry {number} does not chain to the entry before it")
            if entry.get("hash") != entry_hash(entry):
                raise LedgerError(f"{self.path}: entry {number} was modified after it was written")
            prev = entry["hash"]
        return entries

    def accountant(self, mechanism: str) -> SiteAccountant:
        """Rebuild the site's accountant from the verified history."""
        return SiteAccountant(mechanism, [batch_of(e) for e in self.verify()])

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain ``record`` onto the ledger and write it durably before returning it."""
        entries = self.verify()
        entry = dict(record, site=self.site, prev_hash=entries[-1]["hash"] if entries else GENESIS_HASH)
        if self.signer is not None:
            entry["key_id"] = self.signer.key_id
        entry["hash"] = entry_hash(entry)
        if self.signer is not None:
            entry["signature"] = self.signer.sign(entry["hash"])
        lines = [json.dumps(e, sort_keys=True) for e in [*entries, entry]]
        atomic_write(self.path, "\n".join(lines) + "\n")
        return entry


def spent_epsilon(folder: str | Path, site: str) -> float | None:
    """The epsilon ``site``'s verified ledger in ``folder`` records as spent (its last entry's); None: no entry."""
    last = next((e for e in reversed(SiteLedger(folder, site).verify()) if "epsilon" in e), None)
    return None if last is None else float(last["epsilon"])


def batch_of(entry: dict[str, Any]) -> StepBatch:
    return StepBatch(float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"]))


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
