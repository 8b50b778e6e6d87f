"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedfm.protocol import sorted_sites  # noqa: E402

DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _values(xs: list[Any]) -> np.ndarray:
    return np.array([np.nan if x is None else float(x) for x in xs], dtype=float)


def round_curves(curves: dict[str, Any]) -> bytes:
    """Train loss and validation AUROC per site, per round."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = curves["round"]
    left.plot(rounds, _values(curves["train_loss"]), marker="o", color="black")
    left.set(title="Training loss (weighted over sites)", xlabel="round", ylabel="cross-entropy")
    for site, values in curves["val_auroc"].items():
        right.plot(rounds, _values(values), marker=".", label=site)
    right.set(title="Validation AUROC per site", xlabel="round", ylabel="AUROC", ylim=(0.4, 1.0))
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def epsilon_curves(curves: dict[str, Any]) -> bytes:
    """Each site's epsilon after every round against its budget."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (site, values) in enumerate(curves["epsilon"].items()):
        line = ax.plot(curves["round"], _values(values), marker=".", label=site)[0]
        budget = curves["budget"].get(site)
        if budget is not None:
            ax.axhline(budget, color=line.get_color(), linestyle="--", linewidth=0.8, alpha=0.7 if i else 1.0)
    ax.set(title="Privacy spent per site (dashed: its budget)", xlabel="round", ylabel="epsilon")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability(curves: dict[str, dict[str, list[float]]]) -> bytes:
    """Reliability diagrams: accuracy against mean confidence per bin (15 equal-width bins)."""
    names = [n for n, c in curves.items() if c.get("count")]
    cols = min(3, len(names)) or 1
    rows = int(np.ceil(len(names) / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        c = curves[name]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        size = 20 + 200 * np.asarray(c["count"]) / max(c["count"])
        ax.scatter(c["confidence"], c["accuracy"], s=size, alpha=0.7)
        ax.plot(c["confidence"], c["accuracy"], linewidth=0.8)
        ax.set(title=name, xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy")
        ax.grid(alpha=0.3)
    return _png(fig)


def loso_heatmap(matrix: dict[str, Any]) -> bytes:
    """Trained-on x evaluated-on test AUROC; the diagonal of the 'without' rows is the unseen site."""
    sites, rows = matrix["sites"], matrix["rows"]
    grid = np.array([[np.nan if r["auroc"].get(s) is None else r["auroc"][s] for s in sites] for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(sites) + 2.5, 0.55 * len(rows) + 1.6))
    image = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0.5, vmax=1.0)
    ax.set_xticks(range(len(sites)), sites, rotation=30)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    for i, r in enumerate(rows):
        for j, s in enumerate(sites):
            if np.isfinite(grid[i, j]):
                unseen = r["trained_without"] == s
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black",
                        fontweight="bold" if unseen else "normal")
    ax.set(title="Test AUROC (bold: the site left out)", xlabel="evaluated at", ylabel="federation trained on")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _png(fig)


def baselines_bars(baselines: dict[str, Any]) -> bytes:
    """Test AUROC per site for the federated model and every baseline, side by side."""
    names = list(baselines)
    sites = sorted_sites({s for b in baselines.values() for s in b["auroc"]})
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * (len(sites) + 1) + 2), 3.6))
    for i, name in enumerate(names):
        values = [baselines[name]["auroc"].get(s) for s in sites] + [baselines[name]["pooled"].get("auroc", {}).get("value")]
        ax.bar(np.arange(len(sites) + 1) + i * width, _values(values), width, label=baselines[name]["label"])
    ax.set_xticks(np.arange(len(sites) + 1) + 0.4 - width / 2, [*sites, "pooled"])
    ax.set(title="Test AUROC: federated vs baselines (same data, same budget)", ylabel="AUROC", ylim=(0.4, 1.0))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def tradeoff(points: list[dict[str, Any]]) -> bytes:
    """Pooled and worst-site test AUROC against the largest site epsilon, one point per run."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    eps = _values([p["max_epsilon"] for p in points])
    ax.scatter(eps, _values([p["pooled_auroc"] for p in points]), label="pooled AUROC")
    ax.scatter(eps, _values([p["worst_site_auroc"] for p in points]), marker="v", label="worst-site AUROC")
    for p, x in zip(points, eps):
        if p["pooled_auroc"] is not None:
            ax.annotate(p["run"], (x, p["pooled_auroc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title="Utility against privacy (0 = no DP)", xlabel="largest site epsilon", ylabel="test AUROC")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
