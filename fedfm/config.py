"""One validated configuration tree for an fedfm experiment.

Every section forbids unknown keys, so a typo is an error rather than a silent default.
YAML files in ``configs/`` carry a comment on every field; ``--set section.key=value``
overrides are parsed as YAML scalars and validated against the same tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedfm.protocol import is_site_name, site_id, site_name


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key and the fix."""


class _Section(BaseModel):
    # allow_inf_nan=False: a float key given .inf or .nan is refused like any other bad value (null stays null)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: Literal["synthetic", "medmnist", "folder"] = "synthetic"
    path: str | None = None
    name: str | None = None
    num_sites: int = Field(3, ge=1)
    partition: Literal["iid", "dirichlet", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0)
    seed: int = 0
    image_size: int = Field(32, ge=8)
    # 2: images (N, C, S, S); 3: volumes (N, C, S, S, S), S = image_size. None = read from the data
    # (a MedMNIST file's array shape; synthetic and folder default to 2); folder supports only 2
    spatial_dims: Literal[2, 3] | None = None
    # classes of the task (the model's outputs). None = read from the data (MedMNIST labels, folder
    # class folders; synthetic: 2); a number is checked against the data before a run starts
    num_classes: int | None = Field(None, ge=2)
    samples_per_site: int = Field(300, ge=10)
    site_shift: float = Field(1.0, ge=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    download_dir: str = "~/.fedfm/data"
    # what reports call the data, recorded from the data itself before a run starts (the .npz file's
    # stem, the folder's name, "synthetic"); None = not read yet. Leave it out of a config
    dataset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _synthetic_classes(cls, raw: Any) -> Any:
        """Synthetic data has no labels to read num_classes from: it keeps its default of 2."""
        if isinstance(raw, dict) and raw.get("source", "synthetic") == "synthetic" and raw.get("num_classes") is None:
            return {**raw, "num_classes": 2}
        return raw

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "folder" and not self.path:
            raise ValueError("data.source=folder needs data.path (a folder of site folders)")
        if self.source == "medmnist" and not (self.path or self.name):
            raise ValueError("data.source=medmnist needs data.path (an .npz) or data.name")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        return self


HEAD_INPUT_BACKBONE = "astra-ct"  # the backbone whose head input feature_norm, feature_stage and flip_average shape


class ModelConfig(_Section):
    backbone: str = "vit-tiny"
    pretrained: bool = True
    weights_path: str | None = None
    # astra-ct: standardise each image's pooled feature vector (zero mean, unit variance across its
    # channels, no learned scale) before the head; none = the pooled features as they are
    feature_norm: Literal["none", "layer"] = "none"
    # astra-ct: the encoder stage (1-4) whose pooled output feeds the head; later stages are not
    # built or run (3: layer3's 1024-d features); the default LoRA targets are this stage's 1x1 convs
    feature_stage: int = Field(4, ge=1, le=4)
    # astra-ct with lora.variant=head: the head sees the mean of the pooled features of each image and
    # its mirror images (horizontal: 2 views, the last axis flipped; horizontal_vertical: 4 views, the
    # last two axes flipped each and both), passes of the frozen encoder computed once with the cache
    flip_average: Literal["none", "horizontal", "horizontal_vertical"] = "none"

    @model_validator(mode="after")
    def _check_head_input(self) -> "ModelConfig":
        for key, value, default in (("feature_norm", self.feature_norm, "none"),
                                    ("feature_stage", self.feature_stage, 4),
                                    ("flip_average", self.flip_average, "none")):
            if value != default and self.backbone != HEAD_INPUT_BACKBONE:
                raise ValueError(f"model.{key}={value} applies to {HEAD_INPUT_BACKBONE}'s pooled features; "
                                 f"model.backbone={self.backbone} keeps its own head: set model.{key}={default}")
        return self


class LoraConfig(_Section):
    # ffa: A frozen at the seeded init, only B (+ head) trains and is sent; head: no adapter trains,
    # only the new head (a linear probe of the frozen backbone; the adapter layers stay at B = 0)
    variant: Literal["lora", "ffa", "head"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | None = None
    seed: int = 0
    # per-site ranks, e.g. {site-0: 4, site-1: 8}: sites not named use r; non-empty = FLoRA stacking
    site_ranks: dict[str, int] = Field(default_factory=dict)
    # cap on the stacked global adapter's rank per layer: null = exact (up to min(out, in)); a number
    # keeps the best rank-k approximation (truncated SVD), which bounds what the server sends
    stack_max_rank: int | None = Field(None, ge=1)
    # personal tensors start every round from the site's own last values, not the global ones
    personal: Literal["none", "head", "lora_B"] = "none"

    @model_validator(mode="after")
    def _check_ranks(self) -> "LoraConfig":
        for name, rank in self.site_ranks.items():
            if not is_site_name(name):
                raise ValueError(f"lora.site_ranks has the key {name!r}: name sites as {site_name(0)}, {site_name(1)}, ...")
            if rank < 1:
                raise ValueError(f"lora.site_ranks.{name}={rank}: a rank must be a positive integer")
        if self.stack_max_rank is not None and not self.site_ranks:
            raise ValueError(f"lora.stack_max_rank={self.stack_max_rank} only applies with lora.site_ranks "
                             "(stacked aggregation): set lora.site_ranks or leave stack_max_rank null")
        if self.variant == "head" and self.personal == "lora_B":
            raise ValueError("lora.personal=lora_B needs an adapter that trains; lora.variant=head trains the head "
                             "only: use lora.personal=head or another variant")
        if self.site_ranks and self.variant != "lora":
            raise ValueError("lora.site_ranks needs lora.variant=lora (stacking aggregates A and B; "
                             "ffa sends no A): drop one of them")
        if self.site_ranks and self.personal == "lora_B":
            raise ValueError("lora.personal=lora_B does not combine with lora.site_ranks (stacking restarts "
                             "every site's B at zero each round): use lora.personal=head")
        return self

    @property
    def stacked(self) -> bool:
        """Per-site ranks: the server stacks the sites' factors (FLoRA) instead of averaging them."""
        return bool(self.site_ranks)

    def rank_for(self, site: str) -> int:
        """The LoRA rank of ``site`` (its entry in site_ranks, or r)."""
        return int(self.site_ranks.get(site, self.r))


class BudgetConfig(_Section):
    epsilon: float = Field(8.0, gt=0)
    sites: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_sites(self) -> "BudgetConfig":
        for name, value in self.sites.items():
            if not is_site_name(name):
                raise ValueError(f"privacy.budget.sites has the key {name!r}: name sites as {site_name(0)}, {site_name(1)}, ...")
            if value <= 0:
                raise ValueError(f"privacy.budget.sites.{name}={value}: a budget must be a positive epsilon")
        return self

    def for_site(self, name: str) -> float:
        """The site's own budget, or the shared one."""
        return float(self.sites.get(name, self.epsilon))


class ClientDPConfig(_Section):
    noise_multiplier: float = Field(1.0, gt=0)
    clipping_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-3, gt=0, lt=1)


class PrivacyConfig(_Section):
    enabled: bool = True
    level: Literal["sample", "client", "both"] = "sample"
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    secure_mode: bool = False
    grad_sampler: Literal["fused", "opacus"] = "fused"
    # how many runs of this shape the site's budget must cover (a search's trials and its final run):
    # the noise is calibrated so that this many runs together reach the budget, not one
    runs_in_budget: int = Field(1, ge=1)
    budget: BudgetConfig = BudgetConfig()
    client: ClientDPConfig = ClientDPConfig()

    @property
    def sample_level(self) -> bool:
        """DP-SGD at each site protects each image."""
        return self.enabled and self.level in ("sample", "both")

    @property
    def client_level(self) -> bool:
        """The server clips each site's update and noises the average: protects each site."""
        return self.enabled and self.level in ("client", "both")


class FederationConfig(_Section):
    rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_sites: int = Field(1, ge=1)
    client_cpus: int = Field(1, ge=1)
    round_timeout_s: float = Field(3600.0, gt=0)
    site_wait_s: float = Field(600.0, ge=0)
    transport: Literal["fp32", "fp16"] = "fp32"
    ray_address: str | None = None
    # updates a site cannot blow up: each site's update (adapter minus the round's global one) is
    # scaled to at most this L2 norm at the server (null: no bound); median / trimmed_mean replace the
    # weighted average by a robust one (sample-level DP runs)
    update_clip_norm: float | None = Field(None, gt=0)
    aggregator: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    max_update_bytes: int | None = Field(None, ge=1)  # a larger site update is refused before it is decoded
    # one message per site per round: a round's validation (eval.every_round) travels with the next
    # round's train message (the same adapter), the last round's with the final validation; false: a
    # separate evaluate message after training
    validate_with_next_train: bool = True


class TrainConfig(_Section):
    local_epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    max_physical_batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1)
    seed: int = 0
    # compute the frozen, deterministic start of the network once per image and train the rest from it
    activation_cache: bool = True
    activation_cache_dtype: Literal["float32", "float16"] = "float32"  # float16: half the file, not exact
    activation_cache_dir: str | None = None  # null = the site's own folder (next to its ledger)
    # class imbalance: auto = class weights when a site's classes are skewed (largest / smallest
    # train count >= class_balance_ratio), weighted = always, none = never; the counts the weights
    # come from are released with Gaussian noise (label_count_noise) and charged to the site's ledger
    class_balance: Literal["auto", "weighted", "none"] = "auto"
    class_balance_ratio: float = Field(1.5, ge=1)
    label_count_noise: float = Field(20.0, gt=0)


