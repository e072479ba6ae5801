"""End-of-run tables: the study rollup of all committed slices and the errors table.

Both are written at the end of every run, after the slices are published, as new live files of
the run folder (``pdd_batch.runs.live``), so incremental runs never duplicate them: studies cover
every committed slice (only the studies this run changed are rolled up again), errors hold
exactly one row per input file that was not scored, with its stage and reason. Files are named
by ``file_key`` and reasons are stripped of any path (``keys.redact_paths``).
"""

from __future__ import annotations

from pdd_batch.ingest.discovery import Discovery
from pdd_batch.ingest.keys import file_key, redact_paths
from pdd_batch.runs.live import dirty_study_slices, publish_errors, publish_studies
from pdd_batch.runs.manifest import FAILED, LOST, SCORED, SKIPPED
from pdd_batch.runs.outcome import DEFAULT_MIN_ASSESSED, ROLLUP_COLUMNS, study_rows
from pdd_batch.runs.schema import ERRORS_SCHEMA
from pdd_batch.runs.state import RunState
from pdd_batch.runs.writer import rows_to_table

LOST_REASON = "not finished by this run (interrupted or lost); rerun to complete it"


def write_studies(
    state: RunState, *, topk: int, run_id: str, min_assessed: float = DEFAULT_MIN_ASSESSED
) -> int:
    """Roll up again the studies whose slices changed since the last rollup (after
    ``state.publish``; one row per study and model, with its outcome: ``runs.outcome``) and make
    their rows live in ``studies/``; returns the number of studies.

    Only those studies' slices are read (``live.dirty_study_slices``): the cost follows what the
    run changed, not the folder's history.
    """
    slices = dirty_study_slices(state, list(ROLLUP_COLUMNS))
    table = study_rows(slices, topk=topk, run_id=run_id, min_assessed=min_assessed)
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
