"""The study outcome: one meaning for the summary, studies.parquet, report, export, SR and KOS.

A study is rolled up per model that scored it (one ``STUDIES_SCHEMA`` row per study and model):

- ``flagged``: at least one in-distribution slice is above the model's threshold;
- ``normal``: none is, and at least ``min_assessed`` of its slices (a share, default 0.5,
  ``pdd-batch screen --min-assessed``) were assessed, i.e. within the model's in-distribution
  check (slices of a model without a check count as assessed);
- ``not_assessed``: neither can be said, with its reason (the model has no threshold, or too
  many slices are out of distribution: ``k/n``).

A study is never ``normal`` unless the stated share of its slices was assessed. The review
queue is the flagged studies, then the not-assessed ones, each by ``max_score``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pdd_batch.runs.schema import STUDIES_SCHEMA
from pdd_batch.runs.writer import rows_to_table

FLAGGED, NORMAL, NOT_ASSESSED = "flagged", "normal", "not_assessed"
OUTCOMES = (FLAGGED, NORMAL, NOT_ASSESSED)
REVIEW_QUEUE = (FLAGGED, NOT_ASSESSED)  # in this order
DEFAULT_MIN_ASSESSED = 0.5
UNCALIBRATED_REASON = "model not calibrated (no threshold)"

# Decisions written by schema 2.0 runs, as outcomes (their reason is rebuilt from the slices).
LEGACY_DECISIONS = {"uncalibrated": NOT_ASSESSED, "out_of_distribution": NOT_ASSESSED}

ROLLUP_COLUMNS = (
    "study_key",
    "series_key",
    "slice_key",
    "score",
    "flagged",
    "threshold",
    "modality",
    "model_id",
    "checkpoint_hash",
    "out_of_distribution",
)


@dataclass(frozen=True)
class Outcome:
    """A study's outcome for one model.

    Attributes:
        decision: ``flagged`` | ``normal`` | ``not_assessed``.
        reason: why it is ``not_assessed`` (None otherwise).
        n_assessed: slices within the model's in-distribution check.
        n_out_of_distribution: slices beyond it (never flagged).
    """

    decision: str
    reason: str | None
    n_assessed: int
    n_out_of_distribution: int


def check_min_assessed(value: float) -> float:
    """``value`` when it is a share in (0, 1], else ``ValueError``."""
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"min_assessed must be a share in (0, 1], got {value}")
    return float(value)


def ood_reason(n_ood: int, n_slices: int, min_assessed: float) -> str:
    """The reason of a study with too few assessed slices."""
    return (
        f"{n_ood}/{n_slices} slices out of distribution "
        f"(at least {min_assessed:.0%} must be assessed)"
    )


def study_outcome(
    n_slices: int, n_flagged: int, n_ood: int, *, calibrated: bool, min_assessed: float
) -> Outcome:
    """The outcome of one study for one model (see the module docstring)."""
    n_assessed = n_slices - n_ood
    if not calibrated:
        return Outcome(NOT_ASSESSED, UNCALIBRATED_REASON, n_assessed, n_ood)
    if n_flagged:
        return Outcome(FLAGGED, None, n_assessed, n_ood)
    if n_assessed > 0 and n_assessed >= min_assessed * n_slices:
        return Outcome(NORMAL, None, n_assessed, n_ood)
    return Outcome(NOT_ASSESSED, ood_reason(n_ood, n_slices, min_assessed), n_assessed, n_ood)


def _groups(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices of runs of equal ``keys`` rows (rows sorted by them)."""
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    return starts, np.r_[starts[1:], len(keys[0])]


