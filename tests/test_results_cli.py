"""`pdd-batch results` prints or exports exactly the live rows (superseded rows never), lists
the live files for other readers; `pdd-batch compact` merges small files without changing a row
and leaves only the merged files on disk."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.runs.results import open_run
from pdd_batch.runs.schema import SLICES_SCHEMA
from pdd_batch.runs.state import RunState, SeriesRecord
from pdd_batch.runs.tables import write_studies
from pdd_batch.runs.writer import rows_to_table

RUNNER = CliRunner()


def _rows(series: str, n: int, score: float) -> list[dict]:
    return [
        {"slice_key": f"{series}:0:{i}", "study_key": f"st-{series}", "series_key": series,
         "volume_index": 0, "slice_index": i, "file_key": f"f{i}", "score": score,
         "threshold": None, "flagged": False, "heatmap_png": b"png", "heatmap_max": 1.0,
         "model_id": "m", "checkpoint_hash": "h", "preprocessing": "{}", "run_id": "r",
         "code_version": "0"}
        for i in range(n)
    ]  # fmt: skip


def _night(state: RunState, night: int, series: dict[str, int], score: float) -> None:
    for k, n in series.items():
        part = f"part-{night}-{k}.parquet"
        state.write_part(part, rows_to_table(_rows(k, n, score), SLICES_SCHEMA))
        state.commit_part(part, {k: SeriesRecord(part, n, f"fp{night}", f"st-{k}")})
    state.publish(f"night{night}")
    write_studies(state, topk=5, run_id=f"night{night}")


def _folder(out: Path) -> None:
    state = RunState.load(out)
    state.bind_model("h", "m", force=False)
    _night(state, 1, {"a": 2, "b": 3}, 0.1)
    _night(state, 2, {"c": 1}, 0.2)
    _night(state, 3, {"b": 4}, 0.3)  # b screened again: its first rows are superseded


def _printed(args: list[str]) -> list[dict]:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.output)))


def test_results_prints_exactly_the_live_rows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _folder(out)
    rows = _printed(["results", str(out), "--table", "slices"])
    by_series = sorted((r["series_key"], r["score"][:3]) for r in rows)
    assert by_series == [("a", "0.1")] * 2 + [("b", "0.3")] * 4 + [("c", "0.2")]
    assert "heatmap_png" not in rows[0]
    studies = _printed(["results", str(out)])
    assert sorted((s["study_key"], s["n_slices"]) for s in studies) == [
        ("st-a", "2"), ("st-b", "4"), ("st-c", "1")
    ]  # fmt: skip
    files = RUNNER.invoke(app, ["results", str(out), "--table", "slices", "--files"])
    listed = files.output.split()
    assert ds.dataset(listed, format="parquet").count_rows() == 7
    RUNNER.invoke(app, ["results", str(out), "--table", "slices", "--out", str(tmp_path / "x.pq")])
    assert pq.read_table(tmp_path / "x.pq").num_rows == 7
    cols = RUNNER.invoke(
        app, ["results", str(out), "--table", "slices", "--columns", "series_key,score",
              "--format", "jsonl"],
    )  # fmt: skip
    first = json.loads(cols.output.splitlines()[0])
    assert set(first) == {"series_key", "score"}
    bad = RUNNER.invoke(app, ["results", str(out), "--table", "nope"])
    assert bad.exit_code == 2


def test_compact_merges_small_files_and_keeps_every_row(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _folder(out)
    before = open_run(out)
    n_files = len(list((out / "slices").glob("*.parquet")))
    assert n_files == 3
    result = RUNNER.invoke(app, ["compact", str(out)])
    assert result.exit_code == 0, result.output
    assert "slices: 3 files merged" in result.output
    live = json.loads((out / "live_files.json").read_text())["tables"]
    assert len(live["slices"]) == len(live["heatmaps"]) == len(live["studies"]) == 1
    on_disk = sorted(f"slices/{p.name}" for p in (out / "slices").glob("*.parquet"))
    assert on_disk == live["slices"]
    after = open_run(out)
    for table in ("slices", "studies"):
        a = getattr(before, table).sort_by("slice_key" if table == "slices" else "study_key")
        b = getattr(after, table).sort_by("slice_key" if table == "slices" else "study_key")
        assert a.equals(b), table
    state = RunState.load(out)  # the store follows: a later night supersedes in merged files
    _night(state, 4, {"a": 1}, 0.4)
    rows = _printed(["results", str(out), "--table", "slices"])
    assert sorted(r["series_key"] for r in rows) == ["a", "b", "b", "b", "b", "c"]
