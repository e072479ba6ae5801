"""Evaluation figure (matplotlib Agg, no torch): ROC curve, score histograms, top anomaly maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def evaluation_figure(
    out_png: Path,
    labels: Sequence[int],
    scores: Sequence[float],
    *,
    images: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    image_index: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    threshold: float | None = None,
    n_top: int = 8,
) -> Path:
    """Write one PNG: ROC, per-class score histograms and a grid of the highest-scoring maps.

    Args:
        out_png: file to write.
        labels: (N,) 0 normal, 1 anomalous.
        scores: (N,) image scores.
        images: (K, S, S) model inputs in [0, 1], or None to skip the grid.
        maps: (K, S, S) anomaly maps matching ``images``.
        image_index: (K,) index into ``scores`` of each row of ``images``; None when K = N.
        names: (K,) short labels of the rows of ``images``.
        title: figure title (metrics, model id).
        threshold: calibrated threshold drawn on the histogram, if any.
        n_top: number of top-scoring images in the grid.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    show_grid = images is not None and maps is not None and len(images) > 0
    n_top = min(n_top, len(images)) if show_grid else 0
    index = np.arange(len(s)) if image_index is None else np.asarray(image_index, dtype=int)
    ncols = max(4, (n_top + 1) // 2)
    rows = 1 + (2 if n_top else 0)
    fig = plt.figure(figsize=(3.2 * ncols, 3.2 * rows))
    grid = fig.add_gridspec(rows, ncols)
    _draw_roc(fig.add_subplot(grid[0, : ncols // 2]), y, s)
    _draw_histograms(fig.add_subplot(grid[0, ncols // 2 :]), y, s, threshold)
    if n_top:
        _draw_top_maps(fig, grid, images, maps, index, s, y, names, n_top, ncols)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _draw_roc(ax: plt.Axes, y: np.ndarray, s: np.ndarray) -> None:
    """ROC curve of scores ``s`` (N,) against labels ``y`` (N,), with the chance diagonal."""
    from sklearn.metrics import roc_curve  # imports rich: keep it out of module import

    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")


def _draw_histograms(ax: plt.Axes, y: np.ndarray, s: np.ndarray, threshold: float | None) -> None:
    """Score histograms per class on shared bins, with the calibrated threshold if any."""
    bins = np.linspace(s.min(), s.max(), 30) if len(s) else 10
    for lab, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        if (y == lab).any():
            ax.hist(s[y == lab], bins=bins, alpha=0.6, label=name, color=colour)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label="threshold")
    ax.set(xlabel="image score", ylabel="images", title="scores per class")
    ax.legend()


def _draw_top_maps(fig, grid, images, maps, index, s, y, names, n_top, ncols) -> None:  # noqa: ANN001
    vmax = float(np.max(maps))
    vmin = float(np.min(maps))
    for rank, row in enumerate(np.argsort(-s[index], kind="stable")[:n_top]):
        idx = index[row]
        ax = fig.add_subplot(grid[1 + rank // ncols, rank % ncols])
        ax.imshow(images[row], cmap="gray", vmin=0, vmax=1)
        ax.imshow(maps[row], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        tag = "anomalous" if y[idx] == 1 else "normal"
        name = names[row] if names is not None else f"#{idx}"
        ax.set_title(f"{name}\n{tag} {s[idx]:.3f}", fontsize=8)
        ax.axis("off")
