"""``fedfm export``: a run's trained adapter in PEFT format, or the backbone with LoRA merged in.

The adapter export is what ``PeftModel.from_pretrained(backbone, folder)`` loads, plus
``fedfm_model.json`` (backbone, LoRA settings, classes, channels, image size). The merged export
is a plain state dict of the backbone (``model.safetensors``, LoRA folded into the weights by
peft's ``merge_and_unload``) with ``model.json`` saying how to rebuild the module it loads into;
:func:`load_merged` does that. Both come with a model card (``MODEL_CARD.md`` and ``model_card.json``,
:mod:`fedfm.report.model_card`) generated from the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fedfm.config import ConfigError, ModelConfig
from fedfm.models import ModelSpec, build_backbone
from fedfm.models.spec import MERGED_FORMAT, MERGED_SPEC, MERGED_WEIGHTS, merged_description
from fedfm.report.model_card import write_model_card
from fedfm.run_folder import CompletedRun, load_trained_model, open_run, read_calibration

CALIBRATION_FILE = "calibration.json"


def export_run(run_dir: str | Path, out: str | Path | None = None, merge: bool = False) -> Path:
    """Write the run's adapter (or, with ``merge``, the merged model) into ``out`` (default RUN_DIR/export),
    with ``MODEL_CARD.md`` and ``model_card.json`` generated from the run folder."""
    run = open_run(run_dir)
    folder = Path(out) if out is not None else run.path / "export"
    folder.mkdir(parents=True, exist_ok=True)
    folder = export_merged(run, folder) if merge else export_adapter(run, folder)
    write_calibration(run, folder)
    write_model_card(run.path, folder)
    return folder


def write_calibration(run: CompletedRun, folder: Path) -> Path | None:
    """``calibration.json``: the temperature (divide the logits by it) and, for two classes, the
    threshold on the calibrated p(class 1) that the run fitted on validation; absent without one."""
    calibration = read_calibration(run)
    path = folder / CALIBRATION_FILE
    if calibration is None:
        path.unlink(missing_ok=True)
        return None
    path.write_text(json.dumps({**calibration.to_dict(), "use": "probs = softmax(logits / temperature); with two "
                                "classes predict 1 when probs[:, 1] >= threshold"}, indent=2) + "\n")
    return path


def export_adapter(run: CompletedRun, folder: Path) -> Path:
    """Load the run's adapter onto its backbone (so a broken one fails here) and save it in PEFT format."""
    load_trained_model(run).save_pretrained(str(folder))
    run.spec.write(folder)
    return folder


def export_merged(run: CompletedRun, folder: Path) -> Path:
    """``model.safetensors`` (every weight of the merged backbone) + ``model.json`` (how to rebuild it)."""
    merged = load_trained_model(run).merge_and_unload()
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(folder / MERGED_WEIGHTS), metadata={"format": "pt"})
    (folder / MERGED_SPEC).write_text(json.dumps(merged_description(run.spec), indent=2) + "\n")
    return folder


def load_merged(folder: str | Path) -> nn.Module:
    """Rebuild a merged export: the backbone's module (no peft) with every weight from the file, in eval mode."""
    folder = Path(folder)
    path = folder / MERGED_SPEC
    if not path.is_file():
        raise ConfigError(f"'{folder}' has no {MERGED_SPEC}: pass a folder written by fedfm export --merge")
    spec = json.loads(path.read_text())
    if spec.get("format") != MERGED_FORMAT:
        raise ConfigError(
            f"{path} has format {spec.get('format')!r}, not {MERGED_FORMAT!r}: write it with fedfm export --merge"
        )
    # every weight is in the file, so nothing pretrained is loaded first
    model_cfg = ModelConfig(backbone=spec["backbone"], pretrained=False)
    backbone = build_backbone(model_cfg, spec["num_classes"], spec["channels"], spec["image_size"],
                              int(spec.get("spatial_dims", 2)))
    backbone.model.load_state_dict(load_file(str(folder / spec["weights"])), strict=True)
    return backbone.model.eval()
