"""The site-server protocol in one place: how sites are named, what a message carries under which
key, what a refusal's error code means, and how a site's evaluation travels.

Sites, the ClientApp, the ServerApp, the recorder, the report and the audit use these names; no
other module builds or parses a site name or a message key. Only numpy is imported, so the
ClientApp can read the protocol before anything heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --- site names -------------------------------------------------------------------------------
SITE_PREFIX = "site-"


def site_name(site_id: int) -> str:
    """The federation's name of site ``site_id``: ``site-0``, ``site-1``, ... (ledgers, keys, results)."""
    return f"{SITE_PREFIX}{int(site_id)}"


def is_site_name(name: str) -> bool:
    return name.startswith(SITE_PREFIX) and name[len(SITE_PREFIX):].isdigit()


def site_id(name: str) -> int:
    """The id in a site name (``site-3`` -> 3)."""
    if not is_site_name(name):
        raise ValueError(f"'{name}' is not a site name: sites are named {SITE_PREFIX}<id>, e.g. {site_name(0)}")
    return int(name[len(SITE_PREFIX):])


def site_order(name: str) -> tuple[int, str]:
    """Sort key: site-2 before site-10; a name that is not a site's (e.g. ``centralized``) after them."""
    return (site_id(name), name) if is_site_name(name) else (10**9, name)


def sorted_sites(names: Iterable[str]) -> list[str]:
    return sorted(names, key=site_order)


LOSO_PREFIX = "without-"  # a leave-one-site-out run's folder: without-site-K


def loso_folder(site: int) -> str:
    return f"{LOSO_PREFIX}{site_name(site)}"


def left_out_site(folder: str) -> str:
    """The site a leave-one-site-out folder (``without-site-K``) trained without."""
    name = folder[len(LOSO_PREFIX):] if folder.startswith(LOSO_PREFIX) else ""
    site_id(name)  # raises for a folder that is not one
    return name


# --- refusals: the error code of a train reply that did not train -----------------------------
BUDGET_REFUSED = 4001  # the round would take the site's epsilon above its budget
HELD_OUT = 4002  # a held-out site (eval.holdout_sites) asked to train: it only evaluates
LEDGER_ROLLED_BACK = 4003  # the site's ledger is behind the last head it signed
SITE_WORKER_FAILED = 4004  # deployment: the site's long-lived worker died during the call (the next one restarts it)
REFUSALS_FOR_THE_RUN = (BUDGET_REFUSED, LEDGER_ROLLED_BACK)  # a site refusing so cannot train again in this run

# --- records of a message ---------------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: the adapter (server -> site, and the site's update back)
CONFIG = "config"  # ConfigRecord: what the server asks for
METRICS = "metrics"  # MetricRecord: what the site reports
LAYOUT = "layout"  # the adapter's layout (fedfm.packed): in the server's ConfigRecord, and a ConfigRecord of a train reply
LEDGER_HEAD = "ledger-head"  # ConfigRecord: a DP-SGD site's signed ledger head, in its train reply
# ConfigRecord: a refusal that carries metrics (the validation a train message asked for first), whose
# code and reason travel beside them: a transport's error reply holds no content
REFUSAL, REFUSAL_CODE, REFUSAL_REASON = "refusal", "code", "reason"

# --- config keys (server -> site) ---------------------------------------------------------------
SERVER_ROUND = "server-round"  # set by Flower's strategies
ROUND_OFFSET = "round-offset"  # rounds done before this ServerApp started (resumed runs)
SPLIT = "split"  # val | test
RETURN_PREDICTIONS = "return-predictions"  # send test-set probabilities (pooled metrics)
VALIDATE = "validate"  # a train message: first evaluate the adapter it carries on validation (the last round's)
CALIBRATION_STATS = "calibration-stats"  # send validation statistics for the temperature and threshold
TEMPERATURE, THRESHOLD = "temperature", "threshold"  # the calibration fitted on validation (threshold -1: none)

# --- metric keys (site -> server) -------------------------------------------------------------
SITE_ID = "site-id"
NUM_EXAMPLES = "num-examples"  # FedAvg's weight: the site's training images
CLIENT_WEIGHT = "client-weight"  # client-level DP averages sites with equal weights: always 1
PROCESS_AGE = "process-age-s"
SITE_CALL_SECONDS = "site-call-s"  # the site's whole train call (site built if new, training, encoding)
PROBS, LABELS = "probs", "labels"
PERSONAL = "personal-"  # prefix of a site's personalized-model metrics in its test reply
LABEL_COUNTS = "label-counts-"  # prefix of a site's images per class and split, in its test reply
SIZES = {"n_train": "n-train", "n_val": "n-val", "n_test": "n-test"}
# what a site reports of a training round (the recorder, the report, tune and bench read them)
TRAIN_LOSS = "train-loss"
STEPS = "steps"
EPSILON = "epsilon"  # the site's cumulative epsilon after the round (0 without DP-SGD)
DELTA = "delta"
BUDGET_EPSILON = "budget-epsilon"  # the epsilon budget the site itself enforces (0 without DP-SGD)
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
TRAIN_SECONDS = "train-seconds"  # the round's steps; building the activation cache is counted apart
CLASS_WEIGHTED = "class-weighted"
CLASS_WEIGHTS = "class-weights"
CACHE_BYTES = "cache-bytes"  # bytes of the activation cache files in use
CACHE_BUILD_SECONDS = "cache-build-seconds"  # seconds this training call spent building them
STATISTICS_PREFIX = "cal-"  # a site's calibration statistics in its validation reply
CALIBRATED = "calibrated-"  # a site's metrics after calibration in its test reply


