"""Site calibration with a held-out share of studies (no torch).

A site's normal studies are split BY STUDY into calibration studies and held-out studies (seeded).
The threshold is set on the calibration studies' in-distribution slices at the target slice FPR
(``calibration.threshold_at_fpr``); the held-out studies then say what that threshold does on
studies it has never seen:

* per study: a held-out study is a false positive when any of its in-distribution slices is
  flagged (``score > threshold``) - what a reviewer sees as a flagged normal study;
* per slice: flagged in-distribution slices / in-distribution slices of the held-out studies.

Each comes with a percentile bootstrap interval that resamples held-out studies (slices of one
study are not independent, so slices are never resampled alone). The interval covers the
sampling of the held-out studies for the fixed threshold, not the threshold's own variation.

Slices outside the model's training distribution (the in-distribution check) are never flagged by
a screen, so they take no part here; a study with none in distribution is counted, not assessed.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdd_batch.evaluation.calibration import FLAG_RULE, CalibrationError, threshold_at_fpr

SOURCE_SITE = "site"
SOURCE_DEVELOPMENT = "development set"
SOURCE_NONE = "uncalibrated"
DEFAULT_HOLDOUT = 0.3
DEFAULT_BOOTSTRAP = 2000
CI_LEVEL = 0.95


@dataclass(frozen=True)
class StudySplit:
    """Study keys on each side of the split (disjoint, each sorted)."""

    calibration: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class SiteSlices:
    """The scored slices of a site's normal studies, one entry per slice.

    Attributes:
        study_keys: keyed study key of each slice (N,).
        scores: anomaly score of each slice (N,).
        in_distribution: False where the in-distribution check refused the slice (N,).
    """

    study_keys: np.ndarray  # (N,) str
    scores: np.ndarray  # (N,) float64
    in_distribution: np.ndarray  # (N,) bool

    @classmethod
    def of(
        cls,
        study_keys: Sequence[str],
        scores: Sequence[float],
        out_of_distribution: Sequence[bool | None] | None = None,
    ) -> SiteSlices:
        """From columns as a screen writes them (``out_of_distribution`` None: no check)."""
        n = len(study_keys)
        ood = [False] * n if out_of_distribution is None else out_of_distribution
        if not len(scores) == len(ood) == n:
            raise CalibrationError("study keys, scores and out-of-distribution differ in length")
        return cls(
            np.asarray(study_keys, dtype=str),
            np.asarray(scores, dtype=np.float64),
            np.array([not bool(v) for v in ood], dtype=bool),
        )


def split_studies(study_keys: Sequence[str], holdout: float, seed: int) -> StudySplit:
    """Seeded split of the distinct study keys: ``round(holdout * n)`` held out (at least one
    on each side when ``holdout`` > 0).

    Raises:
        CalibrationError: ``holdout`` outside [0, 1), or too few studies for both sides.
    """
    if not 0.0 <= holdout < 1.0:
        raise CalibrationError(f"holdout must be in [0, 1), got {holdout}")
    keys = sorted(set(study_keys))
    if not keys:
        raise CalibrationError("no study to calibrate on")
    n_held = 0 if holdout == 0 else max(1, int(math.floor(holdout * len(keys) + 0.5)))
    if len(keys) - n_held < 1:
        raise CalibrationError(
            f"{len(keys)} studies: a held-out share needs at least 2 (one to calibrate on, one "
            "held out); give more normal studies or --holdout 0"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in order[:n_held]}
    return StudySplit(tuple(k for k in keys if k not in held), tuple(k for k in keys if k in held))


def heldout_rates(
    slices: SiteSlices, heldout: Sequence[str], threshold: float, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """False-positive rates of ``score > threshold`` on the held-out studies, with intervals.

    Returns:
        ``n_studies``, ``n_slices`` (in distribution), ``n_not_assessed`` (studies with no
        in-distribution slice), ``study_fpr``/``slice_fpr`` and their ``*_ci95`` ([low, high],
        percentile bootstrap over studies), ``n_flagged_studies``, ``n_flagged_slices``,
        ``n_bootstrap``.
    """
    use = np.isin(slices.study_keys, list(heldout)) & slices.in_distribution
    assessed = sorted(set(slices.study_keys[use].tolist()))
    n_not_assessed = len(set(heldout)) - len(assessed)
    if not assessed:
        raise CalibrationError("no held-out study has a slice in distribution")
    index = {k: i for i, k in enumerate(assessed)}
    study = np.array([index[k] for k in slices.study_keys[use]])  # (M,) study of each slice
    flagged = slices.scores[use] > threshold  # (M,)
    n_slices = np.bincount(study, minlength=len(assessed))  # (S,)
    n_flag = np.bincount(study, weights=flagged, minlength=len(assessed))  # (S,)
    study_fp = n_flag > 0  # (S,)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(assessed), size=(n_boot, len(assessed)))  # (B, S) studies
    boot_study = study_fp[draw].mean(axis=1)  # (B,)
    boot_slice = n_flag[draw].sum(axis=1) / n_slices[draw].sum(axis=1)  # (B,)
    tail = 100 * (1 - CI_LEVEL) / 2
    return {
        "n_studies": len(assessed),
        "n_slices": int(n_slices.sum()),
        "n_not_assessed": n_not_assessed,
        "n_flagged_studies": int(study_fp.sum()),
        "n_flagged_slices": int(n_flag.sum()),
        "study_fpr": float(study_fp.mean()),
        "study_fpr_ci95": [float(v) for v in np.percentile(boot_study, [tail, 100 - tail])],
        "slice_fpr": float(n_flag.sum() / n_slices.sum()),
        "slice_fpr_ci95": [float(v) for v in np.percentile(boot_slice, [tail, 100 - tail])],
        "n_bootstrap": int(n_boot),
    }


def site_calibration_record(
    slices: SiteSlices,
    fpr: float,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    n_boot: int = DEFAULT_BOOTSTRAP,
    data: str = "",
) -> tuple[dict[str, Any], StudySplit]:
    """The checkpoint's calibration block from a site's scored normal studies, and the split.

    The block keeps the keys of an image-folder calibration (``threshold``, ``fpr``,
    ``n_normals`` = calibration slices, ``rule``, ...) and adds ``source`` = "site", ``date``
    and ``site``: studies and slices on each side, the held-out figures (``heldout``; None with
    ``holdout`` = 0) and the held-out study keys (keyed digests, for audit).

    Raises:
        CalibrationError: no slice in distribution among the calibration studies, too few
            studies for the split, or bad ``fpr``/``holdout``.
    """
    split = split_studies(slices.study_keys.tolist(), holdout, seed)
    calib = np.isin(slices.study_keys, list(split.calibration)) & slices.in_distribution
    if not calib.any():
        raise CalibrationError("no calibration study has a slice in distribution")
    scores = slices.scores[calib]
    threshold = threshold_at_fpr(scores, fpr)
    held = None
    if split.heldout:
        held = heldout_rates(slices, split.heldout, threshold, n_boot=n_boot, seed=seed)
    record = {
        "method": "fpr",
        "fpr": float(fpr),
        "threshold": threshold,
        "n_normals": int(scores.size),
        "split": "site calibration studies",
        "data": data,
        "rule": FLAG_RULE,
        "observed_fpr": float((scores > threshold).mean()),
        "source": SOURCE_SITE,
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "site": {
            "n_studies": len(split.calibration) + len(split.heldout),
            "n_slices": int(slices.scores.size),
            "n_out_of_distribution": int((~slices.in_distribution).sum()),
            "calibration_studies": len(split.calibration),
            "calibration_slices": int(scores.size),
            "holdout": float(holdout),
            "seed": int(seed),
            "heldout": held,
            "heldout_study_keys": list(split.heldout),
        },
    }
    return record, split


def threshold_source(calibration: dict[str, Any] | None) -> str:
    """Where a checkpoint's threshold came from: "site", "development set" (every calibration
    that does not say "site", older checkpoints included), or "uncalibrated"."""
    if not calibration or calibration.get("threshold") is None:
        return SOURCE_NONE
    return SOURCE_SITE if calibration.get("source") == SOURCE_SITE else SOURCE_DEVELOPMENT


def describe_threshold(calibration: dict[str, Any] | None) -> str:
    """One line on a checkpoint's threshold and its provenance (doctor, calibrate)."""
    source = threshold_source(calibration)
    if source == SOURCE_NONE or calibration is None:
        return "no threshold (uncalibrated)"
    head = f"threshold {float(calibration['threshold']):.6g} at FPR {calibration.get('fpr')}"
    date = f", {calibration['date']}" if calibration.get("date") else ""
    if source == SOURCE_DEVELOPMENT:
        return f"{head} from the development set ({calibration.get('n_normals')} normals{date})"
    site = calibration.get("site") or {}
    text = (
        f"{head} from site data ({site.get('calibration_studies')} studies, "
        f"{site.get('calibration_slices')} slices{date})"
    )
    held = site.get("heldout")
    if held:
        text += "; held out: " + heldout_line(held)
    return text


def heldout_line(held: dict[str, Any]) -> str:
    """The held-out figures in one line."""
    s_lo, s_hi = held["study_fpr_ci95"]
    l_lo, l_hi = held["slice_fpr_ci95"]
    return (
        f"{held['n_flagged_studies']}/{held['n_studies']} studies flagged, study FPR "
        f"{held['study_fpr']:.3f} (95% CI {s_lo:.3f}-{s_hi:.3f}); slice FPR "
        f"{held['slice_fpr']:.4f} (95% CI {l_lo:.4f}-{l_hi:.4f}, {held['n_slices']} slices)"
    )
