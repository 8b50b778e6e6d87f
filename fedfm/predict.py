"""``fedfm predict``: class probabilities of image files under a run's trained adapter.

Images are read and resized like ``data.source=folder`` reads them (values in [0, 1], bilinear
to ``image_size``); a gray image is repeated to 3 channels for an RGB model, and an RGB image is
averaged to gray for a gray model (exact for gray images saved as RGB). With ``labelled``, each
image's parent folder name is its true class index, and the accuracy is reported.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfm.config import ConfigError
from fedfm.data.errors import DataError
from fedfm.data.folder import IMAGE_SUFFIXES, read_image
from fedfm.data.resize import resize_images
from fedfm.data.types import Split
from fedfm.models import ModelSpec
from fedfm.eval.calibration import Calibration, apply_calibration
from fedfm.run_folder import load_trained_model, open_run, read_calibration
from fedfm.training.local import predict_probs


@dataclass(frozen=True)
class Predictions:
    files: list[Path]
    probs: np.ndarray  # (N, num_classes): softmax of the logits, after the run's calibration when it has one
    labels: np.ndarray | None  # true class per file when known (labelled), else None
    decisions: np.ndarray | None = None  # classes under the run's fitted threshold; None = most probable class
    calibration: Calibration | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if self.decisions is None else self.decisions

    @property
    def accuracy(self) -> float | None:
        if self.labels is None or not len(self.labels):
            return None
        return float(np.mean(self.predicted == self.labels))


def predict_run(run_dir: str | Path, images: list[str | Path], labelled: bool = False,
                calibrated: bool = True) -> Predictions:
    """Probabilities of the run's model for ``images`` (files, or folders searched for image files);
    with ``calibrated``, under the temperature and threshold the run fitted on validation."""
    run = open_run(run_dir)
    files = collect_images(images)
    split = Split(load_images(files, run.spec), np.zeros(len(files), np.int64))
    probs = predict_probs(load_trained_model(run), split, run.config.eval.batch_size)
    labels = folder_labels(files, run.spec.num_classes) if labelled else None
    calibration = read_calibration(run) if calibrated else None
    if calibration is None:
        return Predictions(files, probs, labels)
    scaled, decisions = apply_calibration(probs, calibration)
    return Predictions(files, scaled, labels, decisions, calibration)


def collect_images(items: list[str | Path]) -> list[Path]:
    """The image files named by ``items``: files as given, folders expanded (recursively, sorted)."""
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"IMAGES: folder '{item}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise ConfigError(f"IMAGES: '{item}' does not exist: pass image files or folders of them")
    return files


def load_images(files: list[Path], spec: ModelSpec) -> np.ndarray:
    """float32 (N, channels, image_size, image_size) in [0, 1], as the model takes them."""
    out = np.empty((len(files), spec.channels, spec.image_size, spec.image_size), np.float32)
    for i, path in enumerate(files):
        try:
            image = read_image(path)
        except DataError as err:
            raise ConfigError(f"IMAGES: {str(err).removeprefix('data.path: ')}") from None
        out[i] = resize_images(_to_channels(image, spec.channels)[None], spec.image_size)[0]
    return out


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    return image.mean(axis=0, keepdims=True, dtype=np.float32)


def folder_labels(files: list[Path], num_classes: int) -> np.ndarray:
    """True classes from the parent folder names, which must be class indices 0..num_classes-1."""
    labels = []
    for path in files:
        name = path.parent.name
        if not (name.isdigit() and int(name) < num_classes):
            raise ConfigError(
                f"--labels: the folder of '{path}' is '{name}', not a class index 0..{num_classes - 1}: "
                "put each image in a folder named by its class index"
            )
        labels.append(int(name))
    return np.array(labels, np.int64)


def format_line(path: Path, probs: np.ndarray, label: int | None = None, predicted: int | None = None) -> str:
    """One printed row: file, predicted class, probability of each class (and the true class)."""
    probabilities = " ".join(f"{p:.4f}" for p in probs)
    truth = "" if label is None else f"  true {label}"
    decided = int(probs.argmax()) if predicted is None else int(predicted)
    return f"{path}  class {decided}  p [{probabilities}]{truth}"


def write_csv(predictions: Predictions, path: str | Path) -> Path:
    """Columns: file, predicted, prob_0..prob_{C-1}, and label when known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = predictions.probs.shape[1]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        labelled = predictions.labels is not None
        writer.writerow(["file", "predicted", *(f"prob_{c}" for c in range(classes)), *(["label"] if labelled else [])])
        for i, file in enumerate(predictions.files):
            row = [str(file), int(predictions.predicted[i]), *(repr(float(p)) for p in predictions.probs[i])]
            writer.writerow(row + ([int(predictions.labels[i])] if labelled else []))
    return path
