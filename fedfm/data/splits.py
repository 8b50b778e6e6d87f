"""Cut one site's examples into train/val/test by fractions, stratified by label and seeded."""

from __future__ import annotations

import numpy as np

from fedfm.data.errors import DataError


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for ``n`` examples; at least one training example is kept."""
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    n_train = n - n_test - n_val
    if n_train < 1:
        raise DataError(
            f"a site with {n} examples has none left for training after data.val_fraction={val_fraction} and "
            f"data.test_fraction={test_fraction}: lower the fractions or give each site more data"
        )
    return n_train, n_val, n_test


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) index arrays; each class is spread evenly over the three.

    Examples are ordered by their random within-class rank divided by the class size, so any
    prefix of the order holds classes in (nearly) their overall proportions; test takes the
    first ``n_test``, val the next ``n_val`` and train the rest.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    n = labels.size
    _, n_val, n_test = split_counts(n, val_fraction, test_fraction)
    key = np.empty(n, np.float64)
    jitter = rng.random(n)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranks = rng.permutation(members.size)
        key[members] = (ranks + jitter[members]) / members.size
    order = np.argsort(key, kind="stable")
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return np.sort(train), np.sort(val), np.sort(test)
