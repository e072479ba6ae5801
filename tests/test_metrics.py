"""Metrics against hand-computed cases, AUPRO on constructed masks, calibration quantiles."""

from __future__ import annotations

import numpy as np
import pytest

from pdd_batch.evaluation.calibration import CalibrationError, calibration_record, threshold_at_fpr
from pdd_batch.evaluation.metrics import (
    MetricError,
    _auroc_by_ranks,
    aupro,
    auroc_ci,
    f1_max,
    floor_auroc,
    image_metrics,
    pixel_auroc,
)


def test_image_metrics_hand_computed() -> None:
    # Positives 0.9, 0.4; negatives 0.5, 0.1. Pairs ranked right: (0.9>0.5, 0.9>0.1, 0.4>0.1) = 3/4.
    m = image_metrics([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1])
    assert m["auroc"] == pytest.approx(0.75)
    # AP: ranks 0.9(P) 0.5(N) 0.4(P) 0.1(N): precision at the positives 1 and 2/3 -> (1 + 2/3)/2.
    assert m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    # F1 at threshold 0.4: P = 2/3, R = 1 -> 0.8; at 0.9: P = 1, R = 1/2 -> 2/3.
    assert m["f1_max"] == pytest.approx(0.8)


def test_perfect_and_inverted_scores() -> None:
    y = [0, 0, 0, 1, 1]
    assert image_metrics(y, [1, 2, 3, 4, 5]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    assert image_metrics(y, [5, 4, 3, 2, 1])["auroc"] == 0.0
    assert floor_auroc(y, [5, 4, 3, 2, 1]) == 1.0
    assert f1_max(y, [0.5] * 5) == pytest.approx(2 * 0.4 / 1.4)  # all flagged: P=0.4, R=1


def test_rank_auroc_equals_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(25)]
    s = rng.integers(0, 6, size=y.size).astype(float) + y  # many ties
    got = _auroc_by_ranks(s[y == 1], s[y == 0])
    assert got == pytest.approx(roc_auc_score(y, s))
    stacked = _auroc_by_ranks(np.stack([s[y == 1], -s[y == 1]]), np.stack([s[y == 0], s[y == 0]]))
    assert stacked == pytest.approx([roc_auc_score(y, s), roc_auc_score(y, np.where(y, -s, s))])


def test_auroc_interval_is_seeded_contains_the_estimate_and_shrinks_with_data() -> None:
    rng = np.random.default_rng(1)

    def sample(n_normal: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.r_[np.zeros(n_normal), np.ones(100)]
        return y, np.r_[rng.normal(0, 1, n_normal), rng.normal(1.5, 1, 100)]

    y, s = sample(30)
    lo, hi = auroc_ci(y, s)
    assert lo < image_metrics(y, s)["auroc"] < hi
    assert auroc_ci(y, s) == (lo, hi)  # seeded
    assert auroc_ci(y, s, seed=1) != (lo, hi)
    y_big, s_big = sample(1000)
    lo_big, hi_big = auroc_ci(y_big, s_big)
    assert hi_big - lo_big < 0.8 * (hi - lo)  # ~30 → ~1000 normals: a clearly narrower interval
    assert auroc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)  # separated in every resample
    with pytest.raises(MetricError, match="both"):
        auroc_ci([0, 0], [0.1, 0.2])


def test_metric_errors() -> None:
    with pytest.raises(MetricError, match="both"):
        image_metrics([0, 0], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN"):
        image_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(MetricError, match="labels"):
        image_metrics([0, 1, 1], [0.1, 0.2])


def test_pixel_auroc_hand_computed() -> None:
    masks = np.array([[[0, 1], [0, 0]]])
    maps = np.array([[[0.1, 0.5], [0.7, 0.2]]])
    # One positive (0.5) against negatives 0.1, 0.7, 0.2: above two of three.
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_aupro_perfect_and_constructed_case() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1  # region A: 4 px
    masks[1, 4:8, 4:8] = 1  # region B: 16 px
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # Map: region A scores 2, region B scores 0 like the background, except a 1 on half of B.
    # Thresholds: above 1 -> FPR 0, PRO 0.5 (A covered); above 0 -> FPR 0, PRO 0.75;
    # everything -> FPR 1, PRO 1. Curve (0,0) -> (0,0.5) -> (0,0.75) -> (1,1); on [0, 0.3]
    # PRO rises linearly from 0.75 to 0.825: area = 0.3 * (0.75 + 0.825) / 2; normalised / 0.3.
    maps = np.zeros((2, 8, 8))
    maps[0, 1:3, 1:3] = 2.0
    maps[1, 4:6, 4:8] = 1.0
    assert aupro(masks, maps) == pytest.approx((0.75 + 0.825) / 2)
    # Constant maps give the diagonal: mean PRO over [0, 0.3] of PRO = FPR is 0.15.
    assert aupro(masks, np.zeros((2, 8, 8))) == pytest.approx(0.15)


def test_aupro_needs_regions() -> None:
    with pytest.raises(MetricError, match="region"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


def test_threshold_picks_the_right_quantile() -> None:
    scores = np.arange(1, 101, dtype=float)  # 100 distinct normals
    thr = threshold_at_fpr(scores, 0.05)
    assert thr == 95.0 and (scores > thr).sum() == 5
    assert threshold_at_fpr(scores, 0.01) == 99.0
    # 10 normals at fpr 0.05: floor(0.5) = 0 may be above -> the maximum.
    assert threshold_at_fpr([3, 1, 2, 9, 4, 5, 6, 7, 8, 0], 0.05) == 9.0
    assert threshold_at_fpr([3, 1, 2, 9, 4, 5, 6, 7, 8, 0], 0.2) == 7.0
    rng = np.random.default_rng(0)
    s = rng.normal(size=1000)
    for fpr in (0.01, 0.05, 0.1, 0.3):
        assert (s > threshold_at_fpr(s, fpr)).mean() == pytest.approx(fpr)


def test_calibration_record_and_errors() -> None:
    rec = calibration_record([0.1, 0.2, 0.3, 0.4], 0.25, split="val", data="headct")
    assert rec["method"] == "fpr" and rec["threshold"] == 0.3 and rec["n_normals"] == 4
    assert rec["observed_fpr"] == 0.25 and rec["split"] == "val"
    with pytest.raises(CalibrationError):
        threshold_at_fpr([], 0.05)
    with pytest.raises(CalibrationError, match="fpr"):
        threshold_at_fpr([1.0], 1.5)