def server_round(config: Mapping[str, Any]) -> int:
    """The round number across resumptions, from a train message's config."""
    return int(config[SERVER_ROUND]) + int(config.get(ROUND_OFFSET, 0))


def train_metrics(site: int, num_examples: int, **values: Any) -> dict[str, Any]:
    """A train reply's metrics: the keys every strategy reads, then the site's own values."""
    return {NUM_EXAMPLES: int(num_examples), SITE_ID: int(site), CLIENT_WEIGHT: 1, **values}


def eval_metrics(site: int, metrics: Mapping[str, Any], sizes: Mapping[str, int],
                 label_counts: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """An evaluate reply's metrics from a site's classification metrics (``n`` = images evaluated)."""
    out: dict[str, Any] = {
        **{k: float(v) for k, v in metrics.items() if k != "n"},
        NUM_EXAMPLES: int(metrics.get("n", 0)),
        SITE_ID: int(site),
        CLIENT_WEIGHT: 1,
        **{SIZES[k]: int(v) for k, v in sizes.items()},
    }
    if label_counts is not None:
        out.update({f"{LABEL_COUNTS}{split}": counts for split, counts in label_counts.items()})
    return out


def with_predictions(metrics: dict[str, Any], probs: np.ndarray, labels: np.ndarray | None, prefix: str = "") -> None:
    """Add a site's probabilities (and labels) to its evaluate reply."""
    metrics[f"{prefix}{PROBS}"] = [float(p) for p in np.asarray(probs).reshape(-1)]
    if labels is not None:
        metrics[f"{prefix}{LABELS}"] = [int(y) for y in labels]


def with_personal(metrics: dict[str, Any], personal: Mapping[str, Any]) -> None:
    """Add the site's personalized model's metrics to its evaluate reply."""
    metrics.update({f"{PERSONAL}{k}": float(v) for k, v in personal.items() if k != "n"})


VALIDATION = "validation-"  # prefix of the validation metrics a train reply carries (VALIDATE)


def with_validation(metrics: dict[str, Any], validation: Mapping[str, Any]) -> None:
    metrics.update({VALIDATION + key: value for key, value in validation.items()})


def split_validation(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A train reply's metrics: (its training metrics, the validation metrics it carries or None)."""
    train = {k: v for k, v in metrics.items() if not k.startswith(VALIDATION)}
    validation = {k[len(VALIDATION):]: v for k, v in metrics.items() if k.startswith(VALIDATION)}
    return train, validation or None


def round_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An evaluate reply's metrics as a round's validation records them: without the predictions
    and calibration statistics a final validation also asks for."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k not in (PROBS, LABELS) and not k.startswith(STATISTICS_PREFIX)}


def reply_site(metrics: Mapping[str, Any]) -> str:
    """The name of the site that sent a reply with these metrics."""
    return site_name(int(metrics[SITE_ID]))


@dataclass
class EvalReplyContent:
    """An evaluate reply, decoded: the site, its metrics, what it shared and what it kept apart."""

    site: str
    metrics: dict[str, Any]
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    personal: dict[str, Any] = field(default_factory=dict)  # the personalized model's metrics
    personal_probs: np.ndarray | None = None
    statistics: dict[str, Any] = field(default_factory=dict)  # calibration statistics (STATISTICS_PREFIX keys)


def decode_eval_reply(metrics: Mapping[str, Any]) -> EvalReplyContent:
    """Split an evaluate reply's metrics into the site, its metrics, predictions, personalized
    metrics and calibration statistics."""
    rest = dict(metrics)
    stats = {k: rest.pop(k) for k in list(rest) if k.startswith(STATISTICS_PREFIX)}
    personal = {k[len(PERSONAL):]: rest.pop(k) for k in list(rest) if k.startswith(PERSONAL)}
    probs = labels = own = None
    if PROBS in rest:
        labels = np.asarray(rest.pop(LABELS), dtype=np.int64)
        probs = np.asarray(rest.pop(PROBS), dtype=np.float64).reshape(len(labels), -1)
    own_probs = personal.pop(PROBS, None)
    if own_probs is not None and labels is not None:
        own = np.asarray(own_probs, dtype=np.float64).reshape(len(labels), -1)
    site = site_name(int(rest.pop(SITE_ID)))
    return EvalReplyContent(site, rest, probs, labels, personal, own, stats)
