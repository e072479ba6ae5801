"""End-of-run tables: the study rollup of all committed slices and the errors table.

Both are written at the end of every run, after the slices are published, as new live files of
the run folder (``pdd_batch.runs.live``), so incremental runs never duplicate them: studies cover
every committed slice (only the studies this run changed are rolled up again), errors hold
exactly one row per input file that was not scored, with its stage and reason. Files are named
by ``file_key`` and reasons are stripped of any path (``keys.redact_paths``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from pdd_batch.ingest.discovery import Discovery
from pdd_batch.ingest.keys import file_key, redact_paths
from pdd_batch.runs.live import dirty_study_slices, publish_errors, publish_studies
from pdd_batch.runs.manifest import FAILED, LOST, SCORED, SKIPPED
from pdd_batch.runs.schema import ERRORS_SCHEMA, STUDIES_SCHEMA
from pdd_batch.runs.state import RunState
from pdd_batch.runs.writer import rows_to_table

LOST_REASON = "not finished by this run (interrupted or lost); rerun to complete it"

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


def study_rows(slices: pa.Table, *, topk: int, run_id: str) -> pa.Table:
    """One ``STUDIES_SCHEMA`` row per study in ``slices`` (needs ``ROLLUP_COLUMNS``).

    Decision: ``"uncalibrated"`` when the model has no threshold; ``"out_of_distribution"`` when
    every slice is beyond the model's in-distribution check; else ``"flagged"`` if any slice is
    flagged (out-of-distribution slices never are), else ``"normal"``.
    """
    if slices.num_rows == 0:
        return STUDIES_SCHEMA.empty_table()
    t = slices.sort_by(
        [("study_key", "ascending"), ("score", "descending"), ("slice_key", "ascending")]
    )
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ROLLUP_COLUMNS}
    studies = cols["study_key"]
    starts = np.flatnonzero(np.r_[True, studies[1:] != studies[:-1]])
    ends = np.r_[starts[1:], len(studies)]
    rows = []
    for a, b in zip(starts, ends, strict=True):
        scores = cols["score"][a:b].astype(np.float64)
        calibrated = any(v is not None and v == v for v in cols["threshold"][a:b])
        n_flagged = int(np.count_nonzero(cols["flagged"][a:b]))
        if not calibrated:
            decision = "uncalibrated"
        elif all(v is not None and bool(v) for v in cols["out_of_distribution"][a:b]):
            decision = "out_of_distribution"
        else:
            decision = "flagged" if n_flagged else "normal"
        modalities = Counter(m for m in cols["modality"][a:b] if m)
        rows.append(
            {
                "study_key": str(studies[a]),
                "n_series": len(set(cols["series_key"][a:b])),
                "n_slices": int(b - a),
                "max_score": float(scores[0]),
                "topk_mean": float(scores[:topk].mean()),
                "n_flagged": n_flagged,
                "decision": decision,
                "top_slice_key": str(cols["slice_key"][a]),
                "modality": modalities.most_common(1)[0][0] if modalities else None,
                "model_id": str(cols["model_id"][a]),
                "checkpoint_hash": str(cols["checkpoint_hash"][a]),
                "run_id": run_id,
            }
        )
    return rows_to_table(rows, STUDIES_SCHEMA)


def write_studies(state: RunState, *, topk: int, run_id: str) -> int:
    """Roll up again the studies whose slices changed since the last rollup (after
    ``state.publish``) and make their rows live in ``studies/``; returns the number of studies.

    Only those studies' slices are read (``live.dirty_study_slices``): the cost follows what the
    run changed, not the folder's history.
    """
    slices = dirty_study_slices(state, list(ROLLUP_COLUMNS))
    table = study_rows(slices, topk=topk, run_id=run_id)
    return publish_studies(state, table, run_id)


def error_rows(
    disc: Discovery,
    state: RunState,
    failed: dict[str, str],
    outcomes: dict[str, str],
    *,
    run_id: str,
) -> list[dict]:
    """One row per input file whose outcome is not ``scored`` (named by its ``file_key``).

    ``state`` records dropped files by key; every reason is stripped of the file's path and of
    the paths of the series it belongs to.
    """
    discovered = {f.path: f for f in disc.files}
    read_failure: dict[str, tuple[str, str]] = {}
    dropped: dict[str, tuple[str, str]] = {}  # by file key
    series_files: dict[str, tuple[str, ...]] = {}
    for ref in disc.series:
        if ref.series_key in failed:
            for path in ref.files:
                read_failure.setdefault(path, (ref.series_key, failed[ref.series_key]))
                series_files.setdefault(path, ref.files)
        rec = state.series.get(ref.series_key)
        if rec is not None:
            for key, reason in rec.dropped:
                dropped.setdefault(key, (ref.series_key, reason))
    rows = []
    for path, outcome in sorted(outcomes.items()):
        if outcome == SCORED:
            continue
        rec, fkey = discovered.get(path), file_key(path)
        if rec is not None and rec.status in ("skipped", "failed"):
            row = (rec.series_key, "discover", rec.status, rec.reason or rec.status)
        elif outcome in (SKIPPED, FAILED) and fkey in dropped:
            stage = "read" if outcome == FAILED else "slice"
            row = (dropped[fkey][0], stage, outcome, dropped[fkey][1])
        elif outcome == LOST:
            row = (rec.series_key if rec else None, "score", "failed", LOST_REASON)
        elif path in read_failure:
            row = (read_failure[path][0], "read", "failed", read_failure[path][1])
        else:
            row = (rec.series_key if rec else None, "score", outcome, outcome)
        key, stage, status, reason = row
        reason = redact_paths(reason, (path, *series_files.get(path, ())))
        rows.append(
            {
                "file_key": fkey,
                "series_key": key,
                "stage": stage,
                "status": status,
                "reason": reason,
                "run_id": run_id,
            }
        )
    return rows


def write_errors(
    state: RunState,
    disc: Discovery,
    failed: dict[str, str],
    outcomes: dict[str, str],
    *,
    run_id: str,
) -> int:
    """Rewrite ``errors/`` for this run; returns the number of rows."""
    rows = error_rows(disc, state, failed, outcomes, run_id=run_id)
    table = rows_to_table(rows, ERRORS_SCHEMA) if rows else ERRORS_SCHEMA.empty_table()
    return publish_errors(state, table, run_id)
