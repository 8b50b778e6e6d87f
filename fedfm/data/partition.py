"""Split example indices across sites: iid, Dirichlet label skew, or natural (given site ids).

Every function is deterministic given its seed, and returns one sorted int64 index array per
site; together they are disjoint and cover ``range(n)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedfm.data.errors import DataError

if TYPE_CHECKING:
    from fedfm.config import DataConfig

MAX_DIRICHLET_TRIES = 1000


def iid_partition(n: int, num_sites: int, seed: int, salt: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``num_sites`` near-equal parts."""
    if n < num_sites:
        raise DataError(
            f"data.num_sites={num_sites} but only {n} examples to share: lower data.num_sites or use more data"
        )
    perm = np.random.default_rng([seed, salt]).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_sites)]


def _allocate(n_c: int, props: np.ndarray) -> np.ndarray:
    """Largest-remainder split of ``n_c`` items by proportions ``props`` (sums to 1)."""
    raw = n_c * props
    counts = np.floor(raw).astype(np.int64)
    short = n_c - int(counts.sum())
    if short > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, seed: int) -> np.ndarray:
    """(K, S) class-to-site proportions ~ Dirichlet(alpha), from ``seed`` alone.

    Draws are repeated (at most ``MAX_DIRICHLET_TRIES`` times) until every site's mean share
    of the classes is at least a quarter of an even share, so no site is left nearly empty.
    The criterion does not depend on a split's size, so train, val and test get the same
    proportions and every site keeps one label mix across its splits.
    """
    rng = np.random.default_rng([seed])
    for _ in range(MAX_DIRICHLET_TRIES):
        props = rng.dirichlet(np.full(num_sites, alpha), size=num_classes)
        if props.mean(axis=0).min() >= 0.25 / num_sites:
            return props
    raise DataError(
        f"data.alpha={alpha} left a site nearly empty in {MAX_DIRICHLET_TRIES} draws for "
        f"data.num_sites={num_sites}: raise data.alpha or lower data.num_sites"
    )


def dirichlet_partition(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    seed: int,
    min_size: int = 2,
    salt: int = 0,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared across sites by proportions ~ Dirichlet(alpha).

    The proportions come from :func:`dirichlet_proportions` (``seed`` alone), so a site keeps
    the same label mix in every split partitioned with another ``salt``; which examples go
    where depends on ``salt``.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    k = max(int(num_classes or 1), int(labels.max()) + 1 if labels.size else 1)
    if labels.size < num_sites * min_size:
        raise DataError(
            f"data.num_sites={num_sites} needs at least {num_sites * min_size} examples for a Dirichlet "
            f"partition but there are {labels.size}: lower data.num_sites or use more data"
        )
    class_sizes = np.bincount(labels, minlength=k)
    props = dirichlet_proportions(k, num_sites, alpha, seed)
    counts = np.stack([_allocate(int(class_sizes[c]), props[c]) for c in range(k)])
    if counts.sum(axis=0).min() < min_size:
        raise DataError(
            f"data.alpha={alpha} leaves a site with fewer than {min_size} of the {labels.size} examples of a "
            f"split across data.num_sites={num_sites}: raise data.alpha, lower data.num_sites or change data.seed"
        )
    assign_rng = np.random.default_rng([seed, salt])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(k):
        members = assign_rng.permutation(np.flatnonzero(labels == c))
        for s, chunk in enumerate(np.split(members, np.cumsum(counts[c])[:-1])):
            parts[s].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def natural_partition(site_ids: np.ndarray, num_sites: int, what: str = "site ids") -> list[np.ndarray]:
    """Indices of each site's examples, from a per-example site id in ``0 .. num_sites-1``."""
    ids = np.asarray(site_ids).ravel()
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        if not np.all(np.equal(np.mod(ids, 1), 0)):
            raise DataError(f"{what} must be integers 0..data.num_sites-1, got non-integer values")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= num_sites)]
    if bad.size:
        raise DataError(
            f"{what} holds site id {int(bad[0])} outside 0..{num_sites - 1} for data.num_sites={num_sites}: "
            f"set data.num_sites to the number of sites or renumber the ids from 0"
        )
    parts = [np.flatnonzero(ids == s).astype(np.int64) for s in range(num_sites)]
    for s, part in enumerate(parts):
        if part.size == 0:
            raise DataError(
                f"site {s} has no examples in {what} (data.num_sites={num_sites}): "
                "give every site examples or lower data.num_sites"
            )
    return parts


def default_min_size(n: int, num_sites: int) -> int:
    """A small floor on site size: 2, rising to 10 when there is plenty of data."""
    return max(2, min(10, n // (4 * num_sites)))


def partition_indices(
    labels: np.ndarray,
    cfg: "DataConfig",
    site_ids: np.ndarray | None = None,
    salt: int = 0,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Dispatch on ``cfg.partition``; ``salt`` gives each split its own deterministic stream."""
    labels = np.asarray(labels).ravel()
    if cfg.partition == "iid":
        return iid_partition(labels.size, cfg.num_sites, cfg.seed, salt)
    if cfg.partition == "dirichlet":
        return dirichlet_partition(
            labels,
            cfg.num_sites,
            cfg.alpha,
            cfg.seed,
            min_size=default_min_size(labels.size, cfg.num_sites),
            salt=salt,
            num_classes=num_classes,
        )
    if site_ids is None:
        raise DataError(
            f"data.partition=natural needs a site id per example but data.source={cfg.source} gave none: "
            "use data.partition=iid or dirichlet, or add site ids to the data"
        )
    return natural_partition(site_ids, cfg.num_sites)
