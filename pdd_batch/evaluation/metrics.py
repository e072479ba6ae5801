"""Anomaly-detection metrics (scikit-learn; no torch): image AUROC/AP/F1-max, pixel AUROC, AUPRO.

Labels: 1 = anomalous (positive), 0 = normal. Higher scores mean "more anomalous". All metrics are
fractions in [0, 1]. scikit-learn is imported in the functions: ``sklearn.metrics`` imports rich,
which ``pdd_batch`` outside ``cli/`` must not load at import time (DESIGN.md import table).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


class MetricError(ValueError):
    """Inputs a metric cannot be computed on (shape mismatch, a single class, NaN scores)."""


def _check(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise MetricError(f"{what}: {labels.size} labels but {scores.size} scores")
    if not np.isfinite(scores).all():
        raise MetricError(f"{what}: scores contain NaN or inf")
    if set(np.unique(labels)) != {0, 1}:
        raise MetricError(f"{what}: needs both normal (0) and anomalous (1) labels")
    return labels, scores


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Maximum of 2PR/(P+R) over the precision-recall curve."""
    from sklearn.metrics import precision_recall_curve

    y, s = _check(np.asarray(labels), np.asarray(scores), "f1_max")
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def image_metrics(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """Image-level ``auroc``, ``ap`` (average precision) and ``f1_max``."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = _check(np.asarray(labels), np.asarray(scores), "image metrics")
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "f1_max": f1_max(y, s),
    }


def _auroc_by_ranks(anomalous: np.ndarray, normal: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann–Whitney AUROC (ties count ½) along ``axis``, for every other (resample) index at once:
    (rank sum of the anomalous scores − n1(n1 + 1)/2) / (n1 · n0), O(n log n) per resample."""
    from scipy.stats import rankdata

    a = np.moveaxis(np.asarray(anomalous, dtype=np.float64), axis, -1)  # (..., n1)
    n = np.moveaxis(np.asarray(normal, dtype=np.float64), axis, -1)  # (..., n0)
    n1, n0 = a.shape[-1], n.shape[-1]
    ranks = rankdata(np.concatenate([a, n], axis=-1), axis=-1)  # (..., n1 + n0), ties averaged
    return (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auroc_ci(
    labels: Sequence[int], scores: Sequence[float], level: float = 0.95, n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the image AUROC (scipy.stats.bootstrap), resampling the
    normal and the anomalous images separately so each resample keeps the class counts.

    With few normals (HeadCT's test has 30) this interval is wide; it says how far another draw
    of test images of the same size could move the AUROC. Seeded: the same inputs give the same
    interval.
    """
    from scipy.stats import bootstrap

    y, s = _check(np.asarray(labels), np.asarray(scores), "AUROC interval")
    per_batch = max(1, int(2e7 // y.size))  # ≤ 20 M scores per vectorised call
    res = bootstrap(
        (s[y == 1], s[y == 0]), _auroc_by_ranks, vectorized=True, n_resamples=n_resamples,
        batch=per_batch, confidence_level=level, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def floor_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """AUROC of a trivial score in its better direction (max(a, 1 - a)): a generous floor."""
    from sklearn.metrics import roc_auc_score

    y, s = _check(np.asarray(labels), np.asarray(scores), "floor")
    a = float(roc_auc_score(y, s))
    return max(a, 1.0 - a)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel AUROC over all pixels of all images; masks (N, H, W) non-zero = anomalous."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise MetricError(f"pixel AUROC: masks {masks.shape} vs maps {maps.shape}")
    from sklearn.metrics import roc_auc_score

    y, s = _check((masks > 0).astype(np.int64), maps, "pixel AUROC")
    return float(roc_auc_score(y, s))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Dataset-level area under the per-region-overlap curve up to ``fpr_limit``, scaled to [0, 1].

    As in the MVTec AD evaluation: each connected ground-truth region (8-connectivity) of every
    image counts equally; PRO(t) is the mean over regions of the fraction of the region above
    threshold t, FPR(t) the fraction of all normal pixels above t. The PRO-vs-FPR curve is
    integrated (trapezoid) from 0 to ``fpr_limit`` and divided by ``fpr_limit``.

    Args:
        masks: (N, H, W) ground truth, non-zero = anomalous.
        maps: (N, H, W) anomaly maps.
        fpr_limit: upper FPR bound of the integration (0.3 by convention).
    """
    masks, maps = np.asarray(masks) > 0, np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise MetricError(f"AUPRO: masks {masks.shape} vs maps {maps.shape}, need (N, H, W) both")
    if not 0 < fpr_limit <= 1:
        raise MetricError(f"AUPRO: fpr_limit must be in (0, 1], got {fpr_limit}")
    weights = np.zeros(maps.shape, dtype=np.float64)  # PRO contribution of each anomalous pixel
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=structure)
        for k in range(1, n + 1):
            region = lab == k
            regions.append((i, region))
        n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise MetricError("AUPRO: needs at least one anomalous region and one normal pixel")
    for i, region in regions:
        weights[i][region] = 1.0 / (region.sum() * n_regions)
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    fpr = np.cumsum((~masks).ravel()[order] / n_normal)
    pro = np.cumsum(weights.ravel()[order])
    # Keep the last point of each run of equal scores: one point per threshold.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    return _partial_area(fpr, pro, fpr_limit) / fpr_limit


def _partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) on [0, x_max], interpolating y at x_max (x non-decreasing)."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max:
        j = int(np.searchsorted(x, x_max, side="right"))
        if j < len(x):
            y_end = ys[-1] + (y[j] - ys[-1]) * (x_max - xs[-1]) / (x[j] - xs[-1])
        else:
            y_end = ys[-1]
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_end]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
