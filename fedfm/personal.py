"""A site's personal tensors (``lora.personal``): kept at the site from round to round.

``head``: the classification head (FedPer/FedRep style); ``lora_B``: every LoRA B (FedSA-LoRA:
A is shared knowledge, B is the site's own). Each round the site starts from the global adapter
with its personal tensors replaced by its own from its last round, trains, and saves them again.
The tensors still travel with the rest of the update, so the server's global model stays complete
and each site can report the global and the personalized model side by side.

One file per round (``<folder>/<site>-round-NNNN.safetensors``), written atomically: a resumed run
reads the state of the round it resumes from, so it repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedfm.models.method import is_personal

_ROUND = re.compile(r"-round-(\d+)\.safetensors$")


class PersonalState:
    def __init__(self, folder: str | Path, site: str, mode: str):
        self.folder = Path(folder)
        self.site = site
        self.mode = mode

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def path(self, server_round: int) -> Path:
        return self.folder / f"{self.site}-round-{server_round:04d}.safetensors"

    def save(self, server_round: int, adapter: dict[str, torch.Tensor]) -> Path:
        """Keep the personal tensors of ``adapter`` as this site's state after ``server_round``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items() if is_personal(k, self.mode)}
        path = self.path(server_round)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
        return path

    def latest(self, before: int | None = None) -> dict[str, torch.Tensor] | None:
        """The personal tensors of the last round saved (before round ``before``), or None."""
        rounds = []
        for path in self.folder.glob(f"{self.site}-round-*.safetensors"):
            match = _ROUND.search(path.name)
            if match and (before is None or int(match.group(1)) < before):
                rounds.append((int(match.group(1)), path))
        if not rounds:
            return None
        return load_file(str(max(rounds)[1]))

    def apply(self, adapter: dict[str, torch.Tensor], before: int | None = None) -> dict[str, torch.Tensor]:
        """``adapter`` with its personal tensors replaced by this site's own (unchanged when it has none yet)."""
        own = self.latest(before) if self.enabled else None
        if not own:
            return adapter
        unknown = sorted(set(own) - set(adapter))
        if unknown:
            raise ValueError(f"{self.site}'s personal state in {self.folder} has keys the global adapter lacks "
                             f"({unknown[:3]}): it was saved for another model; move the folder away to start afresh")
        return {**adapter, **own}
