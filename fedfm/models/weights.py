"""Read a local weights file (``model.weights_path``) into a module, naming what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedfm.config import ConfigError


def check_weights_file(model_cfg, null_means: str = "") -> None:
    """Before a run (``register_backbone(check=...)``): ``model.weights_path``, when set, is a file.
    ``null_means`` tells what a null weights_path gives instead (e.g. the installed weights)."""
    path = model_cfg.weights_path
    if not path:
        return
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"model.weights_path={path!r} is a folder: give a state-dict file (.pt, .pth, .safetensors) "
                          f"for model.backbone={model_cfg.backbone}, or null it{null_means}")
    if not file.is_file():
        raise ConfigError(f"model.weights_path={path!r} does not exist: give a state-dict file for "
                          f"model.backbone={model_cfg.backbone}, or null it{null_means}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or torch state dict (unwrapping a ``state_dict``/``model`` entry)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights_path={path!r} does not exist (give a state-dict file or null it)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_weights(module: nn.Module, path: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``path`` into ``module``; keys under ``skip_prefixes`` (a new head) are not required."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(skip_prefixes)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"model.weights_path={path!r} does not fit the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict(state, strict=False)
