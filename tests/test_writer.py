"""Atomic writes, run state (resume/incremental bookkeeping), manifest accounting, heatmaps."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal

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
from pdd_batch.runs.results import open_run, read_table
from pdd_batch.runs.schema import ERRORS_SCHEMA, SLICES_SCHEMA
from pdd_batch.runs.state import RunState, RunStateError, SeriesRecord
from pdd_batch.runs.writer import (
    WriteError,
    remove_temp_files,
    rows_to_table,
    write_atomic,
    write_bytes_atomic,
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
    write_table_atomic(rows_to_table(rows, SLICES_SCHEMA), state.store_dir / part)
    state.commit_part(part, {k: SeriesRecord(part, n, f"fp-{k}", "st1") for k, n in series.items()})


def _published(out: Path) -> pd.DataFrame:
    return open_run(out).slices.to_pandas()


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
        rows_to_table(_slice_rows("s2", 2), SLICES_SCHEMA), state.store_dir / "b.parquet"
    )
    resumed = RunState.load(tmp_path)
    assert resumed.reconcile() == ["b.parquet"]
    assert not resumed.is_done("s2", "fp-s2")
    assert sorted(p.name for p in resumed.store_dir.iterdir()) == ["a.parquet"]


def test_changed_threshold_reflags_every_row_when_published(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 4})  # rows flagged without a threshold
    assert state.bind_threshold(1.0) == 4
    state.publish("r1")
    t = _published(tmp_path)
    assert (t["threshold"] == 1.0).all() and list(t["flagged"]) == list(t["score"] > 1.0)
    assert RunState.load(tmp_path).bind_threshold(1.0) == 0  # bound: nothing to re-flag
    state = RunState.load(tmp_path)
    assert state.bind_threshold(None) == 4  # calibration removed
    state.publish("r2")
    t = _published(tmp_path)
    assert t["threshold"].isna().all() and not t["flagged"].any()


def test_commit_refuses_a_part_not_on_disk(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    with pytest.raises(RunStateError, match="not on disk"):
        state.commit_part("ghost.parquet", {})


def test_forget_leaves_out_only_the_changed_series(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2, "s2": 3})
    state.publish("r1")
    _commit(state, "b.parquet", {"s3": 1})
    assert state.forget({"s2", "s3"}) == 2
    state.publish("r2")
    assert sorted(_published(tmp_path)["series_key"]) == ["s1", "s1"]
    assert RunState.load(tmp_path).series.keys() == {"s1"}


def test_parts_are_invisible_until_published_then_added_as_live_files(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    for i in range(4):
        _commit(state, f"p{i}.parquet", {f"s{i}": i + 1})
    assert not (tmp_path / "slices").exists() or not list((tmp_path / "slices").iterdir())
    assert read_table(tmp_path, "slices").num_rows == 0  # readers see no part
    assert state.publish("r1") == 1 + 2 + 3 + 4
    live = json.loads((tmp_path / "live_files.json").read_text())["tables"]
    assert sorted(live["slices"]) == [f"slices/p{i}.parquet" for i in range(4)]  # added, not merged
    assert sorted(p.name for p in (tmp_path / "slices").iterdir()) == [
        f"p{i}.parquet" for i in range(4)
    ]
    assert not list(state.store_dir.glob("*.parquet"))  # the parts moved out of the store
    files = [str(tmp_path / f) for f in live["slices"]]
    keys = duckdb.sql(f"select slice_key from read_parquet({files})").df()["slice_key"]
    assert len(keys) == 10 and keys.is_unique
    assert "heatmap_png" not in pq.read_schema(files[0]).names  # scores without image bytes
    assert len(read_table(tmp_path, "heatmaps")) == 10
    assert _published(tmp_path)["heatmap_png"].notna().all()  # open_run joins them back
    assert RunState.load(tmp_path).part_rows() == {f"p{i}.parquet": i + 1 for i in range(4)}


@pytest.mark.parametrize("step", ["_roll_forward", "write_live_list", "delete_retired"])
def test_publish_killed_at_any_step_never_loses_or_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Killed after the store's transaction, after the renames or after the new list: readers
    see the earlier rows or the new ones, never a mix; the next run finishes the publish."""
    from pdd_batch.runs import live

    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2, "s2": 2})
    state.publish("r1")
    _commit(state, "b.parquet", {"s2": 3})  # s2 screened again: a.parquet is superseded

    def crash(*args, **kwargs) -> None:
        raise OSError("killed")

    monkeypatch.setattr(live, step, crash)
    with pytest.raises(OSError, match="killed"):
        state.publish("r2")
    monkeypatch.undo()
    seen = _published(tmp_path)
    assert seen["slice_key"].is_unique and len(seen) in (4, 5)
    resumed = RunState.load(tmp_path)
    resumed.reconcile()
    _commit(resumed, "c.parquet", {"s3": 1})
    resumed.publish("r3")
    rows = _published(tmp_path)
    assert rows["slice_key"].is_unique and len(rows) == 2 + 3 + 1
    assert sorted(rows.groupby("series_key").size().items()) == [("s1", 2), ("s2", 3), ("s3", 1)]
    on_disk = sorted(p.name for p in (tmp_path / "slices").iterdir())
    live_now = json.loads((tmp_path / "live_files.json").read_text())["tables"]["slices"]
    assert on_disk == sorted(f.split("/")[1] for f in live_now)  # nothing superseded is left


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.glob("*/*.parquet")
    }


