"""Decision thresholds from normal images only (no torch).

A slice is flagged when ``score > threshold``. ``threshold_at_fpr`` picks the threshold so that at
most ``fpr`` of the calibration normals would be flagged: with n normals sorted ascending and
k = floor(fpr * n), the threshold is the (n - k)-th smallest score, so exactly the k highest scores
lie above it when scores are distinct.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

FLAG_RULE = "score > threshold"


class CalibrationError(ValueError):
    """Calibration inputs that cannot give a threshold (no scores, NaN, fpr outside (0, 1))."""


def threshold_at_fpr(normal_scores: Sequence[float], fpr: float) -> float:
    """Threshold flagging at most ``fpr`` of ``normal_scores`` under ``score > threshold``.

    Raises:
        CalibrationError: empty or non-finite scores, or fpr not in (0, 1).
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise CalibrationError("calibration needs at least one normal score")
    if not np.isfinite(s).all():
        raise CalibrationError("calibration scores contain NaN or inf")
    if not 0.0 < fpr < 1.0:
        raise CalibrationError(f"fpr must be in (0, 1), got {fpr}")
    k = math.floor(fpr * s.size + 1e-9)  # normals allowed above the threshold
    return float(s[s.size - k - 1])


def calibration_record(
    normal_scores: Sequence[float], fpr: float, *, split: str, data: str
) -> dict[str, Any]:
    """The calibration dict stored in a checkpoint (see docs/architecture.md): a threshold set
    on normal images (``source`` "development set"; a site's studies: ``site_calibration``)."""
    s = np.asarray(normal_scores, dtype=np.float64)
    thr = threshold_at_fpr(s, fpr)
    return {
        "method": "fpr",
        "fpr": float(fpr),
        "threshold": thr,
        "n_normals": int(s.size),
        "split": split,
        "data": data,
        "rule": FLAG_RULE,
        "observed_fpr": float((s > thr).mean()),
        "source": "development set",
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
    }
