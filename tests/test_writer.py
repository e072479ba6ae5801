"""Atomic writes, run state (resume/incremental bookkeeping), manifest accounting, heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pdd_batch.runs.heatmap import decode_heatmap, encode_heatmap
from pdd_batch.runs.manifest import (
    FAILED,
    LOST,
    SCORED,
    SKIPPED,
    InputCounts,
    ManifestError,
    build_manifest,
    exit_code_for,
    write_manifest,
)
from pdd_batch.runs.schema import ERRORS_SCHEMA, SLICES_SCHEMA
from pdd_batch.runs.state import RunState, RunStateError, SeriesRecord
from pdd_batch.runs.writer import (
    WriteError,
    remove_temp_files,
    rows_to_table,
    write_json_atomic,
    write_table_atomic,
)


def _slice_rows(series_key: str, n: int, study_key: str = "st1") -> list[dict]:
    png, peak = encode_heatmap(np.ones((8, 8), np.float32))
    return [
        {
            "slice_key": f"{series_key}:0:{i}",
            "study_key": study_key,
            "series_key": series_key,
            "volume_index": 0,
            "slice_index": i,
            "file_key": f"{series_key}f{i:04d}",
            "modality": "CT",
            "score": float(i),
            "threshold": None,
            "flagged": False,
            "heatmap_png": png,
            "heatmap_max": peak,
            "model_id": "m",
            "checkpoint_hash": "h",
            "preprocessing": "{}",
            "run_id": "r",
            "code_version": "0",
        }
        for i in range(n)
    ]


def _names(prefix: str = "p"):
    i = 0
    while True:
        i += 1
        yield f"{prefix}-{i:04d}.parquet"


def test_table_write_is_atomic_and_readable_by_pyarrow_pandas_duckdb(tmp_path: Path) -> None:
    table = rows_to_table(_slice_rows("s1", 3), SLICES_SCHEMA)
    out = write_table_atomic(table, tmp_path / "slices" / "part-1.parquet")
    assert [p.name for p in out.parent.iterdir()] == ["part-1.parquet"]  # no temp left behind
    assert pq.read_table(out).equals(table)
    assert len(pd.read_parquet(tmp_path / "slices")) == 3
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/slices/*.parquet')").fetchall()
    assert n == [(3,)]


def test_rows_not_matching_the_schema_raise_naming_the_table() -> None:
    with pytest.raises(WriteError, match="errors"):
        rows_to_table([{"file": "a"}], ERRORS_SCHEMA)  # stage/status/reason missing


def test_leftover_temp_files_are_invisible_and_removed(tmp_path: Path) -> None:
    d = tmp_path / "slices"
    write_table_atomic(rows_to_table(_slice_rows("s1", 2), SLICES_SCHEMA), d / "part-1.parquet")
    (d / ".part-2.parquet.abcd.tmp").write_bytes(b"PAR1 half written")
    assert len(pd.read_parquet(d)) == 2  # the half-written file is not read
    assert remove_temp_files([d]) == 1
    assert sorted(p.name for p in d.iterdir()) == ["part-1.parquet"]


def test_json_write_replaces_whole_file(tmp_path: Path) -> None:
    p = write_json_atomic({"a": 1}, tmp_path / "m.json")
    write_json_atomic({"b": 2}, p)
    assert json.loads(p.read_text()) == {"b": 2}


def _commit(state: RunState, part: str, series: dict[str, int]) -> None:
    rows = [r for k, n in series.items() for r in _slice_rows(k, n)]
    write_table_atomic(rows_to_table(rows, SLICES_SCHEMA), state.slices_dir / part)
    state.commit_part(part, {k: SeriesRecord(part, n, f"fp-{k}", "st1") for k, n in series.items()})


def test_state_round_trip_and_incremental_skip(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2, "s2": 3})
    again = RunState.load(tmp_path)
    assert again.is_done("s1", "fp-s1") and again.is_done("s2", "fp-s2")
    assert not again.is_done("s1", "changed-files") and not again.is_done("s3", "fp-s3")
    assert again.part_rows() == {"a.parquet": 5}


def test_orphan_part_from_a_crash_is_removed_and_its_series_not_done(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2})
    # crash after the rename, before the state names the part:
    write_table_atomic(
        rows_to_table(_slice_rows("s2", 2), SLICES_SCHEMA), state.slices_dir / "b.parquet"
    )
    resumed = RunState.load(tmp_path)
    assert resumed.reconcile() == ["b.parquet"]
    assert not resumed.is_done("s2", "fp-s2")
    assert sorted(p.name for p in resumed.slices_dir.iterdir()) == ["a.parquet"]


def test_changed_threshold_reflags_committed_rows(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 4})  # rows flagged without a threshold
    assert state.bind_threshold(1.0) == 1
    t = pq.read_table(state.slices_dir / "a.parquet").to_pandas()
    assert (t["threshold"] == 1.0).all() and list(t["flagged"]) == list(t["score"] > 1.0)
    assert RunState.load(tmp_path).bind_threshold(1.0) == 0  # bound: nothing to rewrite
    assert RunState.load(tmp_path).bind_threshold(None) == 1  # calibration removed
    t = pq.read_table(state.slices_dir / "a.parquet").to_pandas()
    assert t["threshold"].isna().all() and not t["flagged"].any()


def test_commit_refuses_a_part_not_on_disk(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    with pytest.raises(RunStateError, match="not on disk"):
        state.commit_part("ghost.parquet", {})


def test_new_checkpoint_or_force_replaces_all_rows(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2})
    assert RunState.load(tmp_path).bind_model("h1", "m", force=False) == 0
    assert RunState.load(tmp_path).bind_model("h2", "m", force=False) == 1  # new checkpoint
    assert not list(state.slices_dir.glob("*.parquet"))
    state = RunState.load(tmp_path)
    _commit(state, "b.parquet", {"s1": 2})
    assert RunState.load(tmp_path).bind_model("h2", "m", force=True) == 1
    assert RunState.load(tmp_path).series == {}


def test_forget_rewrites_only_the_changed_series(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2, "s2": 3})
    _commit(state, "b.parquet", {"s3": 1})
    assert state.forget({"s2", "s3"}, _names("new")) == 2
    table = pd.read_parquet(state.slices_dir)
    assert sorted(table["series_key"]) == ["s1", "s1"]
    assert RunState.load(tmp_path).series.keys() == {"s1"}


def test_compaction_keeps_every_row_once(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    for i in range(6):
        _commit(state, f"p{i}.parquet", {f"s{i}": i + 1})
    state.compact(max_parts=2, target_rows=100, new_part_name=_names("c"))
    assert len(state.parts) <= 2
    assert len(list(state.slices_dir.glob("*.parquet"))) == len(state.parts)
    keys = pd.read_parquet(state.slices_dir)["slice_key"]
    assert len(keys) == sum(range(1, 7)) and keys.is_unique
    assert RunState.load(tmp_path).part_rows() == state.part_rows()


def test_input_counts_add_up_and_lost_inputs_fail_the_run(tmp_path: Path) -> None:
    outcomes = {"a": SCORED, "b": SCORED, "c": SKIPPED, "d": FAILED, "e": LOST}
    counts = InputCounts.from_outcomes(outcomes)
    assert counts.inputs_seen == 5
    assert counts.inputs_seen == counts.inputs_scored + counts.inputs_skipped + counts.inputs_failed
    assert counts.inputs_lost == 1
    with pytest.raises(ManifestError):
        InputCounts.from_outcomes({"a": "eaten"})
    m = build_manifest(
        run_id="r",
        status="complete",
        key_id="k",
        counts=counts,
        model_id="m",
        checkpoint_hash="h",
        extra={"timings": {"total_s": 1.0}},
    )
    write_manifest(tmp_path, m)
    loaded = json.loads((tmp_path / "manifest.json").read_text())
    assert loaded["inputs_lost"] == 1 and loaded["versions"]["pyarrow"]
    assert exit_code_for("complete") == 0 and exit_code_for("incomplete") != 0
    assert exit_code_for("failed") != 0


def test_heatmap_png_round_trip_within_one_quantisation_step() -> None:
    rng = np.random.default_rng(0)
    amap = rng.random((64, 64)).astype(np.float32) * 3.0
    png, peak = encode_heatmap(amap)
    back = decode_heatmap(png, peak)
    assert back.shape == amap.shape
    assert np.abs(back - amap).max() <= peak / 255.0 / 2 + 1e-6
    png0, peak0 = encode_heatmap(np.zeros((4, 4), np.float32))
    assert peak0 == 0.0 and not decode_heatmap(png0, peak0).any()


def test_run_folder_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from pdd_batch.runs.state import RunLockedError, run_lock

    with run_lock(tmp_path):
        with pytest.raises(RunLockedError), run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released after the first holder left
        pass