def test_a_published_file_is_never_rewritten_when_rows_are_added(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    _commit(state, "a.parquet", {"s1": 2})
    state.publish("r1")
    before = {k: v for k, v in _stats(tmp_path).items() if k.startswith(("slices/", "heatmaps/"))}
    assert len(before) == 2
    _commit(state, "b.parquet", {"s2": 3})
    state.publish("r2")
    after = _stats(tmp_path)
    assert all(after[k] == v for k, v in before.items())  # same inode, same mtime
    assert len(_published(tmp_path)) == 5


def test_force_keeps_earlier_results_readable_until_the_new_ones_are_published(
    tmp_path: Path,
) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m1", force=False)
    _commit(state, "a.parquet", {"s1": 2, "s2": 2})
    state.publish("run-1")
    old = _published(tmp_path)
    forced = RunState.load(tmp_path)
    forced.reconcile()
    assert forced.bind_model("h1", "m1", force=True) == 2
    warning = forced.replacement_warning()
    assert warning and "--force" in warning and "2 series, 4 slices" in warning
    _commit(forced, "b.parquet", {"s1": 2})
    # killed here: the new generation's rows are committed, not published
    assert_frame_equal(_published(tmp_path), old)
    resumed = RunState.load(tmp_path)
    resumed.reconcile()
    assert resumed.bind_model("h1", "m1", force=False) == 0  # resumes the new generation
    assert resumed.is_done("s1", "fp-s1") and not resumed.is_done("s2", "fp-s2")
    assert "--force" in (resumed.replacement_warning() or "")  # still said on the resumed run
    _commit(resumed, "c.parquet", {"s2": 3})
    resumed.publish("run-2")
    new = _published(tmp_path)
    assert sorted(new["slice_key"]) == ["s1:0:0", "s1:0:1", "s2:0:0", "s2:0:1", "s2:0:2"]
    assert RunState.load(tmp_path).replacement_warning() is None


def test_new_checkpoint_replaces_rows_only_when_published(tmp_path: Path) -> None:
    state = RunState.load(tmp_path)
    state.bind_model("h1", "m1", force=False)
    _commit(state, "a.parquet", {"s1": 2})
    state.publish("run-1")
    state = RunState.load(tmp_path)
    assert state.bind_model("h2", "m2", force=False) == 1
    assert "different checkpoint" in (state.replacement_warning() or "")
    assert len(_published(tmp_path)) == 2  # still the h1 rows
    state.publish("run-2")  # the new model found nothing: the folder now holds no row
    assert _published(tmp_path).empty and RunState.load(tmp_path).series == {}


def test_version_1_folder_is_migrated_without_losing_or_duplicating_rows(tmp_path: Path) -> None:
    slices = tmp_path / "slices"
    for name, key in (("part-a.parquet", "s1"), ("part-b.parquet", "s2")):
        write_table_atomic(rows_to_table(_slice_rows(key, 2), SLICES_SCHEMA), slices / name)
    records = {k: {"part": p, "n_slices": 2, "fingerprint": f"fp-{k}", "study_key": "st1"}
               for k, p in (("s1", "part-a.parquet"), ("s2", "part-b.parquet"))}  # fmt: skip
    v1 = {"version": 1, "checkpoint_hash": "h1", "model_id": "m", "threshold": None,
          "parts": ["part-a.parquet", "part-b.parquet"], "series": records}  # fmt: skip
    write_json_atomic(v1, tmp_path / "_state" / "state.json")
    state = RunState.load(tmp_path)
    state.reconcile()
    assert len(_published(tmp_path)) == 4  # the old parts are still what readers see
    assert state.bind_model("h1", "m", force=False) == 0 and state.is_done("s1", "fp-s1")
    state.publish("r2")
    live = json.loads((tmp_path / "live_files.json").read_text())["tables"]["slices"]
    assert sorted(p.name for p in slices.iterdir()) == sorted(f.split("/")[1] for f in live)
    keys = _published(tmp_path)["slice_key"]
    assert len(keys) == 4 and keys.is_unique
    assert not (tmp_path / "_state" / "state.json").exists()  # migrated once, into run.db
    assert RunState.load(tmp_path).series.keys() == {"s1", "s2"}


def test_write_errors_name_the_file_and_the_os_reason_not_the_path(tmp_path: Path) -> None:
    def full_disk(fh) -> None:
        fh.write(b"PAR1")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    final = tmp_path / "Doe^Jane" / "slices" / "slices.parquet"
    with pytest.raises(WriteError) as info:
        write_atomic(final, full_disk)
    assert str(info.value) == "cannot write slices/slices.parquet: " + (
        f"{os.strerror(errno.ENOSPC)} (ENOSPC)"
    )
    assert not list(final.parent.iterdir())  # the temp file is gone


def test_run_outputs_are_private_under_umask_022(tmp_path: Path) -> None:
    from pdd_batch.runs.state import make_run_folder_private, run_lock
    from pdd_batch.runs.tables import write_studies

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        make_run_folder_private(out)
        with run_lock(out):
            state = RunState.load(out)
            state.bind_model("h1", "m", force=False)
            _commit(state, "a.parquet", {"s1": 2})
            state.publish("r1")
            write_studies(state, topk=3, run_id="r1")
            write_manifest(out, {"status": "complete"})
            write_bytes_atomic(b"<html></html>", out / "report.html")
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert len(paths) >= 9
    for p in paths:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p.relative_to(tmp_path)


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
