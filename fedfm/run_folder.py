"""A completed run folder read back: its config, its model spec and its trained model.

``fedfm simulate`` leaves ``config.yaml``, ``results.json`` (``status: complete`` once the final
test evaluation is done) and ``adapter/`` (PEFT format, plus ``fedfm_model.json``) in the run
folder; ``fedfm export`` and ``fedfm predict`` start from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from torch import nn

from fedfm.config import ConfigError, ExperimentConfig, load_config
from fedfm.eval.calibration import Calibration
from fedfm.models import ModelSpec, build_backbone, read_spec
from fedfm.models.method import adapter_method

NEEDED = ("config.yaml", "results.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


class RunFolderError(ConfigError):
    """RUN_DIR is not a completed run folder; the message says what is missing and what to do."""


@dataclass(frozen=True)
class CompletedRun:
    path: Path
    config: ExperimentConfig
    spec: ModelSpec

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"


def open_run(run_dir: str | Path) -> CompletedRun:
    """Check that ``run_dir`` holds a completed run and read its config and model spec."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError(f"RUN_DIR '{run_dir}' is not a folder: pass a run folder written by fedfm simulate")
    missing = [name for name in NEEDED if not (path / name).is_file()]
    if missing:
        raise RunFolderError(
            f"RUN_DIR '{run_dir}' is not a completed run: {', '.join(missing)} missing "
            "(fedfm simulate writes adapter/ when the run completes)"
        )
    status = _status(path / "results.json")
    if status != "complete":
        raise RunFolderError(
            f"RUN_DIR '{run_dir}' is not a completed run: results.json has status '{status}' "
            f"(finish it with fedfm simulate --resume {run_dir})"
        )
    config = load_config(path / "config.yaml")
    spec = read_spec(path / "adapter") or _spec_from_data(config, path)
    return CompletedRun(path, config, spec)


def _status(results: Path) -> str | None:
    try:
        return json.loads(results.read_text()).get("status")
    except (json.JSONDecodeError, AttributeError):
        raise RunFolderError(
            f"{results} is not a results file (not a JSON object): the run did not finish writing it"
        ) from None


def _spec_from_data(config: ExperimentConfig, path: Path) -> ModelSpec:
    """Runs saved without ``fedfm_model.json``: classes and channels come from the run's data."""
    from fedfm.data import dataset_info

    try:
        info = dataset_info(config.data)
    except (ConfigError, OSError) as err:
        raise RunFolderError(
            f"{path / 'adapter'} has no fedfm_model.json and the run's data, needed to know its classes and "
            f"channels, cannot be read ({err}): point data.path in {path / 'config.yaml'} at the data"
        ) from None
    spec = ModelSpec(config.model, config.lora, info.num_classes, info.channels, config.data.image_size, info.spatial_dims)
    return adapter_method(spec).saved_spec


def read_calibration(run: CompletedRun) -> Calibration | None:
    """The temperature and threshold the run fitted on validation (results.json), or None."""
    fitted = json.loads((run.path / "results.json").read_text()).get("calibration")
    if not fitted:
        return None
    threshold = fitted.get("threshold")
    return Calibration(float(fitted["temperature"]), None if threshold is None else float(threshold))


def load_trained_model(run: CompletedRun) -> nn.Module:
    """The backbone with the run's final adapter (``PeftModel.from_pretrained``), in eval mode."""
    spec = run.spec
    backbone = build_backbone(spec.model, spec.num_classes, spec.channels, spec.image_size, spec.spatial_dims)
    return PeftModel.from_pretrained(backbone.model, str(run.adapter_dir)).eval()


def seed_dir(run_dir: Path, seed: int) -> Path:
    """Where a study keeps its run of another seed (eval.seeds), inside the run folder."""
    return run_dir / "seeds" / f"seed-{seed}"