Baseline = Literal["local", "centralized", "centralized_nodp", "federated_nodp"]


class EvalConfig(_Section):
    batch_size: int = Field(256, ge=1)
    every_round: bool = True
    # false: no final test evaluation (a hyperparameter search reads validation metrics only)
    test: bool = True
    share_predictions: bool = True
    holdout_sites: list[int] = Field(default_factory=list)
    leave_one_site_out: bool = False
    baselines: list[Baseline] = Field(default_factory=list)
    baseline_overrides: dict[Baseline, list[str]] = Field(default_factory=dict)
    report: bool = True
    # after training, fit a temperature (and, for two classes, a decision threshold) on the sites'
    # summed validation statistics; applied to the final evaluation, export and predict
    calibrate: bool = True
    # repeat the run with each of these train.seed values and report mean and std ([] = once)
    seeds: list[int] = Field(default_factory=list)


class OutputConfig(_Section):
    dir: str | None = None
    name: str = "fedfm"
    checkpoint_every_round: bool = True


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check_sections_together(self) -> "ExperimentConfig":
        """Checks that need more than one section (each section checks itself)."""
        self._check_noise()
        if self.data.partition == "natural" and self.data.source == "synthetic":
            raise ValueError("data.partition=natural needs site ids in the data; synthetic data has none")
        self._check_holdout_and_study()
        self._check_min_train_sites()
        self._check_site_ranks()
        self._check_aggregation()
        if self.model.flip_average != "none" and self.lora.variant != "head":
            raise ValueError(f"model.flip_average={self.model.flip_average} needs a frozen encoder (lora.variant=head); "
                             f"lora.variant={self.lora.variant} adapts it: set lora.variant=head or model.flip_average=none")
        return self

    def _check_aggregation(self) -> None:
        fed = self.federation
        if fed.aggregator != "fedavg" and self.lora.stacked:
            raise ValueError(f"federation.aggregator={fed.aggregator} does not combine with lora.site_ranks "
                             "(per-site ranks are stacked exactly): set federation.aggregator=fedavg")
        if self.privacy.client_level and (fed.aggregator != "fedavg" or fed.update_clip_norm is not None):
            raise ValueError("federation.aggregator / federation.update_clip_norm do not combine with "
                             "privacy.level=client/both: client-level DP already clips each site's update "
                             "(privacy.client.clipping_norm); set privacy.level=sample or leave them at their defaults")

    def _check_noise(self) -> None:
        p = self.privacy
        if p.enabled and p.noise_multiplier is not None and p.target_epsilon is not None:
            raise ValueError(
                "set privacy.noise_multiplier or privacy.target_epsilon, not both "
                "(null the one you do not want)"
            )

    def _check_min_train_sites(self) -> None:
        """A round waits for federation.min_train_sites training sites: more than train never come."""
        wanted, sites, held = self.federation.min_train_sites, self.data.num_sites, sorted(set(self.eval.holdout_sites))
        training = sites - len(held)
        if wanted > training:
            without = f" minus eval.holdout_sites={held}" if held else ""
            raise ValueError(f"federation.min_train_sites={wanted} but only {training} sites train "
                             f"(data.num_sites={sites}{without}): set federation.min_train_sites to at most {training}")
        if self.eval.leave_one_site_out and wanted > sites - 1:
            raise ValueError(f"federation.min_train_sites={wanted} but eval.leave_one_site_out trains each of its runs "
                             f"on {sites - 1} sites: set federation.min_train_sites to at most {sites - 1}")

    def _check_site_ranks(self) -> None:
        ranks = self.lora.site_ranks
        bad = sorted(n for n in ranks if site_id(n) >= self.data.num_sites)
        if bad:
            raise ValueError(f"lora.site_ranks names {bad}, but data.num_sites={self.data.num_sites} "
                             f"(sites are {site_name(0)}..{site_name(self.data.num_sites - 1)})")
        if ranks and self.privacy.client_level:
            raise ValueError("lora.site_ranks does not combine with privacy.level=client/both: client-level DP "
                             "clips one update shape for every site; set privacy.level=sample")

    def _check_holdout_and_study(self) -> None:
        """Held-out sites, and the study's parts (baselines, leave-one-site-out, their overrides)."""
        held = self.eval.holdout_sites
        bad = [s for s in held if not 0 <= s < self.data.num_sites]
        if bad:
            raise ValueError(f"eval.holdout_sites={held}: site ids must be in 0..{self.data.num_sites - 1}")
        if len(set(held)) >= self.data.num_sites:
            raise ValueError(f"eval.holdout_sites={held} holds out every site: leave at least one to train")
        if held and self.privacy.client_level:
            raise ValueError("eval.holdout_sites does not combine with privacy.level=client/both yet: "
                             "client-level DP needs every sampled site to train")
        if self.eval.leave_one_site_out:
            if self.data.num_sites < 2:
                raise ValueError("eval.leave_one_site_out needs data.num_sites >= 2 (one to hold out, one to train)")
            if self.privacy.client_level:
                raise ValueError("eval.leave_one_site_out does not combine with privacy.level=client/both yet: "
                                 "set privacy.level=sample or eval.leave_one_site_out=false")
        if len(set(self.eval.baselines)) != len(self.eval.baselines):
            raise ValueError(f"eval.baselines={self.eval.baselines} lists a baseline twice")
        if len(set(self.eval.seeds)) != len(self.eval.seeds):
            raise ValueError(f"eval.seeds={self.eval.seeds} lists a seed twice: give each train.seed once")
        for name, items in self.eval.baseline_overrides.items():
            try:  # checked now, not after the federated run has finished
                raw = apply_overrides(self.model_dump(mode="json"), items)
                raw["eval"]["baseline_overrides"] = {}
                ExperimentConfig.model_validate(raw)
            except (ConfigError, ValidationError) as err:
                detail = _format_error(err) if isinstance(err, ValidationError) else str(err)
                raise ValueError(f"eval.baseline_overrides.{name}={items}: {detail}") from None

    def to_json(self) -> str:
        return self.model_dump_json()


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<config>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"unknown config key '{key}': {_valid_keys_hint(parent)}"
    if key == "<config>" or first["type"] == "value_error":
        return f"invalid config: {msg.removeprefix('Value error, ')}"
    value = first.get("input")
    loc = [str(p) for p in first["loc"]]
    inner = loc.index("[key]") if "[key]" in loc else next((i for i, p in enumerate(first["loc"]) if isinstance(p, int)), None)
    if inner is not None:  # an item of a list or a key of a mapping: --set replaces the whole value
        if loc[inner] == "[key]":  # loc: (..., mapping, the bad key, "[key]")
            whole = ".".join(loc[:inner - 1])
            what, form = f"has the key {value!r}", f"--set '{whole}={{...}}', the whole mapping"
        else:
            whole = ".".join(loc[:inner])
            what, form = f"item {loc[inner]} = {value!r}", f"--set '{whole}=[...]', the whole list"
        return f"config key '{whole}' {what}: {msg} (fix it in the YAML or with {form})"
    return f"config key '{key}' = {value!r}: {msg} (fix it in the YAML or with --set {key}=...)"


