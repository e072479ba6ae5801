"""A nightly screen that adds one series adds files: every earlier slices and heatmaps file stays
byte-identical (same inode, same mtime), the new rows are visible through ``pdd-batch results``
and DuckDB over ``live_files.json``, and a rerun with nothing new reads no header."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest
import ray
from dicom_factory import write_ct_series
from screen_support import make_checkpoint
from typer.testing import CliRunner

from jobs.screen import run_screen
from pdd_batch.cli.app import app
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for table in ("slices", "heatmaps")
        for p in (out / table).glob("*.parquet")
    }


def _live(out: Path, table: str) -> list[str]:
    return [
        str(out / p) for p in json.loads((out / "live_files.json").read_text())["tables"][table]
    ]


def test_a_night_that_adds_one_series_only_adds_files(tmp_path: Path, shared_ray) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    for i in range(2):
        write_ct_series(archive / f"s{i}", n_slices=3, rows=32, cols=32, seed=400 + i)
    ckpt = make_checkpoint(tmp_path / "ckpt")

    def screen(run_id: str) -> dict:
        cfg = RunConfig(archive=archive, out_dir=out, model_path=ckpt, num_cpus=2,
                        batch_size=4, run_id=run_id)  # fmt: skip
        result = run_screen(cfg)
        assert result.exit_code == 0
        return result.manifest

    first = screen("n1")
    assert first["discovery"] == {"header_reads": 6, "files_unchanged": 0, "shards": 0}
    before = _files(out)
    assert before
    nothing = screen("n2")  # nothing new: no header read, nothing screened
    assert nothing["discovery"] == {"header_reads": 0, "files_unchanged": 6, "shards": 0}
    assert nothing["series_screened_this_run"] == 0
    write_ct_series(archive / "s2", n_slices=3, rows=32, cols=32, seed=402)
    third = screen("n3")
    # the Ray Data recipe of docs/screening.md (through pyarrow.dataset: Ray's own
    # read_parquet races on fsspec's HTTP module where fsspec has no aiohttp)
    rows = ray.data.from_arrow(ds.dataset(_live(out, "slices"), format="parquet").to_table())
    assert rows.count() == 9
    assert third["discovery"] == {"header_reads": 3, "files_unchanged": 6, "shards": 0}
    assert third["series_screened_this_run"] == 1
    after = _files(out)
    assert all(after.get(name) == stat for name, stat in before.items())  # untouched
    assert len(after) > len(before)
    rows = duckdb.sql(
        f"select series_key, count(*) as n from read_parquet({_live(out, 'slices')}) group by 1"
    ).fetchall()
    assert sorted(n for _, n in rows) == [3, 3, 3]
    printed = CliRunner().invoke(app, ["results", str(out), "--table", "slices"])
    assert printed.exit_code == 0, printed.output
    listed = list(csv.DictReader(io.StringIO(printed.output)))
    assert len(listed) == 9 and len({r["slice_key"] for r in listed}) == 9
    assert {r["run_id"] for r in listed} == {"n1", "n3"}
    studies = CliRunner().invoke(app, ["results", str(out), "--table", "studies"])
    assert len(list(csv.DictReader(io.StringIO(studies.output)))) == 3
