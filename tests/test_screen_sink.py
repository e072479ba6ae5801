"""The driver sink without Ray: series complete only when their end marker and every slice are
in, retried rows are dropped, failed series are never committed, files that gave no slice are
recorded, and parts are committed by size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.keys import file_key
from pdd_batch.runs.sink import NO_SLICE_REASON, Provenance, SliceSink
from pdd_batch.runs.state import RunState


def _ref(key: str, n_files: int) -> SeriesRef:
    files = tuple(f"{key}/f{i}.dcm" for i in range(n_files))
    return SeriesRef(
        series_key=key, study_key="st-" + key, kind="dicom", modality="CT", files=files
    )


def _batch(rows: list[tuple[str, str, int, str, int, str]]) -> dict[str, np.ndarray]:
    """rows: (kind, series_key, slice_index, source_file, n_rows, reason)."""
    n = len(rows)
    col = lambda i: np.array([r[i] for r in rows], dtype=object)  # noqa: E731
    return {
        "kind": col(0),
        "series_key": col(1),
        "study_key": np.array(["st-" + r[1] for r in rows]),
        "modality": np.array(["CT"] * n),
        "volume_index": np.zeros(n, np.int32),
        "slice_index": np.array([r[2] for r in rows], np.int32),
        "source_file": col(3),
        "n_rows": np.array([r[4] for r in rows], np.int32),
        "reason": col(5),
        "score": np.arange(n, dtype=np.float32),
        "heatmap_png": np.array([b"png"] * n, object),
        "heatmap_max": np.ones(n, np.float32),
    }


def _slice(key: str, i: int, f: int) -> tuple:
    return ("slice", key, i, f"{key}/f{f}.dcm", 0, "")


def _sink(tmp_path: Path, refs: list[SeriesRef], rows_per_file: int) -> SliceSink:
    state = RunState.load(tmp_path)
    state.bind_model("hash", "model", force=False)
    names = (f"part-{i:03d}.parquet" for i in range(1, 1000))
    prov = Provenance("model", "hash", "{}", "run", "0", threshold=1.5)
    return SliceSink(
        state,
        prov,
        {r.series_key: r for r in refs},
        {r.series_key: "fp-" + r.series_key for r in refs},
        names,
        rows_per_file=rows_per_file,
        flush_seconds=3600,
    )


def test_series_commit_only_when_complete_and_duplicates_are_dropped(tmp_path: Path) -> None:
    sink = _sink(tmp_path, [_ref("a", 3), _ref("b", 1), _ref("c", 2)], rows_per_file=2)
    sink.add(_batch([_slice("a", 0, 0), _slice("a", 1, 1), _slice("b", 0, 0)]))
    assert sink.stats.parts_written == 0  # nothing is complete: no end marker yet
    sink.add(_batch([("end", "a", -1, "", 2, "1 duplicate dropped"), _slice("a", 1, 1)]))
    assert sink.stats.parts_written == 1 and sink.stats.duplicates_dropped == 1
    sink.add(_batch([("error", "c", -1, "", 0, "cannot decode"), _slice("c", 0, 0)]))
    sink.add(_batch([_slice("a", 0, 0)]))  # a late retried row of a committed series
    sink.close()
    assert sink.open_series == ["b"]  # its end marker never came: not committed
    assert sink.failed == {"c": "cannot decode"}
    state = RunState.load(tmp_path)
    assert set(state.series) == {"a"}
    dropped = state.series["a"].dropped
    assert [f for f, _ in dropped] == [file_key("a/f2.dcm")] and NO_SLICE_REASON in dropped[0][1]
    assert not (tmp_path / "slices").exists()  # committed into the hidden store only
    state.publish("run")
    table = pd.read_parquet(tmp_path / "slices")
    assert sorted(table["slice_key"]) == ["a:0:0", "a:0:1"]
    assert (table["flagged"] == (table["score"] > 1.5)).all()


def test_empty_series_are_done_without_a_part_and_parts_follow_rows_per_file(tmp_path) -> None:
    refs = [_ref(k, 1) for k in "pqrs"] + [_ref("e", 2)]
    sink = _sink(tmp_path, refs, rows_per_file=2)
    for k in "pqrs":
        sink.add(_batch([_slice(k, 0, 0), ("end", k, -1, "", 1, "")]))
    sink.add(_batch([("empty", "e", -1, "", 0, "no image frames")]))
    sink.close()
    state = RunState.load(tmp_path)
    assert len(state.parts) == 2 and set(state.series) == set("pqrse")
    assert state.series["e"].part == "" and len(state.series["e"].dropped) == 2


def test_rows_of_unknown_series_fail_loudly(tmp_path: Path) -> None:
    sink = _sink(tmp_path, [_ref("a", 1)], rows_per_file=2)
    with pytest.raises(KeyError, match="zzz"):
        sink.add(_batch([_slice("zzz", 0, 0)]))


def test_parts_and_state_name_files_by_key_never_by_path(tmp_path: Path) -> None:
    """Slice rows carry ``file_key`` (keyed digest of the relative path) and the run state
    records dropped files by key: no path reaches a part or the run store ``_state/run.db``."""
    import sqlite3

    import pyarrow.parquet as pq

    sink = _sink(tmp_path, [_ref("DOE^JOHN_12345", 3)], rows_per_file=1)
    sink.add(_batch([_slice("DOE^JOHN_12345", 0, 0), ("end", "DOE^JOHN_12345", -1, "", 1, "")]))
    sink.close()
    table = pq.read_table(sink.state.store_dir)  # the committed (unpublished) parts
    assert "source_file" not in table.column_names
    assert table.column("file_key").to_pylist() == [file_key("DOE^JOHN_12345/f0.dcm")]
    with sqlite3.connect(tmp_path / "_state" / "run.db") as db:
        state_text = "\n".join(db.iterdump())
    assert "f1.dcm" not in state_text and "f2.dcm" not in state_text
    assert file_key("DOE^JOHN_12345/f1.dcm") in state_text
    for part in sink.state.store_dir.glob("*.parquet"):
        assert b".dcm" not in part.read_bytes()
