"""What one hospital does in a round: train the global adapter locally, or evaluate it.

No Flower here: the ClientApp turns messages into calls on :class:`Site` and back, so the
same code runs in simulation, in deployment and in tests.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import opacus
import torch

from fedfm.config import ExperimentConfig, config_hash
from fedfm.data import label_counts, load_site
from fedfm.data.types import SiteData, Split
from fedfm.eval.metrics import classification_metrics
from fedfm.models import ModelSpec, adapter_state_dict
from fedfm.models.method import adapter_method
from fedfm.personal import PersonalState
from fedfm.protocol import (
    CACHE_BUILD_SECONDS,
    CLASS_WEIGHTED,
    CLASS_WEIGHTS,
    BUDGET_EPSILON,
    DELTA,
    EPSILON,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    site_name,
    train_metrics,
)
from fedfm.privacy.accountant import SiteAccountant, StepBatch, calibrate_noise
from fedfm.privacy.entries import LABEL_COUNTS, NO_AMPLIFICATION, POISSON, LedgerEntry
from fedfm.privacy.heads import HEADS_DIR, HeadStore, LedgerHead, head_of
from fedfm.privacy.ledger import SiteLedger
from fedfm.privacy.signing import site_signer
from fedfm.training.activation_cache import ActivationCache, FeatureSplit, SuffixModel, prefix_length
from fedfm.training.class_balance import (
    LABEL_COUNT_SENSITIVITY,
    balanced_weights,
    label_count_release,
    noisy_label_counts,
    release_seed,
    wants_weights,
)
from fedfm.training.local import plan_steps, predict_probs, train_round


class HeldOut(RuntimeError):
    """The site is held out of training (eval.holdout_sites): it only evaluates."""


class BudgetExhausted(RuntimeError):
    """The site refuses a round because it would take its epsilon above its budget."""


def round_seed(seed: int, site_id: int, server_round: int) -> int:
    """A seed per (experiment seed, site, round): independent streams, reproducible runs."""
    digest = hashlib.sha256(f"{seed}/{site_id}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class TrainReply:
    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    head: LedgerHead | None = None  # the site's signed ledger head after this round (DP-SGD sites)


@dataclass(frozen=True)
class EvalReply:
    metrics: dict[str, float | int]
    probs: np.ndarray
    labels: np.ndarray


class Site:
    """One hospital: its data, its ledger and its privacy budget."""

    def __init__(self, config: ExperimentConfig, site_id: int, ledger_dir: str | Path, data: SiteData | None = None,
                 signing_key: str | Path | None = None, run_id: str = "", heads_dir: str | Path | None = None):
        """``data`` replaces the site's own split of ``config.data`` (e.g. the pooled data of a
        centralized baseline); its ``name`` then names the site and its ledger. ``signing_key`` is
        the site's private key (in deployment its SuperNode's); without one, a key pair made for the
        site in ``ledger_dir/keys`` (simulation) signs its ledger entries. ``run_id`` names the run in
        every ledger entry; ``heads_dir`` keeps the site's last signed ledger head (default
        ``ledger_dir/heads``)."""
        self.config = config
        self.site_id = site_id
        self.run_id = str(run_id)
        self.name = data.name if data is not None else site_name(site_id)
        self.data: SiteData = data if data is not None else load_site(config.data, site_id)
        self.method = adapter_method(ModelSpec(config.model, config.lora, self.data.num_classes, self.data.channels,
                                               config.data.image_size, self.data.spatial_dims))
        self.ledger = SiteLedger(ledger_dir, self.name, site_signer(ledger_dir, self.name, signing_key))
        self.heads = HeadStore(Path(heads_dir) if heads_dir else Path(ledger_dir) / HEADS_DIR, self.name)
        self.personal = PersonalState(Path(ledger_dir) / "personal", self.name, config.lora.personal)
        self.cache: ActivationCache | None = None
        if config.train.activation_cache:
            root = Path(config.train.activation_cache_dir or Path(ledger_dir) / "activation-cache").expanduser()
            self.cache = ActivationCache(root / self.name, self.name, config.train.activation_cache_dtype,
                                         config.eval.batch_size)

    def runnable(self, model: torch.nn.Module, split: str) -> tuple[torch.nn.Module, Split | FeatureSplit]:
        """What to run on ``split``: the model and the images, or (with the activation cache and a
        frozen prefix) the rest of the model and the prefix's cached activations."""
        data = getattr(self.data, split)
        length = prefix_length(model) if self.cache is not None else 0
        if length == 0:
            return model, data
        return SuffixModel(model, length), self.cache.feature_split(model, length, split, data)

    def fresh_model(self, global_adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The model this site trains or evaluates, starting from ``global_adapter``.

        The run's adaptation method builds it (:mod:`fedfm.models.method`): with per-site ranks
        the global adapter is merged into the base weights and the site gets its own rank.
        """
        return self.method.site_model(self.name, global_adapter)

    def noise_multiplier(self, sample_rate: float, steps_per_round: int) -> float:
        """The configured sigma, or one calibrated to the target epsilon over all planned rounds
        of ``privacy.runs_in_budget`` runs, with each run's label-count release (class balance) in
        the same budget."""
        privacy = self.config.privacy
        if privacy.noise_multiplier is not None:
            return privacy.noise_multiplier
        target = privacy.target_epsilon or self.budget
        runs = privacy.runs_in_budget
        total_steps = steps_per_round * self.config.federation.rounds * runs
        fixed = (label_count_release(self.config.train.label_count_noise, runs),) if self.releases_label_counts else ()
        return _calibrated_noise(target, privacy.delta, sample_rate, total_steps, privacy.accountant, fixed)

    @property
    def releases_label_counts(self) -> bool:
        """Under DP-SGD, class balance (auto or weighted) needs the site's label counts, released with noise."""
        return self.config.privacy.sample_level and self.config.train.class_balance != "none"

    @property
    def held_out(self) -> bool:
        return self.site_id in self.config.eval.holdout_sites

    def train(self, global_adapter: dict[str, torch.Tensor], server_round: int) -> TrainReply:
        cfg = self.config
        if self.held_out:
            raise HeldOut(f"{self.name} is held out of training (eval.holdout_sites): it only evaluates")
        torch.set_num_threads(cfg.train.threads)
        plan = plan_steps(len(self.data.train), cfg.train.batch_size, cfg.train.local_epochs)
        accountant = sigma = None
        if cfg.privacy.sample_level:
            self.check_ledger()
            accountant = self.ledger.accountant(cfg.privacy.accountant)
            sigma = self.noise_multiplier(plan.sample_rate, plan.steps)
            batches = [StepBatch(sigma, plan.sample_rate, plan.steps)]
            if self.releases_label_counts and self._released_label_counts() is None:
                batches.insert(0, label_count_release(cfg.train.label_count_noise))  # released first, this round
            self._check_budget(accountant, *batches)
        class_weights = self.class_weights(server_round, accountant)
        built_before = self.cache.stats.build_seconds if self.cache is not None else 0.0
        model = self.fresh_model(self.personal.apply(global_adapter, before=server_round))
        trained, train_split = self.runnable(model, "train")
        started = time.perf_counter()
        outcome = train_round(
            trained, train_split, cfg.train, cfg.privacy, accountant, sigma or 0.0,
            round_seed(cfg.train.seed, self.site_id, server_round), class_weights=class_weights,
        )
        seconds = time.perf_counter() - started
        epsilon = 0.0
        if accountant is not None:
            epsilon = accountant.epsilon(cfg.privacy.delta)
            self._record(server_round, outcome.steps, sigma, outcome.sample_rate, epsilon, class_weights)
        # Every site's reply carries both keys (the server aggregates only replies with the same
        # keys); unweighted is weight 1 for every class.
        balance = {
            CLASS_WEIGHTED: int(class_weights is not None),
            CLASS_WEIGHTS: [float(w) for w in (class_weights if class_weights is not None else [1.0] * self.data.num_classes)],
        }
        metrics = train_metrics(
            self.site_id, len(self.data.train),
            **{TRAIN_LOSS: outcome.mean_loss, STEPS: outcome.steps, EPSILON: epsilon,
               DELTA: cfg.privacy.delta if cfg.privacy.sample_level else 0.0,
               BUDGET_EPSILON: self.budget if cfg.privacy.sample_level else 0.0,
               NOISE_MULTIPLIER: outcome.noise_multiplier, SAMPLE_RATE: outcome.sample_rate, TRAIN_SECONDS: seconds},
            **balance,
            **self.cache_metrics(since=built_before),
        )
        adapter = adapter_state_dict(model)
        if self.personal.enabled:
            self.personal.save(server_round, adapter)
        return TrainReply(adapter, metrics, self.heads.load() if accountant is not None else None)  # the head just signed

    def check_ledger(self) -> None:
        """Refuse (:class:`LedgerRolledBack`) to train on a ledger behind the last head this site signed."""
        self.heads.check(self.ledger.verify(), self.ledger.signer.public_key if self.heads.path.is_file() else None)

    def head(self) -> LedgerHead:
        """The site's ledger head now, signed with its key."""
        return head_of(self.name, self.ledger.verify(), self.ledger.signer)

    def _append(self, entry: LedgerEntry) -> None:
        """Append ``entry`` to the ledger (with the run and the config it was trained with), then
        keep the new signed head apart from the ledger."""
        self.ledger.append({**entry.to_record(), "run_id": self.run_id, "config_hash": config_hash(self.config)})
        self.heads.save(self.head())

    @property
    def budget(self) -> float:
        """This site's epsilon budget (its own entry in privacy.budget.sites, or the shared one)."""
        return self.config.privacy.budget.for_site(self.name)

    def class_weights(self, server_round: int, accountant: SiteAccountant | None) -> list[float] | None:
        """The class weights this round trains with, or None (unweighted), per ``train.class_balance``.

        Under DP-SGD (``accountant`` given) the decision and the weights come only from the site's
        noisy label counts: released the first time the site trains (composed onto
        ``accountant`` and written to the ledger), read back from the ledger afterwards. Without
        DP-SGD they come from the exact counts.
        """
        train = self.config.train
        if train.class_balance == "none":
            return None
        if accountant is None:
            counts: list[float] = [float(c) for c in label_counts(self.data.train, self.data.num_classes)]
        else:
            released = self._released_label_counts()
            counts = released if released is not None else self._release_label_counts(server_round, accountant)
        noise = train.label_count_noise if accountant is not None else 0.0
        if not wants_weights(train.class_balance, counts, train.class_balance_ratio, noise):
            return None
        return balanced_weights(counts)

    def _released_label_counts(self) -> list[float] | None:
        """The noisy label counts this site released before (its ledger's label-count entry), if any."""
        for entry in self.ledger.verify():
            if entry.get("kind") == LABEL_COUNTS:
                return [float(c) for c in entry["noisy_label_counts"]]
        return None

    def _release_label_counts(self, server_round: int, accountant: SiteAccountant) -> list[float]:
        """Release the train label counts with the Gaussian mechanism, once: compose it onto
        ``accountant`` and record it in the ledger before anything uses the counts."""
        cfg = self.config
        exact = label_counts(self.data.train, self.data.num_classes)
        noisy = noisy_label_counts(exact, cfg.train.label_count_noise, release_seed(cfg.train.seed, self.site_id),
                                   cfg.privacy.secure_mode)
        release = label_count_release(cfg.train.label_count_noise)
        accountant.add(release)
        privacy = cfg.privacy
        self._append(LedgerEntry(
            kind=LABEL_COUNTS,
            round=server_round,
            steps=release.steps,
            noise_multiplier=release.noise_multiplier,
            sample_rate=release.sample_rate,
            sampling=NO_AMPLIFICATION,
            sensitivity=LABEL_COUNT_SENSITIVITY,
            noisy_label_counts=noisy,
            delta=privacy.delta,
            accountant=privacy.accountant,
            accountant_library=f"opacus {opacus.__version__}",
            epsilon=accountant.epsilon(privacy.delta),
            budget_epsilon=self.budget,
            n_train=len(self.data.train),
            time=time.time(),
        ))
        return noisy

    def _check_budget(self, accountant: SiteAccountant, *batches: StepBatch) -> None:
        """Refuse the round if ``batches`` (its label-count release, if still to come, and its
        DP-SGD steps) would take the site above its budget."""
        privacy = self.config.privacy
        projected = accountant.epsilon_after(batches, privacy.delta)
        if projected > self.budget:
            spent = accountant.epsilon(privacy.delta)
            raise BudgetExhausted(
                f"{self.name} refuses the round: epsilon would reach {projected:.3f} > budget "
                f"{self.budget} (spent so far {spent:.3f} at delta {privacy.delta})"
            )

    def _record(self, server_round: int, steps: int, sigma: float, q: float, epsilon: float,
                class_weights: list[float] | None = None) -> None:
        privacy = self.config.privacy
        self._append(LedgerEntry(
            round=server_round,
            steps=steps,
            noise_multiplier=sigma,
            sample_rate=q,
            sampling=POISSON,
            max_grad_norm=privacy.max_grad_norm,
            delta=privacy.delta,
            accountant=privacy.accountant,
            accountant_library=f"opacus {opacus.__version__}",
            epsilon=epsilon,
            budget_epsilon=self.budget,
            n_train=len(self.data.train),
            time=time.time(),
            class_weights=None if class_weights is None else [float(w) for w in class_weights],
        ))

    def evaluate(self, global_adapter: dict[str, torch.Tensor], split: str, personal: bool = False) -> EvalReply:
        """Metrics of the global adapter on ``split``; with ``personal``, of this site's personalized
        model (the global adapter with the site's own personal tensors, lora.personal)."""
        torch.set_num_threads(self.config.train.threads)
        data = getattr(self.data, split)
        if personal:
            global_adapter = self.personal.apply(global_adapter)
        model, inputs = self.runnable(self.fresh_model(global_adapter), split)
        probs = predict_probs(model, inputs, self.config.eval.batch_size)
        metrics = classification_metrics(probs, data.labels) if len(data) else {"n": 0}
        return EvalReply(metrics, probs, data.labels)

    def cache_metrics(self, since: float = 0.0) -> dict[str, float | int]:
        """Seconds spent building cache files (those after ``since``, a reading of this process's
        total: a site kept across rounds reports 0 once its files exist), and bytes of the files in use."""
        if self.cache is None:
            return {}
        metrics = self.cache.describe()
        metrics[CACHE_BUILD_SECONDS] -= since
        return metrics

    def sizes(self) -> dict[str, int]:
        return {"n_train": len(self.data.train), "n_val": len(self.data.val), "n_test": len(self.data.test)}

    def label_counts(self) -> dict[str, list[int]]:
        """Images of each class in each split (what the report shows as the site's label distribution)."""
        return {split: label_counts(getattr(self.data, split), self.data.num_classes) for split in ("train", "val", "test")}


@functools.lru_cache(maxsize=256)
def _calibrated_noise(target: float, delta: float, q: float, steps: int, mechanism: str,
                      fixed: tuple[StepBatch, ...] = ()) -> float:
    return calibrate_noise(target, delta, q, steps, mechanism, fixed)
