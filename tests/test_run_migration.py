"""A run folder written by the earlier version (``_state/state.json``, one merged
``slices/slices.parquet`` with the heatmaps, an unpublished part in the store) is read as it is,
then migrated into the run store once: no row lost or duplicated, every series still done,
the heatmaps still joined to their slices."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from legacy_state_v2 import RunState as OldRunState
from legacy_state_v2 import SeriesRecord as OldRecord

from pdd_batch.runs.results import open_run, read_table
from pdd_batch.runs.schema import SLICES_SCHEMA
from pdd_batch.runs.state import RunState
from pdd_batch.runs.tables import ROLLUP_COLUMNS, study_rows
from pdd_batch.runs.writer import rows_to_table, write_table_atomic


def _rows(series: str, study: str, n: int) -> list[dict]:
    return [
        {"slice_key": f"{series}:0:{i}", "study_key": study, "series_key": series,
         "volume_index": 0, "slice_index": i, "file_key": f"f-{series}-{i}",
         "score": float(i), "threshold": 1.5, "flagged": i > 1.5,
         "heatmap_png": f"png-{series}-{i}".encode(), "heatmap_max": 1.0, "model_id": "m",
         "checkpoint_hash": "h1", "preprocessing": "{}", "run_id": "old", "code_version": "0"}
        for i in range(n)
    ]  # fmt: skip


def _old_commit(state: OldRunState, part: str, series: dict[str, tuple[str, int]]) -> None:
    rows = [r for k, (st, n) in series.items() for r in _rows(k, st, n)]
    write_table_atomic(rows_to_table(rows, SLICES_SCHEMA), state.store_dir / part)
    recs = {k: OldRecord(part, n, f"fp-{k}", st) for k, (st, n) in series.items()}
    state.commit_part(part, recs)


def _old_folder(out: Path) -> None:
    """Written with the earlier code: a published run, then a killed one's committed part."""
    state = OldRunState.load(out)
    state.bind_model("h1", "m", force=False)
    state.bind_threshold(1.5)
    _old_commit(state, "part-a.parquet", {"s1": ("st1", 3), "s2": ("st1", 2)})
    _old_commit(state, "part-b.parquet", {"s3": ("st2", 4)})
    state.publish("old")
    published = pq.read_table(state.published_path, columns=list(ROLLUP_COLUMNS[:-1]))
    studies = study_rows(published.append_column(
        "out_of_distribution", pq.read_table(state.published_path)["ood_distance"].is_null()
    ).select(list(ROLLUP_COLUMNS)), topk=5, run_id="old")  # fmt: skip
    write_table_atomic(studies, out / "studies" / "studies.parquet")
    _old_commit(state, "part-c.parquet", {"s4": ("st3", 2), "s3": ("st2", 5)})  # s3 again


def test_earlier_run_folder_is_read_then_migrated_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _old_folder(out)
    before = open_run(out)  # the earlier layout, read as it is
    assert before.slices.num_rows == 3 + 2 + 4 and before.studies.num_rows == 2

    state = RunState.load(out)  # migrated here
    assert not (out / "_state" / "state.json").exists()
    assert not (out / "slices" / "slices.parquet").exists()
    assert open_run(out).slices.num_rows == 9  # the published rows only, until a publish
    for key, n in (("s1", 3), ("s2", 2), ("s3", 5), ("s4", 2)):
        assert state.is_done(key, f"fp-{key}") and state.series[key].n_slices == n
    assert state.parts == ["part-c.parquet"]
    assert state.publish("new") == 3 + 2 + 5 + 2
    from pdd_batch.runs.tables import write_studies

    assert write_studies(state, topk=5, run_id="new") == 3
    after = open_run(out)
    slices = after.slices.to_pandas()
    assert slices["slice_key"].is_unique and len(slices) == 12
    assert sorted(slices.groupby("series_key").size().items()) == [
        ("s1", 3), ("s2", 2), ("s3", 5), ("s4", 2)
    ]  # fmt: skip
    pairs = zip(slices["slice_key"], slices["heatmap_png"], strict=True)
    assert all(png == f"png-{k.replace(':0:', '-')}".encode() for k, png in pairs)
    studies = after.studies.to_pandas().set_index("study_key")
    assert studies.loc["st2", "n_slices"] == 5 and studies.loc["st1", "n_slices"] == 5
    assert "heatmap_png" not in read_table(out, "slices").column_names
    live = json.loads((out / "live_files.json").read_text())["tables"]
    assert len(live["studies"]) >= 1 and all(p.startswith("studies/") for p in live["studies"])
    again = RunState.load(out)  # nothing left to migrate
    assert again.series.keys() == {"s1", "s2", "s3", "s4"} and not again.parts
    # killed after the migration's transaction, before it deleted the old merged file:
    write_table_atomic(
        rows_to_table(_rows("s9", "st9", 1), SLICES_SCHEMA), out / "slices" / "slices.parquet"
    )
    again.reconcile()
    assert not (out / "slices" / "slices.parquet").exists() and len(open_run(out).slices) == 12