def _valid_keys_hint(section: str) -> str:
    model: type[BaseModel] = ExperimentConfig
    for part in [p for p in section.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            break
        if not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    where = f"in '{section}'" if section else "at the top level"
    return f"valid keys {where} are {', '.join(model.model_fields)}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-typed value."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' is not of the form section.key=value (e.g. --set train.lr=0.001)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set '{item}' has an empty key (e.g. --set train.lr=0.001)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override set."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set '{item}': '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder: pass a YAML file such as configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (pass a YAML file such as configs/quickstart.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8): pass a YAML file such as "
                          "configs/quickstart.yaml") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {_yaml_problem(path, err)}: fix the YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """``'FILE' line N, column M: problem`` of a YAML syntax error, on one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"'{path}'{where}: {' '.join(str(problem).split())}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment (or the defaults), apply ``--set`` overrides and validate."""
    raw = read_yaml(path) if path is not None else {}
    config = validate_config(apply_overrides(raw, overrides or []))
    _resolve_relative_paths(config, Path(path).parent if path is not None else Path.cwd())
    return config


def _resolve_relative_paths(config: ExperimentConfig, base: Path) -> None:
    """Data paths in a YAML are relative to the YAML's folder unless they exist from the cwd."""
    for section, key in (("data", "path"), ("model", "weights_path")):
        obj = getattr(config, section)
        value = getattr(obj, key)
        if value and not Path(value).expanduser().is_absolute():
            here = Path(value)
            resolved = here if here.exists() else (base / value)
            setattr(obj, key, str(resolved.resolve()))


def config_hash(config: ExperimentConfig) -> str:
    """sha256 of the resolved configuration (canonical JSON): what a ledger entry was trained with."""
    import hashlib

    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