def study_rows(
    slices: pa.Table,
    *,
    topk: int,
    run_id: str,
    min_assessed: float = DEFAULT_MIN_ASSESSED,
) -> pa.Table:
    """One ``STUDIES_SCHEMA`` row per study and model in ``slices`` (needs ``ROLLUP_COLUMNS``;
    ``out_of_distribution`` null: the model has no check, the slice counts as assessed)."""
    if slices.num_rows == 0:
        return STUDIES_SCHEMA.empty_table()
    t = slices.sort_by(
        [
            ("study_key", "ascending"),
            ("model_id", "ascending"),
            ("score", "descending"),
            ("slice_key", "ascending"),
        ]
    )
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ROLLUP_COLUMNS}
    starts, ends = _groups([cols["study_key"], cols["model_id"]])
    rows = []
    for a, b in zip(starts, ends, strict=True):
        scores = cols["score"][a:b].astype(np.float64)
        thresholds = [float(v) for v in cols["threshold"][a:b] if v is not None and v == v]
        n_ood = sum(v is not None and bool(v) for v in cols["out_of_distribution"][a:b])
        n_flagged = int(np.count_nonzero(cols["flagged"][a:b]))
        outcome = study_outcome(
            int(b - a), n_flagged, n_ood, calibrated=bool(thresholds), min_assessed=min_assessed
        )
        modalities = Counter(m for m in cols["modality"][a:b] if m)
        rows.append(
            {
                "study_key": str(cols["study_key"][a]),
                "n_series": len(set(cols["series_key"][a:b])),
                "n_slices": int(b - a),
                "max_score": float(scores[0]),
                "topk_mean": float(scores[:topk].mean()),
                "n_flagged": n_flagged,
                "decision": outcome.decision,
                "reason": outcome.reason,
                "n_assessed": outcome.n_assessed,
                "n_out_of_distribution": outcome.n_out_of_distribution,
                "threshold": thresholds[0] if thresholds else None,
                "top_slice_key": str(cols["slice_key"][a]),
                "modality": modalities.most_common(1)[0][0] if modalities else None,
                "model_id": str(cols["model_id"][a]),
                "checkpoint_hash": str(cols["checkpoint_hash"][a]),
                "run_id": run_id,
            }
        )
    return rows_to_table(rows, STUDIES_SCHEMA)


def _ood_counts(slices: pa.Table) -> dict[tuple[str, str], tuple[int, int, float | None]]:
    """(study, model) -> (slices, out-of-distribution slices, threshold) of a run's slices."""
    out: dict[tuple[str, str], list] = {}
    names = slices.column_names
    ood = slices.column("out_of_distribution").to_pylist() if "out_of_distribution" in names else []
    thr = slices.column("threshold").to_pylist()
    studies, models = slices.column("study_key").to_pylist(), slices.column("model_id").to_pylist()
    for i, key in enumerate(zip(studies, models, strict=True)):
        entry = out.setdefault(key, [0, 0, None])
        entry[0] += 1
        entry[1] += bool(ood[i]) if ood else 0
        if entry[2] is None and thr[i] is not None:
            entry[2] = float(thr[i])
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def upgrade_studies(studies: pa.Table, slices: pa.Table, min_assessed: float) -> pa.Table:
    """Studies written before the outcome (schema 2.0), with today's outcome: decision, reason,
    assessed and out-of-distribution counts, threshold (from the run's slices). A 2.0 ``normal``
    study with too few assessed slices becomes ``not_assessed``. ``studies`` must already have
    the current columns (null where the old file had none)."""
    counts = _ood_counts(slices)
    rows = studies.to_pylist()
    for r in rows:
        n, n_ood, threshold = counts.get(
            (r["study_key"], r["model_id"]), (r["n_slices"], 0, r.get("threshold"))
        )
        outcome = study_outcome(
            n, r["n_flagged"], n_ood, calibrated=threshold is not None, min_assessed=min_assessed
        )
        r.update(
            decision=outcome.decision,
            reason=outcome.reason,
            n_assessed=outcome.n_assessed,
            n_out_of_distribution=outcome.n_out_of_distribution,
            threshold=threshold,
        )
    return pa.Table.from_pylist(rows, schema=studies.schema)


def review_order(decisions: list[str]) -> list[int]:
    """Rank of each decision in the review queue (flagged 0, not assessed 1, normal 2)."""
    rank = {d: i for i, d in enumerate((*REVIEW_QUEUE, NORMAL))}
    return [rank.get(d, len(rank)) for d in decisions]
