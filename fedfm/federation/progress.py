"""The one line a round prints."""

from __future__ import annotations

from typing import Any


def progress_line(entry: dict[str, Any], rounds: int) -> str:
    parts = [f"[fedfm] round {entry['round']}/{rounds}: {len(entry['participants'])} sites trained"]
    if entry["refused"]:
        parts.append(f"{len(entry['refused'])} refused/rejected")
    if entry.get("clipped"):
        parts.append(f"{len(entry['clipped'])} updates bounded")
    if entry["train_loss"] is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    if entry["max_epsilon"]:
        parts.append(f"max epsilon {entry['max_epsilon']:.3f}")
    if entry.get("client_epsilon"):
        parts.append(f"client-level epsilon {entry['client_epsilon']:.3f}")
    if entry["val_auroc"] is not None:
        parts.append(f"val AUROC {entry['val_auroc']:.4f}")
    parts.append(f"{entry['elapsed_s']:.0f} s")
    return ", ".join(parts)
